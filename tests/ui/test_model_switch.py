"""Start-up and model switches (issue 13): a load shows its steps and % in the window (a first-start
conversion says what is happening), and a failed switch keeps the model that was loaded and working."""

from __future__ import annotations

import shutil

from PySide6.QtCore import Qt


def _labels_during(qtbot, window, spec, *, signal="model_ready"):
    seen = []
    window.controller.progress.connect(lambda kind, d, t, m: seen.append((kind, d, t, window.model_label.text(),
                                                                         window.busy_bar.maximum())))
    with qtbot.waitSignal(getattr(window.controller, signal), timeout=60000):
        window.load_model(spec)
    return [s for s in seen if s[0] == "load"]


def test_a_load_shows_its_steps_and_percent(qtbot, window, tiny_model_dirs):
    seen = _labels_during(qtbot, window, tiny_model_dirs["tiny-a"])
    labels = [s[3] for s in seen]
    assert any("step 1/2" in t and "reading the tokenizer" in t and "(0%)" in t for t in labels), labels
    assert any("step 2/2" in t and "reading the weights" in t and "(50%)" in t for t in labels), labels
    assert any(s[4] == 2 for s in seen)  # the busy bar counts the steps
    assert "4 layers" in window.model_label.text()  # and then describes the model


def test_first_start_conversion_says_what_happens(qtbot, window, tiny_model_dirs, tmp_path, monkeypatch):
    """The embedded model's one-time conversion (100 s for real) with the conversion itself faked."""
    import steerdesk.core.models as models

    cached = tmp_path / "converted"
    monkeypatch.setattr(models, "resolve_source", lambda spec: (str(tmp_path), "smollm2.gguf"))
    monkeypatch.setattr(models, "_gguf_cache_folder", lambda folder, gguf: cached)

    def convert(folder, gguf_file, target, progress, step=None):
        for phase in ("reading the tokenizer", "de-quantising the weights", "writing the converted copy"):
            step(phase)
        shutil.copytree(tiny_model_dirs["tiny-a"], target)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    seen = _labels_during(qtbot, window, "default")
    labels = [s[3] for s in seen]
    assert any("Converting the embedded model once; next starts take seconds" in t and "step 2/5" in t
               and "de-quantising" in t and "(20%)" in t for t in labels), labels
    assert any("step 5/5" in t and "(80%)" in t for t in labels), labels


def test_a_failed_switch_keeps_the_working_model(qtbot, window, tiny_model_dirs):
    with qtbot.waitSignal(window.controller.model_ready, timeout=60000):
        window.load_model(tiny_model_dirs["tiny-a"])
    info = window.controller.model_info
    label = window.model_label.text()
    with (qtbot.waitSignal(window.controller.model_kept, timeout=30000),
          qtbot.waitSignal(window.controller.failed, timeout=30000) as failed):
        window.load_model("/no/such/model/folder")
    assert "does not exist" in failed.args[0].message
    assert window.controller.model_info is info and window.model_label.text() == label
    assert "Kept" in window.statusBar().currentMessage()
    # ... and it works: a generation runs on it (no "wait for the model to load").
    window.generation_panel.max_tokens.setValue(4)
    with qtbot.waitSignal(window.generation_panel.finished, timeout=60000) as done:
        qtbot.mouseClick(window.generation_panel.generate_button, Qt.MouseButton.LeftButton)
    assert done.args[0].rows and not any("No model" in getattr(d, "text", lambda: "")() for d in window._dialogs)
    # The remembered model is still the one that works.
    assert window._settings.value("models/last") == tiny_model_dirs["tiny-a"]
