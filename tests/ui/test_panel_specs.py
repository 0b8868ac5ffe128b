"""Each panel builds its own job Spec: clicked as a user would, asserted on the Spec it submits.

No model and no worker: a recording controller keeps the submitted Specs and hands back real
``JobHandle`` objects, which the tests use to feed results back to the panels.
"""

from __future__ import annotations

import pytest
import torch
from PySide6.QtCore import QObject, Qt, Signal

from steerdesk import jobs
from steerdesk.core.models import ModelInfo
from steerdesk.core.vectors import VectorSet
from steerdesk.ui.controller import JobHandle
from steerdesk.ui.requests import JobRequest

INFO = ModelInfo(name="tiny", architecture="LlamaForCausalLM", num_layers=4, hidden_size=8, device="cpu",
                 dtype="float32", has_chat_template=True, block_path="model.layers", source="test")


def vectors(*, zero_layer: int | None = None, hidden: int = 8) -> VectorSet:
    torch.manual_seed(0)
    directions = torch.randn(4, hidden)
    if zero_layer is not None:
        directions[zero_layer] = 0  # no direction there (a GGUF import's block 0)
    return VectorSet(directions, torch.full((4,), 2.0), {
        "format": "steerdesk.vectors/1", "model": "tiny", "architecture": "LlamaForCausalLM", "num_layers": "4",
        "hidden_size": str(hidden), "method": "mean-diff", "read_position": "last",
        "layer_convention": "block_output"})


class RecordingController(QObject):
    """Stands in for ModelController: records Specs, returns handles the test can drive."""

    model_ready = Signal(object)
    record_ready = Signal(object)

    def __init__(self) -> None:
        super().__init__()
        self.model_info = None
        self.specs: list = []
        self.handles: list[JobHandle] = []
        self.stopped: list = []

    def submit(self, spec):
        self.specs.append(spec)
        handle = JobHandle(JobRequest(len(self.specs), spec, jobs.job_for(spec).NAME), self)
        self.handles.append(handle)
        return handle

    def stop(self, kind=None):
        self.stopped.append(kind)

    def load(self, info=INFO):
        self.model_info = info
        self.model_ready.emit(info)


@pytest.fixture
def bench(qtbot, tmp_path):
    """The panels wired as the main window wires them, around a recording controller."""
    from steerdesk.ui.panels.analysis_panel import AnalysisPanel
    from steerdesk.ui.panels.dataset_panel import DatasetPanel
    from steerdesk.ui.panels.generation_panel import GenerationPanel
    from steerdesk.ui.panels.sweep_panel import SweepPanel
    from steerdesk.ui.panels.vector_panel import VectorPanel
    from steerdesk.ui.vector_sets import VectorSets

    c = RecordingController()
    sets = VectorSets()
    c.model_ready.connect(sets.set_model_info)
    dp = DatasetPanel()
    vp = VectorPanel(c, sets, pairs=dp)
    sp = SweepPanel(c, sets, pairs=dp)
    gp = GenerationPanel(c, sets)
    ap = AnalysisPanel(c, sets, pairs=dp, steering=gp)
    errors: list = []
    for w in (dp, vp, sp, gp, ap):
        qtbot.addWidget(w)
        w.resize(900, 700)
        w.show()
        w.error_occurred.connect(lambda title, message: errors.append((title, message)))
    dp.load_bundled("neutral_rude")
    dp.set_heldout_fraction(0.25)
    c.load()
    ns = type("Bench", (), {})()
    ns.c, ns.sets, ns.dp, ns.vp, ns.sp, ns.gp, ns.ap, ns.errors = c, sets, dp, vp, sp, gp, ap, errors
    return ns


def click(qtbot, button):
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def pick_layers(qtbot, gp, layers):
    gp.layers.clearSelection()
    for i, layer in enumerate(layers):
        item = gp.layers.item(layer)
        pos = gp.layers.visualItemRect(item).center()
        mod = Qt.KeyboardModifier.ControlModifier if i else Qt.KeyboardModifier.NoModifier
        qtbot.mouseClick(gp.layers.viewport(), Qt.MouseButton.LeftButton, mod, pos)


def test_compute_spec_from_the_vector_panel(qtbot, bench):
    vp, dp = bench.vp, bench.dp
    vp.method.setCurrentIndex(vp.method.findData("pca"))
    vp.batch.setValue(3)
    qtbot.keyClicks(vp.name_edit, "rude")
    click(qtbot, vp.compute_button)
    (spec,) = bench.c.specs
    assert isinstance(spec, jobs.ComputeSpec)
    assert spec.method == "pca" and spec.read == "last" and spec.batch_size == 3 and spec.name == "rude"
    assert spec.dataset.examples == dp.dataset().examples and spec.heldout == 0.25  # the job splits it
    assert not vp.compute_button.isEnabled()
    click(qtbot, vp.cancel_button)
    assert bench.c.stopped == ["compute"]
    # the result is rendered by the panel that asked for it, into the shared vector sets
    vs = vectors()
    vs.metadata["name"] = "rude"  # what the job does with spec.name
    bench.c.handles[0].finished.emit(jobs.compute.ComputeResult(vs, 10, 0.1))
    bench.c.handles[0].ended.emit()
    assert [s.name for s in bench.sets.sets()] == ["rude"]
    assert vp.compute_button.isEnabled() and bench.gp.current_set() is bench.sets.sets()[0]


def test_compute_refuses_without_a_model(qtbot, bench):
    bench.c.model_info = None
    click(qtbot, bench.vp.compute_button)
    assert bench.c.specs == [] and bench.errors[-1][0] == "No model"


def test_generate_specs_compare_single_and_unsteered(qtbot, bench):
    gp = bench.gp
    vs = vectors()
    bench.sets.add(vs, "rude")
    gp.prompt.clear()
    qtbot.keyClicks(gp.prompt, "Tell me a joke")
    qtbot.keyClicks(gp.system, "be brief")
    pick_layers(qtbot, gp, [1, 3])
    gp.scale.setValue(2.5)
    gp.mode.setCurrentIndex(gp.mode.findData("clamp"))
    click(qtbot, gp.normalize)
    gp.positions.setCurrentIndex(gp.positions.findData("generated"))
    gp.max_tokens.setValue(7)
    click(qtbot, gp.generate_button)
    spec = bench.c.specs[-1]
    assert isinstance(spec, jobs.GenerateSpec)
    assert spec.prompts == ("Tell me a joke",) * 2 and spec.steered_rows == (False, True)
    st = spec.steering
    assert st.vectors is vs and st.layers == (1, 3) and st.scale == 2.5 and st.mode == "clamp"
    assert st.normalize and st.positions == "generated"
    assert spec.system == "be brief" and spec.watch and spec.sampling.max_new_tokens == 7
    assert spec.sampling.temperature == 0.0 and spec.sampling.seed == 0
    assert not gp.generate_button.isEnabled() and gp.stop_button.isEnabled()
    click(qtbot, gp.stop_button)
    assert bench.c.stopped == [None]  # Stop stops whatever runs
    bench.c.handles[-1].ended.emit()
    assert gp.generate_button.isEnabled()

    click(qtbot, gp.compare)  # off: one steered row
    click(qtbot, gp.generate_button)
    assert bench.c.specs[-1].prompts == ("Tell me a joke",) and bench.c.specs[-1].steered_rows == (True,)
    bench.c.handles[-1].ended.emit()

    gp.vector.setCurrentIndex(0)  # "(none: unsteered only)"
    click(qtbot, gp.generate_button)
    spec = bench.c.specs[-1]
    assert spec.steering is None and spec.steered_rows == (False,) and not spec.watch


def test_generate_refusals_are_messages_not_jobs(qtbot, bench):
    gp = bench.gp
    bench.sets.add(vectors(zero_layer=0), "gguf")
    gp.prompt.clear()
    click(qtbot, gp.generate_button)
    assert bench.errors[-1] == ("Cannot generate", "Write a prompt first.")
    qtbot.keyClicks(gp.prompt, "hi")
    gp.layers.clearSelection()
    click(qtbot, gp.generate_button)
    assert "Select at least one layer" in bench.errors[-1][1]
    gp.layers.item(0).setSelected(True)  # forced past the greyed-out item
    if gp.selected_layers() == [0]:
        click(qtbot, gp.generate_button)
        assert "no direction for layer 0" in bench.errors[-1][1]
    assert bench.c.specs == []


def test_sweep_spec_and_its_live_cells(qtbot, bench):
    sp, dp = bench.sp, bench.dp
    vs = vectors(zero_layer=0)
    bench.sets.add(vs, "gguf")
    qtbot.keyClicks(sp.layers, "0,1,3")
    qtbot.keyClicks(sp.sets, "mid=1-2")
    sp.scales.clear()
    qtbot.keyClicks(sp.scales, "0,1,2")
    sp.mode.setCurrentIndex(sp.mode.findData("project"))
    sp.budget.setValue(0.7)
    sp.max_pairs.setValue(5)
    click(qtbot, sp.run_button)
    (spec,) = bench.c.specs
    assert isinstance(spec, jobs.SweepSpec)
    assert spec.vectors is vs and spec.layers == (0, 1, 3) and dict(spec.sets) == {"mid": (1, 2)}
    assert spec.scales == (0.0, 1.0, 2.0) and spec.mode == "project" and spec.fluency_budget == 0.7
    assert spec.max_pairs == 5
    assert spec.heldout.examples == dp.train_and_heldout()[1].examples
    assert spec.dataset.examples == dp.dataset().examples and spec.heldout_fraction == 0.25
    assert sp.no_vector_rows() == [0]  # known before any cell arrives
    handle = bench.c.handles[0]
    handle.partial.emit(jobs.sweep.SweepCell(1, 2, 0.5, -0.1))
    assert sp.margin()[1, 2] == pytest.approx(0.5)
    click(qtbot, sp.cancel_button)
    assert bench.c.stopped == ["sweep"]


def test_sweep_refusals(qtbot, bench):
    sp = bench.sp
    click(qtbot, sp.run_button)
    assert bench.errors[-1][0] == "No vectors"
    bench.sets.add(vectors(), "v")
    bench.dp.set_heldout_fraction(0.0)
    click(qtbot, sp.run_button)
    assert bench.errors[-1][0] == "Held-out pairs needed"
    bench.dp.set_heldout_fraction(0.25)
    sp.scales.setText("0,abc")
    click(qtbot, sp.run_button)
    assert bench.errors[-1][0] == "Cannot run the sweep"
    assert bench.c.specs == []


def test_analysis_specs_use_the_shared_sets_and_the_generation_pane(qtbot, bench):
    ap, gp, dp = bench.ap, bench.gp, bench.dp
    vs = vectors()
    bench.sets.add(vs, "rude")
    heldout = dp.train_and_heldout()[1].examples

    ap.setCurrentWidget(ap.diagnostics)
    click(qtbot, ap.diagnostics.run_button)
    diag = bench.c.specs[-1]
    assert isinstance(diag, jobs.DiagnoseSpec) and diag.vectors is vs and diag.dataset.examples == heldout
    assert not ap.versus.run_button.isEnabled()
    bench.c.handles[-1].ended.emit()

    pick_layers(qtbot, gp, [2])
    gp.scale.setValue(1.5)
    ap.setCurrentWidget(ap.versus)
    ap.versus.instruction.setText("Be rude.")
    click(qtbot, ap.versus.run_button)
    vsp = bench.c.specs[-1]
    assert isinstance(vsp, jobs.VersusSpec) and vsp.instruction == "Be rude."
    assert vsp.prompt == gp.prompt.toPlainText().strip() and vsp.steering.layers == (2,)
    assert vsp.steering.scale == 1.5 and vsp.heldout.examples == heldout
    bench.c.handles[-1].ended.emit()

    ap.setCurrentWidget(ap.grid)
    ap.grid.layers.clear()  # default: the generation pane's layers
    ap.grid.scales.setText("1,3")
    ap.grid.prompts.setPlainText("a\n\nb\n")
    ap.grid.pattern.setText("ugh|meh")
    click(qtbot, ap.grid.regex)
    ap.grid.tokens.setValue(9)
    gp.mode.setCurrentIndex(gp.mode.findData("project"))
    click(qtbot, ap.grid.run_button)
    grid = bench.c.specs[-1]
    assert isinstance(grid, jobs.GridSpec) and grid.vectors is vs and grid.layers == (2,)
    assert grid.scales == (1.0, 3.0) and grid.prompts == ("a", "b") and grid.pattern == "ugh|meh" and grid.regex
    assert grid.mode == "project" and grid.sampling.max_new_tokens == 9
    assert grid.sampling.temperature == gp.sampling().temperature
    # rows stream into the table through the panel's own handle
    from steerdesk.core.textgrid import GridRow

    bench.c.handles[-1].partial.emit(GridRow(2, 1.0, "a", "text"))
    assert ap.grid.table.rowCount() == 1

    bench.c.handles[-1].ended.emit()
    ap.grid.layers.setText("9")
    click(qtbot, ap.grid.run_button)
    assert bench.errors[-1][0] == "Cannot run the grid" and "out of range" in bench.errors[-1][1]


def test_vector_sets_have_one_home_that_every_panel_follows(qtbot, bench):
    vp, gp = bench.vp, bench.gp
    a = vp.add_vectors(vectors(), "a")
    b = vp.add_vectors(vectors(), "b")
    assert [gp.vector.itemData(i) for i in range(gp.vector.count())] == ["", "a", "b"]
    assert gp.current_set() is b and bench.sets.for_analysis() is b
    vp.list.setCurrentRow(0)  # the user picks "a" in the Vectors panel: the generation pane follows
    assert gp.current_set() is a and bench.sets.selected() is a
    bench.c.load(ModelInfo(**{**INFO.to_dict(), "name": "other", "hidden_size": 16}))
    assert not a.usable and "hidden size 8 vs 16" in a.reason and gp.current_set() is None
    assert bench.sets.for_analysis() is None
    vp.list.setCurrentRow(1)
    click(qtbot, vp.remove_button)
    assert [s.name for s in bench.sets.sets()] == ["a"] and gp.vector.findData("b") == -1
