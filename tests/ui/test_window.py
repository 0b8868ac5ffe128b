"""The main window driven as a person would, with the real worker thread on tiny models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import Qt

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


def load(qtbot, win, folder):
    with qtbot.waitSignal(win.controller.model_ready, timeout=60000):
        win.load_model(folder)


def compute(qtbot, win):
    win.dataset_panel.load_bundled("neutral_rude")
    with qtbot.waitSignal(win.vector_panel.vectors_ready, timeout=60000):
        qtbot.mouseClick(win.vector_panel.compute_button, Qt.MouseButton.LeftButton)


def generate(qtbot, win, *, tokens=12, timeout=60000):
    win.generation_panel.max_tokens.setValue(tokens)
    with qtbot.waitSignal(win.generation_panel.finished, timeout=timeout) as blocker:
        qtbot.mouseClick(win.generation_panel.generate_button, Qt.MouseButton.LeftButton)
    return blocker.args[0].rows


@pytest.fixture
def ready(qtbot, window, tiny_model_dirs):
    """Window with tiny-a loaded and vectors computed."""
    load(qtbot, window, tiny_model_dirs["tiny-a"])
    compute(qtbot, window)
    return window


def test_model_loads_and_status_bar_shows_it(qtbot, window, tiny_model_dirs):
    load(qtbot, window, tiny_model_dirs["tiny-a"])
    text = window.model_label.text()
    assert "cpu" in text and "float32" in text and "4 layers" in text
    assert window.generation_panel.layers.count() == 4


def test_compute_shows_progress_and_diagnostics(qtbot, window, tiny_model_dirs):
    load(qtbot, window, tiny_model_dirs["tiny-a"])
    seen = []
    window.controller.progress.connect(lambda kind, done, total, msg: seen.append((kind, done, total)))
    window.vector_panel.batch.setValue(4)
    compute(qtbot, window)
    assert any(kind == "compute" and total > 0 for kind, _, total in seen)
    done = [d for k, d, t in seen if k == "compute" and t > 0]
    assert done == sorted(done) and done[-1] == [t for k, _, t in seen if k == "compute" and t > 0][-1]
    vp = window.vector_panel
    assert len(vp.sets()) == 1 and vp.sets()[0].usable
    heat = vp.diag.data()
    assert heat.shape[0] == 4 and heat.shape[1] > 10  # layers x (base | target) examples
    assert window.generation_panel.vector.currentData() == vp.sets()[0].name


def test_cancel_compute(qtbot, window, tiny_model_dirs):
    load(qtbot, window, tiny_model_dirs["tiny-a"])
    window.dataset_panel.load_bundled("neutral_rude")
    window.vector_panel.batch.setValue(1)
    with qtbot.waitSignal(window.controller.job_cancelled, timeout=30000) as blocker:
        qtbot.mouseClick(window.vector_panel.compute_button, Qt.MouseButton.LeftButton)
        qtbot.mouseClick(window.vector_panel.cancel_button, Qt.MouseButton.LeftButton)
    assert blocker.args == ["compute"]
    assert window.vector_panel.sets() == []
    assert window.vector_panel.compute_button.isEnabled()


def test_generate_streams_both_panes_and_fills_heatmap(qtbot, ready):
    gp = ready.generation_panel
    chunks = {0: [], 1: []}
    ready.controller.text_generated.connect(lambda row, c: chunks[row].append(c))
    results = generate(qtbot, ready, tokens=16)
    assert len(results) == 2
    assert chunks[0] and chunks[1], "both rows stream"
    assert gp.unsteered_view.toPlainText() == results[0].text
    assert gp.steered_view.toPlainText() == results[1].text
    heat = gp.heatmap.data()
    assert heat.shape == (4, len(results[1].token_ids))
    assert np.isfinite(heat).all()
    # hovering a cell describes token, layer and value
    assert "layer 2" in gp.heatmap.describe_cell(2, 0) and "token 0" in gp.heatmap.describe_cell(2, 0)


def test_ctrl_enter_generates(qtbot, ready):
    gp = ready.generation_panel
    gp.max_tokens.setValue(4)
    gp.prompt.setFocus()
    with qtbot.waitSignal(gp.finished, timeout=30000):
        qtbot.keyClick(gp.prompt, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)


def test_stop_mid_stream_emits_nothing_after(qtbot, ready):
    gp = ready.generation_panel
    gp.max_tokens.setValue(2000)
    after_stop = []
    stopped = {"flag": False}

    def on_text(row, chunk):
        if stopped["flag"]:
            after_stop.append(chunk)

    ready.controller.text_generated.connect(on_text)
    ready.controller.tokens_generated.connect(lambda steps: after_stop.extend(steps) if stopped["flag"] else None)
    qtbot.mouseClick(gp.generate_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: len(gp.steered_view.toPlainText()) > 5, timeout=30000)
    with qtbot.waitSignal(ready.controller.job_cancelled, timeout=5000):
        qtbot.mouseClick(gp.stop_button, Qt.MouseButton.LeftButton)
        stopped["flag"] = True
        shown = gp.steered_view.toPlainText()
    qtbot.wait(200)
    assert after_stop == []
    assert gp.steered_view.toPlainText() == shown
    assert gp.generate_button.isEnabled() and not ready.controller.busy
    # the stopped run is still recorded, with its real duration, and marked stopped in the history
    history = ready.analysis_panel.history
    qtbot.waitUntil(lambda: any(r.kind == "generate" for r in history.records), timeout=5000)
    rec = next(r for r in history.records if r.kind == "generate")
    assert rec.seconds > 0 and {row["finish_reason"] for row in rec.outputs["rows"]} == {"stopped"}
    assert history.list.item(history.records.index(rec)).text().endswith("(stopped)")


def test_runs_are_recorded_with_their_real_duration(qtbot, ready):
    generate(qtbot, ready, tokens=4)
    history = ready.analysis_panel.history
    qtbot.waitUntil(lambda: [r.kind for r in history.records] == ["compute", "generate"], timeout=5000)
    assert all(r.seconds > 0 for r in history.records)
    assert not history.list.item(1).text().endswith("(stopped)")


def test_new_request_drops_the_stale_one(qtbot, ready):
    gp = ready.generation_panel
    finished = []
    gp.finished.connect(lambda result: finished.append(result.rows))
    gp.max_tokens.setValue(2000)
    gp.prompt.setPlainText("first prompt")
    qtbot.mouseClick(gp.generate_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: len(gp.steered_view.toPlainText()) > 0, timeout=30000)
    # The window disables Generate while busy; a caller (e.g. a sweep cell click) can still supersede.
    gp.prompt.setPlainText("second prompt")
    gp.max_tokens.setValue(6)
    gp.generate()
    qtbot.waitUntil(lambda: not ready.controller.busy, timeout=30000)
    assert len(finished) == 1
    assert all(len(r.token_ids) <= 6 for r in finished[0])
    assert gp.steered_view.toPlainText() == finished[0][1].text


def test_switching_models_refuses_old_vectors(qtbot, ready, tiny_model_dirs):
    old = ready.vector_panel.sets()[0]
    load(qtbot, ready, tiny_model_dirs["tiny-b"])
    item = ready.vector_panel.sets()[0]
    assert not item.usable and "hidden size 64 vs 32" in item.reason
    gp = ready.generation_panel
    idx = gp.vector.findData(old.name)
    assert not gp.vector.model().item(idx).isEnabled()
    assert gp.current_set() is None
    # Even if a caller submits them directly, the job refuses the vectors with a sentence.
    from steerdesk.core.generate import SamplingSettings
    from steerdesk.jobs import GenerateSpec, SteeringSpec

    with qtbot.waitSignal(ready.controller.failed, timeout=30000) as blocker:
        ready.controller.submit(GenerateSpec(prompts=("hi",), steering=SteeringSpec(old.vectors, (0,)),
                                             sampling=SamplingSettings(max_new_tokens=2)))
    assert "made for" in blocker.args[0].message


def test_worker_exception_shows_dialog_and_next_request_works(qtbot, ready, monkeypatch):
    import steerdesk.core.generate as gen

    real = gen.generate
    calls = {"n": 0}

    def broken(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom in the worker")
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "generate", broken)
    with qtbot.waitSignal(ready.controller.failed, timeout=30000) as blocker:
        qtbot.mouseClick(ready.generation_panel.generate_button, Qt.MouseButton.LeftButton)
    error = blocker.args[0]
    assert not error.user_error and "boom in the worker" in error.message and "Traceback" in error.details
    dialog = ready._dialogs[-1]
    assert dialog.isVisible() and "boom" in dialog.text() and "RuntimeError" in dialog.detailedText()
    dialog.close()
    results = generate(qtbot, ready, tokens=4)
    assert len(results) == 2 and ready.generation_panel.generate_button.isEnabled()


def test_user_error_is_a_dialog_not_a_crash(qtbot, ready):
    ready.generation_panel.prompt.setPlainText("   ")
    qtbot.mouseClick(ready.generation_panel.generate_button, Qt.MouseButton.LeftButton)
    assert "prompt" in ready._dialogs[-1].text().lower()
    assert not ready.controller.busy


def test_settings_are_restored(qtbot, tmp_path, monkeypatch, tiny_model_dirs):
    monkeypatch.setenv("STEERDESK_SETTINGS", str(tmp_path / "s.ini"))
    from steerdesk.ui.main_window import MainWindow
    from steerdesk.ui.recovery import RecoveryStore

    def make():
        w = MainWindow(recovery=RecoveryStore(tmp_path / "rec"))
        w._confirm_close = lambda: True
        qtbot.addWidget(w)
        return w

    w = make()
    w.generation_panel.scale.setValue(2.5)
    w.generation_panel.prompt.setPlainText("remember me")
    w.vector_panel.method.setCurrentIndex(1)
    w.close()
    w2 = make()
    assert w2.generation_panel.scale.value() == 2.5
    assert w2.generation_panel.prompt.toPlainText() == "remember me"
    assert w2.vector_panel.method.currentData() == "pca"
    w2.close()


def test_screenshot_of_main_window(qtbot, ready):
    generate(qtbot, ready, tokens=12)
    ready.resize(1600, 1000)
    ARTIFACTS.mkdir(exist_ok=True)
    out = ARTIFACTS / "main_window.png"
    assert ready.grab().save(str(out))
    assert out.stat().st_size > 10_000


def test_window_modules_do_not_import_torch():
    code = ("import sys; import steerdesk.ui.main_window, steerdesk.ui.launch; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "print(bad); raise SystemExit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**__import__('os').environ, "QT_QPA_PLATFORM": "offscreen"})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_core_never_imports_qt():
    code = ("import sys, pkgutil, importlib, steerdesk.core as c; "
            "[importlib.import_module('steerdesk.core.' + m.name) for m in pkgutil.iter_modules(c.__path__)]; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('PySide6', 'pyqtgraph', 'shiboken6')]; "
            "print(bad); raise SystemExit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_vector_save_export_and_load_buttons(qtbot, ready, tmp_path, monkeypatch):
    vp = ready.vector_panel
    target = {"path": str(tmp_path / "mine")}
    monkeypatch.setattr(vp, "_ask_save_path", lambda *a: target["path"])
    qtbot.mouseClick(vp.save_button, Qt.MouseButton.LeftButton)
    assert (tmp_path / "mine.safetensors").is_file()
    qtbot.mouseClick(vp.export_button, Qt.MouseButton.LeftButton)
    assert (tmp_path / "mine.gguf").is_file()
    for name in ("mine.safetensors", "mine.gguf"):
        monkeypatch.setattr(vp, "_ask_open_path", lambda *a, n=name: str(tmp_path / n))
        qtbot.mouseClick(vp.load_button, Qt.MouseButton.LeftButton)
    assert [s.usable for s in vp.sets()] == [True, True, True]
    orig, from_st, from_gguf = (s.vectors.directions for s in vp.sets())
    assert np.array_equal(orig.numpy(), from_st.numpy())
    assert np.array_equal(orig[1:].numpy(), from_gguf[1:].numpy())  # GGUF has no slot for block 0


def test_heatmap_png_export_and_values(qtbot, ready, tmp_path):
    generate(qtbot, ready, tokens=6)
    heat = ready.generation_panel.heatmap
    out = tmp_path / "heat.png"
    assert heat.export_png(str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not heat.export_png(str(tmp_path / "no" / "such" / "dir.png"))
    lines = heat.values_tsv().splitlines()
    assert len(lines) == 4 and lines[0].startswith("layer 3\t")
