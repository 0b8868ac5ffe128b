"""The sweep panel says which vector set it scores, and a clicked cell loads the cell's full
settings (mode, normalize, positions too) into the generation pane and says so (issue 13)."""

from __future__ import annotations

from PySide6.QtCore import Qt
from test_sweep_panel import click_cell
from test_window import compute, load


def test_sweep_names_its_vector_and_a_cell_loads_its_full_settings(qtbot, window, tiny_model_dirs):
    load(qtbot, window, tiny_model_dirs["tiny-a"])
    compute(qtbot, window)
    sp, gp = window.sweep_panel, window.generation_panel
    name = gp.current_set().name
    assert f"<b>{name}</b>" in sp.scored.text() and "Run sweep scores" in sp.scored.text()
    sp.layers.setText("1,2")
    sp.scales.setText("0,1")
    sp.max_pairs.setValue(4)
    sp.mode.setCurrentIndex(sp.mode.findData("clamp"))
    with qtbot.waitSignal(window.controller.finished, timeout=120000):
        qtbot.mouseClick(sp.run_button, Qt.MouseButton.LeftButton)
        assert sp.scored.text().startswith(f"Scoring <b>{name}</b> (clamp)")
    assert sp.scored.text().startswith(f"Shown: the sweep of <b>{name}</b> (clamp).")
    # The pane was set up differently, and the sweep's mode box changed after the run.
    gp.mode.setCurrentIndex(gp.mode.findData("add"))
    gp.normalize.setChecked(True)
    gp.positions.setCurrentIndex(gp.positions.findData("prompt"))
    sp.mode.setCurrentIndex(sp.mode.findData("project"))
    messages = []
    gp.status_message.connect(messages.append)
    sp.resize(700, 700)
    sp.show()
    qtbot.wait(50)
    with qtbot.waitSignal(gp.finished, timeout=60000):
        click_cell(qtbot, sp.heatmap, 1, 1)
    assert gp.mode.currentData() == "clamp"  # the mode the cell was scored with
    assert not gp.normalize.isChecked() and gp.positions.currentData() == "all"
    assert gp.selected_layers() == [2] and gp.scale.value() == 1.0
    assert any(m.startswith(f"Loaded the sweep cell: {name}, layer 2, scale 1, mode clamp, normalize off, "
                            "positions all") for m in messages), messages
