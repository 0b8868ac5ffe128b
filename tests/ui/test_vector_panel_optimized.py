"""Vector panel, optimized method (issue 17): chosen and trained as a user clicks, live loss curves, cancel."""

from __future__ import annotations

import json
from pathlib import Path

from PySide6.QtCore import Qt
from test_window import load

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


def choose_optimized(qtbot, vp) -> None:
    vp.method.setFocus()
    while vp.method.currentData() != "optimized":  # the arrow key, as a user picks from the list
        qtbot.keyClick(vp.method, Qt.Key.Key_Down)


def set_spin(qtbot, spin, value) -> None:
    spin.selectAll()
    qtbot.keyClicks(spin, str(value))
    qtbot.keyClick(spin, Qt.Key.Key_Tab)


def test_optimized_from_the_vector_panel(qtbot, window, tiny_model_dirs):
    load(qtbot, window, tiny_model_dirs["tiny-a"])
    window.dataset_panel.load_bundled("neutral_rude")
    vp = window.vector_panel
    assert not vp.optimize_area.isVisibleTo(vp)
    choose_optimized(qtbot, vp)
    assert vp.optimize_area.isVisibleTo(vp)

    # No layers: one sentence, nothing submitted, nothing added.
    errors = []
    vp.error_occurred.connect(lambda title, msg: errors.append(msg))
    qtbot.mouseClick(vp.compute_button, Qt.MouseButton.LeftButton)
    assert errors and "Layers" in errors[-1] and not vp.sets()

    qtbot.keyClicks(vp.optimize.layers, "1,2")
    set_spin(qtbot, vp.optimize.epochs, 2)
    set_spin(qtbot, vp.optimize.kl_weight, "0.5")
    set_spin(qtbot, vp.optimize.max_norm, "1.5")
    set_spin(qtbot, vp.optimize.seed, 3)
    failures = []
    window.controller.failed.connect(failures.append)
    ready = []
    vp.vectors_ready.connect(ready.append)
    qtbot.mouseClick(vp.compute_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: bool(ready or failures), timeout=300000)
    assert not failures, failures
    vs = vp.current().vectors
    meta = json.loads(vs.metadata["optimize"])
    assert vs.metadata["method"] == "optimized" and vs.layers_with_direction == [1, 2]
    s = meta["settings"]
    assert (s["epochs"], s["kl_weight"], s["max_norm"], s["seed"]) == (2, 0.5, 1.5, 3)
    # The live curves are the job's EpochReports: the same numbers the vector's metadata records.
    for layer in (1, 2):
        curve = meta["curves"][str(layer)]
        pts = vp.loss_plot.points[layer]
        assert [round(v, 6) for _, v in pts["val"]] == curve["val"]
        assert [round(v, 6) for _, v in pts["train"]] == curve["train"]
        assert [e for e, _ in pts["val"]] == list(range(len(curve["val"])))

    window.resize(1366, 768)
    window.vector_dock.raise_()
    qtbot.wait(200)
    ARTIFACTS.mkdir(exist_ok=True)
    assert window.grab().save(str(ARTIFACTS / "vector_panel_optimized.png"))
    assert vp.grab().save(str(ARTIFACTS / "vector_panel_optimized_panel.png"))

    # Cancel mid-training: no partial vector is added, the panel is ready again.
    n_sets = len(vp.sets())
    set_spin(qtbot, vp.optimize.epochs, 200)
    qtbot.mouseClick(vp.compute_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: bool(vp.loss_plot.points), timeout=120000)  # training has started
    with qtbot.waitSignal(window.controller.job_cancelled, timeout=120000):
        qtbot.mouseClick(vp.cancel_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: vp.compute_button.isEnabled(), timeout=10000)
    assert len(vp.sets()) == n_sets and not vp.cancel_button.isEnabled()
    assert max(e for e, _ in vp.loss_plot.points[1]["val"]) < 200
