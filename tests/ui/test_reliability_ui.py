"""Bad input and shutdown in the window: clear messages, nothing lost, no dangling thread."""

from __future__ import annotations

import json
import time

import pytest
from PySide6.QtCore import Qt


def test_100k_row_dataset_loads_and_stays_editable(qtbot, tmp_path):
    from steerdesk.ui.panels.dataset_panel import DatasetPanel
    from steerdesk.ui.recovery import RecoveryStore

    big = tmp_path / "big.jsonl"
    with big.open("w") as fh:
        for i in range(100_000):
            fh.write(json.dumps({"prompt": f"q{i}", "base": f"polite {i}", "target": f"rude {i}"}) + "\n")
    panel = DatasetPanel(recovery=RecoveryStore(tmp_path / "rec"))
    qtbot.addWidget(panel)
    panel.show()
    messages = []
    panel.status_message.connect(messages.append)
    assert panel.load_file(str(big))
    assert len(panel.dataset()) == 100_000
    assert messages[0].startswith("Loading big.jsonl") and "100,000 rows" in messages[-1].replace("100000", "100,000")
    model = panel.model()
    model.setData(model.index(99_999, 2), "edited rude")
    assert panel.dataset().examples[99_999].target == "edited rude" and panel.is_modified()


def test_malformed_file_in_the_window_is_a_dialog_and_keeps_the_table(qtbot, window, tmp_path):
    window.dataset_panel.load_bundled("neutral_rude")
    before = len(window.dataset_panel.dataset())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"base": "a", "target": "b"}\n{"base": 3, "target": "b"}\n', encoding="utf-8")
    assert not window.dataset_panel.load_file(str(bad))
    dialog = window._dialogs[-1]
    assert "line 2" in dialog.text() and "'base' must be a string" in dialog.text()
    assert len(window.dataset_panel.dataset()) == before


def test_wrong_model_vector_file_is_refused_with_a_sentence(qtbot, window, tiny_model_dirs, tmp_path):
    import torch

    from steerdesk.core.vectors import VectorSet, save_vectors

    with qtbot.waitSignal(window.controller.model_ready, timeout=60000):
        window.load_model(tiny_model_dirs["tiny-a"])
    other = VectorSet(torch.ones(12, 768), torch.ones(12), {
        "format": "steerdesk.vectors/1", "model": "gpt2", "architecture": "GPT2LMHeadModel", "num_layers": "12",
        "hidden_size": "768", "method": "mean-diff", "read_position": "last", "layer_convention": "block_output"})
    path = tmp_path / "gpt2.safetensors"
    save_vectors(other, path)
    item = window.vector_panel.load_file(str(path))
    assert item is not None and not item.usable
    assert "made for gpt2" in window._dialogs[-1].text()
    assert window.generation_panel.current_set() is None


def test_corrupted_vector_file_is_a_dialog(qtbot, window, tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert window.vector_panel.load_file(str(path)) is None
    assert "broken.safetensors" in window._dialogs[-1].text()


def test_missing_model_path_is_a_dialog_and_app_stays_usable(qtbot, window, tiny_model_dirs):
    with qtbot.waitSignal(window.controller.failed, timeout=30000) as blocker:
        window.load_model("/no/such/model/folder")
    assert "does not exist" in blocker.args[0].message and blocker.args[0].user_error
    assert window.model_label.text() == "no model"
    with qtbot.waitSignal(window.controller.model_ready, timeout=60000):
        window.load_model(tiny_model_dirs["tiny-a"])


@pytest.mark.parametrize("job", ["compute", "generate"])
def test_closing_during_a_job_exits_within_3_s(qtbot, window, tiny_model_dirs, job):
    with qtbot.waitSignal(window.controller.model_ready, timeout=60000):
        window.load_model(tiny_model_dirs["tiny-a"])
    window.dataset_panel.load_bundled("neutral_rude")
    if job == "compute":
        window.vector_panel.batch.setValue(1)
        qtbot.mouseClick(window.vector_panel.compute_button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: window.vector_panel.progress.value() > 0, timeout=30000)
    else:
        window.generation_panel.max_tokens.setValue(4000)
        qtbot.mouseClick(window.generation_panel.generate_button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: len(window.generation_panel.unsteered_view.toPlainText()) > 0, timeout=30000)
    t0 = time.perf_counter()
    window.close()
    assert window.controller.thread.isFinished()
    assert time.perf_counter() - t0 < 3.0
