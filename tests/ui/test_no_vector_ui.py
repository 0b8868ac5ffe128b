"""Issue 10, kind 1 in the window: layers a vector set has no direction for are greyed out and
can never be steered; the grid marks their cells "no vector"; diagnostics show no value."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


def test_gguf_set_greys_out_block_0_and_refuses_it(qtbot, window, tiny_model_dirs, tmp_path, monkeypatch):
    with qtbot.waitSignal(window.controller.model_ready, timeout=60000):
        window.load_model(tiny_model_dirs["tiny-a"])
    window.dataset_panel.load_bundled("neutral_rude")
    with qtbot.waitSignal(window.vector_panel.vectors_ready, timeout=60000):
        qtbot.mouseClick(window.vector_panel.compute_button, Qt.MouseButton.LeftButton)
    vp, gp = window.vector_panel, window.generation_panel
    monkeypatch.setattr(vp, "_ask_save_path", lambda *a: str(tmp_path / "v"))
    qtbot.mouseClick(vp.export_button, Qt.MouseButton.LeftButton)
    monkeypatch.setattr(vp, "_ask_open_path", lambda *a: str(tmp_path / "v.gguf"))
    qtbot.mouseClick(vp.load_button, Qt.MouseButton.LeftButton)
    gguf_set = vp.sets()[-1]
    gp.select_vectors(gguf_set.name)
    assert gp.current_set() is gguf_set
    item0 = gp.layers.item(0)
    assert not item0.flags() & Qt.ItemFlag.ItemIsEnabled and not item0.flags() & Qt.ItemFlag.ItemIsSelectable
    assert "no direction for layer 0" in item0.toolTip()
    assert all(gp.layers.item(i).flags() & Qt.ItemFlag.ItemIsEnabled for i in range(1, gp.layers.count()))
    # A click on the greyed layer selects nothing; asking for it anyway is one clear message.
    gp.layers.clearSelection()
    rect = gp.layers.visualItemRect(item0)
    qtbot.mouseClick(gp.layers.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    assert gp.selected_layers() == []
    qtbot.mouseClick(gp.generate_button, Qt.MouseButton.LeftButton)
    assert "Select at least one layer" in window._dialogs[-1].text()
    window._dialogs[-1].close()
    item0.setSelected(True)  # even forced past the picker, the request refuses
    if gp.selected_layers() == [0]:
        qtbot.mouseClick(gp.generate_button, Qt.MouseButton.LeftButton)
        assert "no direction for layer 0" in window._dialogs[-1].text()
        window._dialogs[-1].close()
    # Switching back to the safetensors set makes layer 0 usable again.
    gp.select_vectors(vp.sets()[0].name)
    assert gp.layers.item(0).flags() & Qt.ItemFlag.ItemIsEnabled
    gp.select_vectors(gguf_set.name)
    ARTIFACTS.mkdir(exist_ok=True)
    assert gp.grab().save(str(ARTIFACTS / "no_vector_layer_picker.png"))


def test_grid_tab_shows_no_vector_cells(qtbot):
    from steerdesk.core.textgrid import GridRow
    from steerdesk.ui.panels.analysis_panel import GridTab

    tab = GridTab()
    qtbot.addWidget(tab)
    tab.start()
    tab.add_row(GridRow(None, 0.0, "p", "plain text"))
    tab.add_row(GridRow(0, 4.0, "p", None, None, no_vector=True))
    assert tab.table.item(1, 3).text().startswith("no vector")
    assert tab.table.item(0, 3).text() == "plain text"


def test_model_switch_really_frees_memory(monkeypatch):
    """Issue 12: the worker's recovery after a model switch runs (it used to be skipped)."""
    import torch

    from steerdesk.ui.worker import ModelWorker

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty"))
    ModelWorker._free_memory()
    assert calls == ["empty"]
    worker = ModelWorker()
    worker._recover_memory(MemoryError())
    worker._recover_memory(ValueError())
    assert calls == ["empty", "empty"]
