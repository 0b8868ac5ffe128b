"""The sweep panel's positions field (token windows) and gate controls (issue 15, item 5), clicked and
typed as a user would: the SweepSpec carries the window and the ConditionGate; a bad window, a missing
or non-condition file is one line and submits nothing; the panel fits the window at 1366x768."""

from __future__ import annotations

import pytest
import torch
from PySide6.QtCore import Qt
from test_panel_specs import INFO, RecordingController, click, vectors
from test_sweep_panel import click_cell
from test_window import ARTIFACTS

from steerdesk import jobs
from steerdesk.core.vectors import VectorSet, save_vectors


@pytest.fixture
def bench(qtbot):
    from steerdesk.ui.panels.dataset_panel import DatasetPanel
    from steerdesk.ui.panels.sweep_panel import SweepPanel
    from steerdesk.ui.vector_sets import VectorSets

    c = RecordingController()
    sets = VectorSets()
    c.model_ready.connect(sets.set_model_info)
    dp = DatasetPanel()
    sp = SweepPanel(c, sets, pairs=dp)
    errors: list = []
    for w in (dp, sp):
        qtbot.addWidget(w)
        w.resize(640, 700)
        w.show()
    sp.error_occurred.connect(lambda title, message: errors.append((title, message)))
    dp.load_bundled("neutral_rude")
    dp.set_heldout_fraction(0.25)
    c.load()
    sets.select(sets.add(vectors(), "rude").name)  # as the Vectors panel selects a computed set
    return c, sp, errors


def condition_file(path, kind="condition"):
    torch.manual_seed(4)
    cs = VectorSet(torch.randn(4, INFO.hidden_size), torch.full((4,), 2.0), {
        "format": "steerdesk.vectors/1", "model": "tiny", "architecture": "LlamaForCausalLM", "num_layers": "4",
        "hidden_size": str(INFO.hidden_size), "method": "mean-diff", "layer_convention": "block_output",
        **({"kind": "condition", "read_position": "prompt-last"} if kind == "condition" else
           {"read_position": "last"})})
    save_vectors(cs, path)
    return cs


def retype(qtbot, edit, text):
    edit.selectAll()
    qtbot.keyClick(edit, Qt.Key.Key_Delete)
    qtbot.keyClicks(edit, text)


def test_window_and_gate_go_into_the_spec(qtbot, bench, tmp_path):
    c, sp, errors = bench
    cs = condition_file(tmp_path / "cooking.safetensors")
    retype(qtbot, sp.positions, "first:3")
    qtbot.keyClicks(sp.condition, str(tmp_path / "cooking.safetensors"))
    sp.gate_layer.setValue(2)
    sp.threshold.setValue(0.125)
    sp.gate_side.setCurrentIndex(sp.gate_side.findData("below"))
    click(qtbot, sp.run_button)
    assert not errors
    (spec,) = c.specs
    assert isinstance(spec, jobs.SweepSpec)
    assert spec.positions == "first:3"
    g = spec.gate
    assert (g.layer, g.threshold, g.side, g.read) == (2, 0.125, "below", "last")
    assert torch.equal(g.direction, cs.directions[2])
    # A clicked cell hands over the sweep's full settings: the window and the gate.
    chosen = []
    sp.cell_chosen.connect(chosen.append)
    qtbot.wait(50)
    click_cell(qtbot, sp.heatmap, 0, 1)
    (cell,) = chosen
    assert cell.positions == "first:3" and cell.layers == [0] and cell.scale == 0.5
    assert (cell.gate.layer, cell.gate.threshold, cell.gate.side) == (2, 0.125, "below")
    assert torch.equal(cell.gate.conditions.directions, cs.directions)
    assert "gate at layer 2 (below 0.125)" in cell.describe()
    # The finished result's gate decisions are summarised under the heatmap.
    from steerdesk.core.sweep import SweepResult

    rows = [[0.0, 0.1, 0.2, 0.3, 0.4] for _ in spec.layers]
    result = SweepResult(layers=list(spec.layers), scales=list(spec.scales), margin_delta=rows,
                         fluency_delta=[[0.0] * 5 for _ in rows], kl=None, sets=[], baseline={}, fluency_budget=0.5,
                         best=None, settings={"positions": "first:3"}, model={}, vector={}, dataset={},
                         gate={"n_open": 3, "n_prompts": 7})
    c.handles[0].finished.emit(result)
    assert "Gate open for 3 of 7 prompts" in sp.summary.text()


def test_without_a_condition_there_is_no_gate(qtbot, bench):
    c, sp, _ = bench
    retype(qtbot, sp.positions, "prompt:0-4")
    click(qtbot, sp.run_button)
    (spec,) = c.specs
    assert spec.positions == "prompt:0-4" and spec.gate is None
    chosen = []
    sp.cell_chosen.connect(chosen.append)
    qtbot.wait(50)
    click_cell(qtbot, sp.heatmap, 1, 2)
    assert chosen[0].gate is None and chosen[0].positions == "prompt:0-4"


@pytest.mark.parametrize("case,match", [
    ("window", "0 <= A <= B"), ("unknown", "Unknown positions"), ("missing", "not found"),
    ("steering", "not condition vectors"), ("layer", "out of range"),
])
def test_bad_window_or_gate_is_one_line_and_submits_nothing(qtbot, bench, tmp_path, case, match):
    c, sp, errors = bench
    if case == "window":
        retype(qtbot, sp.positions, "gen:4-2")
    elif case == "unknown":
        retype(qtbot, sp.positions, "middle")
    elif case == "missing":
        qtbot.keyClicks(sp.condition, str(tmp_path / "nope.safetensors"))
    else:
        condition_file(tmp_path / "c.safetensors", kind="condition" if case == "layer" else "steering")
        qtbot.keyClicks(sp.condition, str(tmp_path / "c.safetensors"))
        sp.gate_layer.setValue(9 if case == "layer" else 1)
    click(qtbot, sp.run_button)
    assert c.specs == []
    title, message = errors[-1]
    assert title == "Cannot run the sweep" and match in message and "\n" not in message
    assert sp.run_button.isEnabled()
    assert sp.positions.text() and sp.condition.text() == ("" if case in ("window", "unknown") else sp.condition.text())


def test_sweep_dock_at_1366x768(qtbot, window):
    window.resize(1366, 768)
    window.sweep_dock.raise_()
    qtbot.wait(100)
    sp = window.sweep_panel
    assert sp.positions.isVisible() and sp.condition.isVisible() and sp.gate_side.isVisible()
    # The gate row fits: every control is at least its size hint wide (nothing squeezed away).
    for w in (sp.condition, sp.gate_layer, sp.threshold, sp.gate_side):
        assert w.width() >= w.minimumSizeHint().width(), w
    ARTIFACTS.mkdir(exist_ok=True)
    assert window.grab().save(str(ARTIFACTS / "sweep_windows_1366x768.png"))
    assert sp.grab().save(str(ARTIFACTS / "sweep_panel_windows.png"))


def test_bake_refuses_the_generation_panes_gate(qtbot, window):
    """Bake takes the generation pane's steering; with the pane's gate switched on it refuses (one line)
    instead of baking the steering ungated."""
    from steerdesk.core.errors import SteerdeskError

    gp = window.generation_panel
    gp.gate_group.setChecked(True)  # the group's title check box
    with pytest.raises(SteerdeskError, match="Gated steering cannot be baked") as e:
        window.baker.build_spec("out")
    assert "\n" not in str(e.value)
    gp.gate_group.setChecked(False)
    with pytest.raises(SteerdeskError, match="Pick a vector set"):  # the old refusal, reached again
        window.baker.build_spec("out")
