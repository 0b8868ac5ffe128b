"""The Analysis dock's generation grid takes the generation pane's token window and gate (issue 15, item 5)."""

from __future__ import annotations

import pytest
from PySide6.QtCore import Qt
from test_generation_gate import type_positions
from test_window import compute, load

from steerdesk.core.generate import generate
from steerdesk.ui.panels.inputs import Refused


def test_grid_uses_the_panes_window_and_refuses_a_bad_one(qtbot, window, tiny_model_dirs):
    load(qtbot, window, tiny_model_dirs["tiny-a"])
    compute(qtbot, window)
    gp, ap = window.generation_panel, window.analysis_panel
    ap.grid.layers.setText("1")
    ap.grid.scales.setText("4")
    ap.grid.tokens.setValue(5)
    type_positions(qtbot, gp, "gen:5-2")
    with pytest.raises(Refused, match="0 <= A <= B"):
        ap.grid_spec()  # a bad window is one line, nothing runs
    type_positions(qtbot, gp, "first:2")
    spec = ap.grid_spec()
    assert spec.positions == "first:2" and spec.gate is None
    with qtbot.waitSignal(window.controller.finished, timeout=120000,
                          check_params_cb=lambda n, _r: n == "grid") as blocker:
        qtbot.mouseClick(ap.grid.run_button, Qt.MouseButton.LeftButton)
    rows = blocker.args[1]
    steered = [r for r in rows if r.scale == 4.0]
    assert steered
    # independent: the same steering through generate alone, with the window, token for token
    from steerdesk.core.models import load_model
    from steerdesk.core.steering import steers_for

    lm = load_model(tiny_model_dirs["tiny-a"], device="cpu", dtype="float32")
    for row in steered:
        steer = steers_for(spec.vectors.directions, [1], scale=4.0, mode=spec.mode, normalize=spec.normalize,
                           positions="first:2")
        alone = generate(lm, [row.prompt], steer, sampling=spec.sampling)[0]
        assert row.token_ids == alone.token_ids and row.text == alone.text
