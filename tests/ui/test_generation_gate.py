"""The generation pane's token windows and gate (issue 15, items 4 and 5), driven as a user would:
the window field is validated, a gated windowed generation from the pane gives the tokens the
job gives with the same settings, each row shows its gate state, the record carries the gate, and
the heatmap outlines the tokens the window steered."""

from __future__ import annotations

from pathlib import Path

import pytest
from PySide6.QtCore import Qt
from test_window import ARTIFACTS, load, ready  # noqa: F401  (ready: a fixture)

PROMPT = "How do I boil an egg so the yolk stays soft?"
LAYER, SCALE, WINDOW, GATE_LAYER = 2, 8.0, "gen:1-3", 1


def type_positions(qtbot, gp, text):
    edit = gp.positions.lineEdit()
    edit.selectAll()
    qtbot.keyClick(edit, Qt.Key.Key_Delete)
    qtbot.keyClicks(edit, text)


def test_window_field_is_validated_as_typed_and_nothing_is_lost(qtbot, window):
    gp = window.generation_panel
    errors = []
    gp.error_occurred.connect(lambda title, msg: errors.append(msg))
    type_positions(qtbot, gp, "gen:5-2")
    assert gp.positions_error.isVisibleTo(gp) and "0 <= A <= B" in gp.positions_error.text()
    assert "\n" not in gp.positions_error.text()
    assert gp.positions.currentText() == "gen:5-2"  # the typed text stays for fixing
    type_positions(qtbot, gp, "middle")
    assert "Unknown positions 'middle'" in gp.positions_error.text()
    type_positions(qtbot, gp, "gen: 2 - 6")
    assert not gp.positions_error.isVisibleTo(gp)
    assert gp.positions_value() == "gen:2-6"
    # the named choices are still there and still mean what they meant
    gp.positions.setCurrentIndex(gp.positions.findData("generated"))
    assert gp.positions_value() == "generated" and not gp.positions_error.isVisibleTo(gp)
    # "window…" starts a typed window
    idx = gp.positions.findText("window…")
    gp.positions.setCurrentIndex(idx)
    gp.positions.activated.emit(idx)
    assert gp.positions.currentText() == "first:8" and gp.positions_value() == "first:8"


def test_generate_with_a_bad_window_is_one_line_and_changes_nothing(qtbot, ready):  # noqa: F811
    gp = ready.generation_panel
    errors = []
    gp.error_occurred.connect(lambda title, msg: errors.append((title, msg)))
    type_positions(qtbot, gp, "first:0")
    qtbot.mouseClick(gp.generate_button, Qt.MouseButton.LeftButton)
    assert errors == [("Cannot generate", "Positions 'first:0': first:N needs N >= 1.")]
    assert gp.positions.currentText() == "first:0" and gp.generate_button.isEnabled()


@pytest.fixture(scope="module")
def conditions_file(tmp_path_factory, tiny_model_dirs):
    """Condition vectors of the bundled cooking set computed on tiny-a, saved as a file."""
    from steerdesk.core.condition import compute_condition_vectors, load_condition_set
    from steerdesk.core.models import load_model
    from steerdesk.core.vectors import save_vectors

    lm = load_model(tiny_model_dirs["tiny-a"], device="cpu", dtype="float32")
    train = load_condition_set("cooking").part("train")
    vs = compute_condition_vectors(lm, train.positives(), train.negatives(), name="cooking")
    path = tmp_path_factory.mktemp("cond") / "cooking.safetensors"
    save_vectors(vs, path)
    return lm, vs, path


def _job_rows(lm, gp, gate):
    """The same generation run as a job, outside the window (the CLI runs exactly this)."""
    from steerdesk import jobs
    from steerdesk.core.generate import SamplingSettings

    steering = jobs.SteeringSpec(vectors=gp.current_set().vectors, layers=(LAYER,), scale=SCALE, positions=WINDOW)
    spec = jobs.GenerateSpec.single(PROMPT, steering, compare=True, sampling=SamplingSettings(max_new_tokens=10),
                                    gate=gate)
    return jobs.run(lm, spec).rows


def _cli_rows(capsys, tmp_path, model, gp, conditions, threshold):
    """The same generation with 'steerdesk generate --json' (the window's vectors saved to a file)."""
    import json

    from steerdesk import cli
    from steerdesk.core.vectors import save_vectors

    vector = tmp_path / "steer.safetensors"
    save_vectors(gp.current_set().vectors, vector)
    capsys.readouterr()
    code = cli.main(["generate", "--model", model, "--device", "cpu", "--dtype", "float32", "--prompt", PROMPT,
                     "--vector", str(vector), "--layers", str(LAYER), "--scale", str(SCALE), "--positions", WINDOW,
                     "--condition", str(conditions), "--condition-layer", str(GATE_LAYER),
                     "--threshold", str(threshold), "--gate-side", "above", "--max-new-tokens", "10",
                     "--compare", "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("opened", [True, False])
def test_gated_windowed_generation_from_the_pane_equals_the_job_and_the_cli(qtbot, ready, conditions_file, opened,  # noqa: F811
                                                                            capsys, tmp_path):
    from steerdesk.core.condition import ConditionGate, gate_scores

    lm, vs, path = conditions_file
    gp = ready.generation_panel
    errors = []
    gp.error_occurred.connect(lambda title, msg: errors.append(msg))
    probe = ConditionGate(GATE_LAYER, vs.directions[GATE_LAYER], 0.0, "above", "mean")
    score = float(gate_scores(lm, [PROMPT], probe)[0])
    threshold = round(score - 0.01 if opened else score + 0.01, 4)

    gp.prompt.setPlainText(PROMPT)
    gp.set_layers([LAYER])
    gp.scale.setValue(SCALE)
    type_positions(qtbot, gp, WINDOW)
    g = gp.gate_group
    g.setChecked(True)
    g.file.setText(str(path))
    g.file.editingFinished.emit()
    g.layer.setValue(GATE_LAYER)
    g.threshold.setValue(threshold)
    g.side.setCurrentIndex(g.side.findData("above"))
    records = []
    ready.controller.record_ready.connect(records.append)
    gp.max_tokens.setValue(10)
    with qtbot.waitSignal(gp.finished, timeout=60000) as blocker:
        qtbot.mouseClick(gp.generate_button, Qt.MouseButton.LeftButton)
    assert not errors, errors
    rows = blocker.args[0].rows

    gate = ConditionGate(GATE_LAYER, vs.directions[GATE_LAYER].float(), threshold, "above", "mean")
    expected = _job_rows(lm, gp, gate)
    assert [r.token_ids for r in rows] == [r.token_ids for r in expected]
    cli = _cli_rows(capsys, tmp_path, ready.controller.model_info.name, gp, path, threshold)
    assert cli["token_ids"] == rows[1].token_ids and cli["unsteered"]["token_ids"] == rows[0].token_ids
    assert cli["gate"]["open"] is opened
    assert [r.gate_open for r in rows] == [opened, opened]
    assert rows[1].gate_score == pytest.approx(score, abs=1e-5)
    if opened:
        assert rows[1].token_ids != rows[0].token_ids, "steering under the window must change the tokens"
        assert gp.output.steered_columns() == [1, 2, 3] and gp.output.outlined() == (1, 3)
        assert "gate open" in gp.output.steered_label.text()
    else:
        assert rows[1].token_ids == rows[0].token_ids  # a closed gate: exactly unsteered
        assert gp.output.steered_columns() == []
        assert "gate closed" in gp.output.steered_label.text() and "not steered" in gp.output.steered_label.text()
    assert f"{rows[1].gate_score:+.4f}" in gp.output.steered_label.text()

    qtbot.waitUntil(lambda: bool(records), timeout=10000)
    rec = records[-1]
    assert rec.positions == WINDOW or rec.settings["steers"][0]["positions"] == WINDOW
    assert rec.settings["gate"]["layer"] == GATE_LAYER
    assert rec.settings["gate"]["threshold"] == pytest.approx(threshold)
    assert [r["gate_open"] for r in rec.outputs["rows"]] == [opened, opened]

    if opened:
        from test_layout import clipped

        ready.resize(1024, 700)
        qtbot.wait(50)
        assert clipped(ready.centralWidget()) == []  # the gate's row fits the smallest window too
        ready.resize(1366, 768)
        ready.resizeDocks([ready.dataset_dock], [640], Qt.Orientation.Horizontal)  # a wide dock: a narrower pane
        ARTIFACTS.mkdir(exist_ok=True)
        qtbot.wait(50)
        plot = gp.heatmap.plot  # the titled plot fits its widget: every token column and the colour bar show
        assert plot.getPlotItem().sceneBoundingRect().width() <= plot.viewport().width() + 1
        assert ready.grab().save(str(ARTIFACTS / "generation_gate_1366x768.png"))
        assert gp.grab().save(str(ARTIFACTS / "generation_gate_pane.png"))


def test_gate_without_vectors_or_with_steering_vectors_is_refused(qtbot, ready, tmp_path):  # noqa: F811
    from steerdesk.core.vectors import save_vectors

    gp = ready.generation_panel
    errors = []
    gp.error_occurred.connect(lambda title, msg: errors.append(msg))
    gp.gate_group.setChecked(True)
    qtbot.mouseClick(gp.generate_button, Qt.MouseButton.LeftButton)
    assert errors and "no condition vectors" in errors[-1]
    steering = tmp_path / "steer.safetensors"
    save_vectors(gp.current_set().vectors, Path(steering))
    gp.gate_group.load_file(str(steering))
    assert "not condition vectors" in errors[-1]
    assert gp.gate_group.file.text() == str(steering)  # kept to fix
    assert gp.gate_group.conditions() is None


@pytest.mark.parametrize("positions,gated,gate_open,expected", [
    ("gen:2-4", False, None, [2, 3, 4]),     # no gate: the window's tokens
    ("first:2", True, True, [0, 1]),          # gate open: the window's tokens
    ("gen:2-4", True, False, []),             # gate closed: nothing steered
    ("gen:2-4", True, None, None),            # a gated run stopped before its result: not known
    ("prompt:0-3", False, None, None),        # a prompt window: depends on the prompt length
    ("generated", False, None, [1, 2, 3, 4, 5]),
])
def test_heatmap_outline_follows_window_and_gate(qtbot, positions, gated, gate_open, expected):
    import torch

    from steerdesk.core.generate import GenerationResult
    from steerdesk.core.vectors import VectorSet
    from steerdesk.ui.panels.generation_output import GenerationOutput
    from steerdesk.ui.vector_sets import NamedVectors

    out = GenerationOutput()
    qtbot.addWidget(out.texts)
    qtbot.addWidget(out.heatmap)
    steered = NamedVectors("v", VectorSet(torch.ones(4, 8), torch.ones(4)))
    out.start(4, True, 1, steered, positions, gated)
    rows = [GenerationResult(f"row {r}", list(range(6)), "length", gate_score=None if gate_open is None else 0.1,
                             gate_open=gate_open) for r in range(2)]
    out.finish(rows, 1.0)
    assert out.steered_columns() == expected
    title = out.heatmap.plot.plotItem.titleLabel.text
    if expected:
        assert "outlined" in title and out.outlined() == (expected[0], expected[-1])
    else:
        assert out.outlined() is None
    if gate_open is False:
        assert "gate closed" in title


@pytest.mark.parametrize("gated", [True, False])
def test_a_sweep_cell_loads_its_gate_into_the_pane(qtbot, ready, conditions_file, gated):  # noqa: F811
    """The sweep panel's chosen cell carries the sweep's gate (or none): the window loads it into the
    pane's gate group before it generates, so the comparison runs with the sweep's own gate."""
    from steerdesk.ui.panels.condition_panel import GateChoice
    from steerdesk.ui.panels.sweep_panel import CellChoice

    _lm, vs, path = conditions_file
    gp = ready.generation_panel
    gp.gate_group.setChecked(not gated)  # the opposite state before the click
    gp.gate_group.load_file(str(path))
    gp.max_tokens.setValue(4)
    gate = GateChoice(vs, str(path), GATE_LAYER, -0.5, "above") if gated else None
    cell = CellChoice("neutral_rude", [LAYER], 2.0, "add", False, "first:2", gate)
    with qtbot.waitSignal(gp.finished, timeout=60000) as blocker:
        ready.sweep_panel.cell_chosen.emit(cell)
    rows = blocker.args[0].rows
    assert gp.gate_group.isChecked() is gated
    assert gp.positions_value() == "first:2" and gp.selected_layers() == [LAYER]
    if gated:
        assert (gp.gate_group.layer.value(), gp.gate_group.threshold.value()) == (GATE_LAYER, -0.5)
        assert rows[1].gate_score is not None and rows[1].gate_open is (rows[1].gate_score > -0.5)
    else:
        assert rows[1].gate_score is None and rows[1].gate_open is None
