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


def test_a_stopped_sweep_keeps_the_views_of_a_finished_one(qtbot):
    from steerdesk.ui.panels.sweep_panel import SweepPanel

    sp = SweepPanel()
    qtbot.addWidget(sp)
    sp.start([0, 1, 2], {}, [0.0, 1.0, 2.0], 0.5)
    sp._swept, sp._swept_with = "rude", ("clamp", False, "all")
    sp.set_cell(0, 1, 0.2, -0.1)
    sp.set_cell(1, 1, 0.4, -0.2)
    sp.set_cell(1, 2, 0.9, -0.9)  # more margin, beyond the budget: not the best
    sp.stopped()
    assert sp.summary.text().startswith("Stopped after 3 of 9 cells. Best so far within the fluency budget: "
                                        "layer 1 at scale 1 — margin +0.400.")
    xs, ys = sp.best_marker.getData()
    assert (list(xs), list(ys)) == ([1.5], [1.5])  # the best so far is starred
    assert "margin +0.400" in sp._describe(1, 1, 0.4)  # hover works on the stopped run
    sp.resize(600, 600)
    sp.show()
    qtbot.wait(50)
    chosen = []
    sp.cell_chosen.connect(chosen.append)
    click_cell(qtbot, sp.heatmap, 1, 1)
    assert [(c.name, c.layers, c.scale, c.mode) for c in chosen] == [("rude", [1], 1.0, "clamp")]
