"""The Search panel on its own: Pareto scatter (faded dominated, colour = layer, crosses beyond the
budget), hover text, a click emits the settings, a real search through a ModelController fills it
live, Stop keeps what was found, Resume opens a study file (and refuses a foreign one)."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pytest
import torch
from PySide6.QtCore import QObject, QPointF, Qt, Signal

from steerdesk.core.datasets import load_bundled
from steerdesk.core.search import SearchSpace, TrialResult, TrialSettings
from steerdesk.ui.panels.search_panel import SearchPanel, layer_colour

sys.path.insert(0, str(Path(__file__).parents[1] / "core"))


class FakeHandle(QObject):
    partial = Signal(object)
    progress = Signal(int, int, str)
    finished = Signal(object)
    failed = Signal(object)
    cancelled = Signal()
    ended = Signal()


def _trial(n, layer, margin, kl, fluency=-0.1):
    return TrialResult(number=n, state="complete", params={"start": layer},
                       settings=TrialSettings((layer, layer + 1), 1.5, "add", False, searched_scale=1.5),
                       margin_delta=margin, kl=kl, fluency_delta=fluency)


def test_points_front_colour_budget_hover_and_click(qtbot):
    panel = SearchPanel(num_layers=30)
    qtbot.addWidget(panel)
    panel.fluency_budget = 0.5
    for t in (_trial(0, 2, 0.5, 0.10), _trial(1, 20, 0.8, 0.30), _trial(2, 10, 0.4, 0.20),
              _trial(3, 29, 1.2, 0.90, fluency=-0.9)):
        panel.add_trial(t)
    pts = {p["trial"]: p for p in panel.points()}
    assert pts[0]["alpha"] == 255 and pts[1]["alpha"] == 255 and pts[3]["alpha"] == 255
    assert pts[2]["alpha"] < 255  # dominated by trial 0 (more margin, less KL): faded
    assert pts[3]["symbol"] == "x" and pts[0]["symbol"] == "o"  # beyond the fluency budget
    assert pts[0]["colour"] == layer_colour(2, 30) != pts[3]["colour"] == layer_colour(29, 30)
    assert (pts[1]["x"], pts[1]["y"]) == (0.30, 0.8)
    assert "layers 20-21" in panel.hover_text(1) and "scale 1.5" in panel.hover_text(1)
    # Hover and click through the scatter's own signals, with its own spots.
    spot = next(s for s in panel.scatter.points() if s.data() == 1)
    panel.scatter.sigHovered.emit(panel.scatter, [spot], None)
    assert "trial 1" in panel.hover_label.text() and "margin delta +0.8000" in panel.hover_label.text()
    with qtbot.waitSignal(panel.settings_chosen) as blocker:
        panel.scatter.sigClicked.emit(panel.scatter, [spot], None)
    chosen = blocker.args[0]
    assert chosen["trial"] == 1 and chosen["layers"] == [20, 21] and chosen["scale"] == 1.5
    assert chosen["mode"] == "add" and chosen["normalize"] is False


def test_mouse_click_on_a_point_emits_its_settings(qtbot):
    panel = SearchPanel(num_layers=30)
    qtbot.addWidget(panel)
    panel.resize(700, 600)
    panel.show()
    panel.add_trial(_trial(0, 2, 0.5, 0.10))
    panel.add_trial(_trial(1, 20, 0.8, 0.30))
    panel.plot.getViewBox().setRange(xRange=(0, 0.4), yRange=(0.4, 0.9), padding=0)
    qtbot.wait(50)
    vb = panel.plot.getViewBox()
    pos = panel.plot.mapFromScene(vb.mapViewToScene(QPointF(0.30, 0.8)))
    with qtbot.waitSignal(panel.settings_chosen, timeout=3000) as blocker:
        qtbot.mouseClick(panel.plot.viewport(), Qt.MouseButton.LeftButton, pos=pos)
    assert blocker.args[0]["trial"] == 1


def test_start_builds_the_spec_and_fills_from_the_handle(qtbot, tmp_path):
    held = load_bundled("neutral_rude")
    handles, stops = [], []

    def submit(spec):
        handles.append((spec, FakeHandle()))
        return handles[-1][1]

    vs = object()
    panel = SearchPanel(submit=submit, stop=lambda: stops.append(1),
                        inputs=lambda: {"vectors": vs, "heldout": held, "vector_path": "v.safetensors"})
    qtbot.addWidget(panel)
    errors = []
    panel.error_occurred.connect(lambda title, msg: errors.append(msg))
    panel.start()
    assert errors and "study file" in errors[0] and not handles  # no study chosen yet
    panel.study.setText(str(tmp_path / "new.db"))
    panel.trials_spin.setValue(7)
    panel.batch_spin.setValue(3)
    panel.seed_spin.setValue(11)
    panel.start()
    spec, handle = handles[-1]
    assert (spec.study, spec.trials, spec.batch, spec.seed, spec.vector_path) == (str(tmp_path / "new.db"), 7, 3,
                                                                                   11, "v.safetensors")
    assert spec.vectors is vs and spec.heldout is held and spec.space is None
    assert not panel.start_button.isEnabled() and panel.stop_button.isEnabled()
    handle.partial.emit(_trial(0, 3, 0.2, 0.1))
    handle.progress.emit(1, 7, "Searching")
    assert [p["trial"] for p in panel.points()] == [0] and panel.progress.value() == 1
    panel.stop_button.click()
    assert stops == [1]
    handle.ended.emit()
    assert panel.start_button.isEnabled()


@pytest.fixture
def tiny_study(tmp_path, smol_folder):
    """A real 4-trial study of a tiny model (and the model, vectors and held-out pairs)."""
    from tinylm import build_tiny, rude4, strong_vectors
    from transformers import AutoTokenizer

    from steerdesk.core.search import search
    from steerdesk.core.vectors import VectorSet

    tok = AutoTokenizer.from_pretrained(str(smol_folder))
    lm = build_tiny("llama", tok, tok)
    d = strong_vectors(lm, 1.0)
    vs = VectorSet(d, torch.ones(d.shape[0]), {"model": lm.info.name, "architecture": lm.info.architecture})
    path = tmp_path / "study.db"
    res = search(lm, vs, rude4(), path, trials=4, batch=2, seed=1, neutral=["The sky is blue today."])
    return path, res


def test_resume_opens_a_study_and_refuses_a_foreign_file(qtbot, tiny_study, tmp_path):
    path, res = tiny_study
    panel = SearchPanel(num_layers=4)
    qtbot.addWidget(panel)
    errors = []
    panel.error_occurred.connect(lambda title, msg: errors.append(msg))
    foreign = tmp_path / "foreign.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    before = foreign.read_bytes()
    assert not panel.open_study(str(foreign))
    assert errors and "not an Optuna study" in errors[0] and panel.study.text() == ""
    assert foreign.read_bytes() == before
    state = (path.read_bytes(), path.stat().st_mtime_ns)
    assert panel.open_study(str(path))
    assert (path.read_bytes(), path.stat().st_mtime_ns) == state  # opened without writing
    assert panel.study.text() == str(path) and panel.seed_spin.value() == 1
    assert sorted(p["trial"] for p in panel.points()) == [t.number for t in res.trials]
    assert SearchSpace.parse(panel.space.text(), res.space) == res.space  # the study's own space, exactly
    assert "4 trials" in panel.summary.text()


def test_a_real_search_through_the_controller_fills_live_and_stop_keeps_the_trials(qtbot, tiny_model_dirs, tmp_path):
    from tinylm import rude4

    from steerdesk.core.vectors import VectorSet
    from steerdesk.ui.controller import ModelController

    controller = ModelController()
    panel = None
    try:
        with qtbot.waitSignal(controller.model_ready, timeout=60000):
            controller.load_model(tiny_model_dirs["tiny-a"], device="cpu", dtype="float32")
        info = controller.model_info
        g = torch.Generator().manual_seed(0)
        vs = VectorSet(torch.randn(info.num_layers, info.hidden_size, generator=g) * 3, torch.ones(info.num_layers),
                       {"model": info.name, "architecture": info.architecture})
        panel = SearchPanel(submit=controller.submit, stop=lambda: controller.stop("search"),
                            inputs=lambda: {"vectors": vs, "heldout": rude4(), "neutral": ("The sky is blue.",)},
                            num_layers=info.num_layers)
        panel.study.setText(str(tmp_path / "live.db"))
        panel.trials_spin.setValue(4)
        panel.batch_spin.setValue(2)
        seen = []
        with qtbot.waitSignal(controller.finished, timeout=120000):
            panel.start()
            panel._job.partial.connect(lambda t: seen.append(len(panel.points())))
        assert seen and seen[0] >= 1  # points arrived before the end
        assert len(panel.points()) == 4 and panel.result is not None and "4 trials" in panel.summary.text()
        # Stop at once in a longer continuation: the study keeps every finished trial, the panel shows them.
        panel.trials_spin.setValue(40)
        with qtbot.waitSignal(controller.job_cancelled, timeout=120000):
            panel.start()
            qtbot.waitUntil(lambda: len(panel.points()) >= 6, timeout=120000)
            panel.stop()
        qtbot.waitUntil(lambda: panel.start_button.isEnabled(), timeout=10000)
        from steerdesk.core.search import load_result

        stored = load_result(tmp_path / "live.db")
        assert len(stored.evaluated) >= 6 and len(panel.points()) == len([t for t in stored.trials
                                                                          if t.state == "complete"])
        assert "Stopped" in panel.summary.text()
    finally:
        controller.shutdown(5000)
        qtbot.waitUntil(controller.thread.isFinished, timeout=10000)
        if panel is not None:
            panel.close()
            panel.deleteLater()
            qtbot.wait(10)
        controller.deleteLater()
        qtbot.wait(10)
