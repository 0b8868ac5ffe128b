"""The sweep heatmap in the window: fills live cell by cell; clicking a cell drives the generation pane."""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import QPointF, Qt
from test_window import compute, load


def click_cell(qtbot, heatmap, row, col):
    """Click the centre of a heatmap cell with the mouse, as a person would."""
    vb = heatmap.plot.getViewBox()
    scene = vb.mapViewToScene(QPointF(col + 0.5, row + 0.5))
    pos = heatmap.plot.mapFromScene(scene)
    qtbot.mouseClick(heatmap.plot.viewport(), Qt.MouseButton.LeftButton, pos=pos)


def test_sweep_fills_live_and_click_generates(qtbot, window, tiny_model_dirs):
    load(qtbot, window, tiny_model_dirs["tiny-a"])
    compute(qtbot, window)
    sp = window.sweep_panel
    sp.layers.setText("1,2")
    sp.scales.setText("0,1,4")
    sp.max_pairs.setValue(4)
    cells = []
    sp.controller.partial.connect(lambda kind, cell: cells.append(cell) if kind == "sweep" else None)
    with qtbot.waitSignal(window.controller.finished, timeout=120000) as blocker:
        qtbot.mouseClick(sp.run_button, Qt.MouseButton.LeftButton)
    name, result = blocker.args
    assert name == "sweep"
    assert len(cells) == 6  # every cell arrived on its own, before the end
    margin = sp.margin()
    assert margin.shape == (2, 3) and np.isfinite(margin).all()
    assert np.allclose(margin[:, 0], 0.0, atol=1e-5)  # scale 0 = unsteered
    assert np.allclose(margin, np.array(result.margin_delta, dtype=np.float32), atol=1e-6)
    assert sp.save_button.isEnabled() and "scale" in sp.summary.text()
    labels = [label for _, label in sp.heatmap.plot.getAxis("left")._tickLevels[0]]
    assert labels == ["1", "2"]  # rows are labelled with the swept layers

    sp.resize(700, 700)
    sp.show()
    qtbot.wait(50)
    with qtbot.waitSignal(window.generation_panel.finished, timeout=60000):
        click_cell(qtbot, sp.heatmap, 1, 2)
    gp = window.generation_panel
    assert gp.selected_layers() == [2] and gp.scale.value() == 4.0
    assert gp.steered_view.toPlainText()


def test_sweep_needs_a_heldout_split(qtbot, window, tiny_model_dirs):
    load(qtbot, window, tiny_model_dirs["tiny-a"])
    compute(qtbot, window)
    window.dataset_panel.set_heldout_fraction(0.0)
    qtbot.mouseClick(window.sweep_panel.run_button, Qt.MouseButton.LeftButton)
    assert "held-out" in window._dialogs[-1].text().lower()
    assert not window.controller.busy


def test_no_vector_rows_are_hatched_labelled_and_not_clickable(qtbot):
    """A row the vector set has no direction for (GGUF block 0) shows "no vector", never a value."""
    import pyqtgraph as pg
    import torch

    from steerdesk.core.sweep import FORMAT, SweepResult
    from steerdesk.ui.panels.sweep_panel import SweepPanel

    sp = SweepPanel()
    qtbot.addWidget(sp)
    directions = torch.ones(3, 4)
    directions[0] = 0  # what a GGUF import gives for block 0
    sp.start([0, 1, 2], {"zero+two": [0, 2]}, [0.0, 1.0], 0.5, vectors=directions)
    assert sp.no_vector_rows() == [0, 3]

    def labels():
        return [item.textItem.toPlainText() for item in sp._overlays if isinstance(item, pg.TextItem)]

    assert labels() == ["no vector", "no vector"]
    assert "no vector" in sp._describe(0, 1, float("nan")) and "not evaluated" in sp._describe(3, 0, float("nan"))
    result = SweepResult.from_dict({
        "format": FORMAT, "layers": [0, 1, 2], "scales": [0.0, 1.0], "fluency_budget": 0.5,
        "margin_delta": [[None, None], [0.0, 0.25], [0.0, -0.1]],
        "fluency_delta": [[None, None], [0.0, -0.1], [0.0, -0.2]], "no_vector": [True, False, False],
        "sets": [{"name": "zero+two", "layers": [0, 2], "margin_delta": [None, None],
                  "fluency_delta": [None, None], "no_vector": True}],
        "best": {"row": 1, "col": 1, "layer": 1, "set": None, "layers": [1], "scale": 1.0,
                 "margin_delta": 0.25, "fluency_delta": -0.1}})
    sp.finish(result)
    assert sp.no_vector_rows() == [0, 3] and labels() == ["no vector", "no vector"]
    assert np.isnan(sp.margin()[0]).all() and np.isnan(sp.margin()[3]).all()  # blank, never 0
    assert "No vector (not evaluated): layer 0, set zero+two (0,2)" in sp.summary.text()
    sp.resize(600, 600)
    sp.show()
    qtbot.wait(50)
    chosen, messages = [], []
    sp.cell_chosen.connect(lambda choice: chosen.append((choice.layers, choice.scale)))
    sp.status_message.connect(messages.append)
    click_cell(qtbot, sp.heatmap, 0, 1)
    assert chosen == [] and "no vector" in messages[-1]
    click_cell(qtbot, sp.heatmap, 1, 1)
    assert chosen == [([1], 1.0)]
