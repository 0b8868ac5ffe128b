"""The jobs layer (issue 12): every job headless on a tiny model, equal to calling the core directly,
with one context (cancel / progress / partial / text) and records that re-run through the same job."""

from __future__ import annotations

import threading

import pytest
import torch
from tinylm import PROMPT, build_tiny, rude4, strong_vectors

from steerdesk import jobs
from steerdesk.core.errors import Cancelled, SteerdeskError
from steerdesk.core.generate import SamplingSettings


@pytest.fixture(scope="module")
def lm(tokenizer, plain_tokenizer):
    return build_tiny("llama", tokenizer, plain_tokenizer)


@pytest.fixture(scope="module")
def vs(lm):
    from steerdesk.core.vectors import VectorSet

    d = strong_vectors(lm)
    return VectorSet(d, torch.ones(d.shape[0]), {"model": lm.info.name, "architecture": lm.info.architecture})


def test_generate_job_equals_core_generate_and_streams_through_the_context(lm, vs):
    from steerdesk.core.generate import generate

    steering = jobs.SteeringSpec(vectors=vs, layers=(1,), scale=2.0)
    spec = jobs.GenerateSpec.single(PROMPT, steering, compare=True, sampling=SamplingSettings(max_new_tokens=8))
    chunks: dict[int, str] = {}
    steps: list[int] = []
    ctx = jobs.JobContext(on_text=lambda row, c: chunks.__setitem__(row, chunks.get(row, "") + c),
                          on_step=lambda step, ids, proj: steps.append(step))
    result = jobs.run(lm, spec, ctx)
    direct = generate(lm, [PROMPT, PROMPT], [[], vs.steers([1], scale=2.0)],
                      sampling=SamplingSettings(max_new_tokens=8))
    assert [r.token_ids for r in result.rows] == [r.token_ids for r in direct]
    assert result.steered_rows == [False, True] and [s.layer for s in result.steers] == [1]
    assert chunks == {0: direct[0].text, 1: direct[1].text} and steps == list(range(len(steps))) and steps
    assert result.rows[0].token_ids != result.rows[1].token_ids


def test_generate_record_reruns_through_the_same_job(lm, vs, tmp_path):
    from steerdesk.core.records import RunRecord
    from steerdesk.jobs.rerun import rerun

    spec = jobs.GenerateSpec.single(PROMPT, jobs.SteeringSpec(vectors=vs, layers=(0, 2), scale=1.5),
                                    sampling=SamplingSettings(max_new_tokens=6))
    result = jobs.run(lm, spec)
    record = jobs.record(lm, spec, result)
    record.save(tmp_path / "r.json")
    again = rerun(RunRecord.load(tmp_path / "r.json"), lm=lm)
    assert again.reproduced and [r.token_ids for r in again.result] == [r.token_ids for r in result.rows]
    assert record.seconds > 0


def test_steering_spec_refuses_no_op_and_foreign_vectors(lm, vs):
    from steerdesk.core.vectors import VectorSet

    gappy = VectorSet(vs.directions.clone(), vs.norms, dict(vs.metadata),
                      present=torch.tensor([i != 1 for i in range(vs.num_layers)]))
    with pytest.raises(SteerdeskError, match="no direction for layer 1"):
        jobs.run(lm, jobs.GenerateSpec.single(PROMPT, jobs.SteeringSpec(vectors=gappy, layers=(1,))))
    other = VectorSet(torch.ones(vs.num_layers, 8), torch.ones(vs.num_layers), {"model": "x"})
    with pytest.raises(SteerdeskError, match="made for x"):
        jobs.run(lm, jobs.GenerateSpec.single(PROMPT, jobs.SteeringSpec(vectors=other, layers=(1,))))
    with pytest.raises(SteerdeskError, match="needs a vector"):
        jobs.GenerateSpec.single(PROMPT, None, compare=True)


def test_cancel_stops_a_generation_within_a_token(lm):
    ctx = jobs.JobContext()
    ctx.on_step = lambda step, ids, proj: ctx.cancel.set() if step == 1 else None
    result = jobs.run(lm, jobs.GenerateSpec((PROMPT,), sampling=SamplingSettings(max_new_tokens=30)), ctx)
    assert result.stopped and result.rows[0].finish_reason == "stopped" and len(result.rows[0].token_ids) <= 2


def test_compute_job_uses_the_training_split_and_records_it(lm):
    from steerdesk.core.extract import compute_vectors

    ds = rude4()
    seen: list[tuple[int, int, str]] = []
    spec = jobs.ComputeSpec(dataset=ds, heldout=0.25, batch_size=2, name="mine")
    result = jobs.run(lm, spec, jobs.JobContext(on_progress=lambda d, t, m: seen.append((d, t, m))))
    direct = compute_vectors(lm, ds.split(0.25)[0], batch_size=2)
    assert torch.allclose(result.vectors.directions, direct.directions, atol=1e-6)
    assert result.examples == 3 and result.vectors.metadata["name"] == "mine"
    assert seen and seen[-1][0] == seen[-1][1] and seen[-1][2] == "Extracting activations"
    rec = jobs.record(lm, spec, result)
    assert rec.kind == "compute" and rec.dataset["heldout"] == 0.25 and rec.dataset["part"] == "train"
    with pytest.raises(Cancelled):
        stop = threading.Event()
        stop.set()
        jobs.run(lm, spec, jobs.JobContext(cancel=stop))


def test_sweep_job_streams_cells_and_equals_core_sweep(lm, vs):
    from steerdesk.core.sweep import sweep

    cells: list[jobs.sweep.SweepCell] = []
    spec = jobs.SweepSpec(vectors=vs, heldout=rude4(), layers=(0, 2), scales=(0.0, 1.0))
    result = jobs.run(lm, spec, jobs.JobContext(on_partial=cells.append))
    direct = sweep(lm, vs, rude4(), layers=[0, 2], scales=[0.0, 1.0])
    assert result.margin_delta == direct.margin_delta  # same engine, same inputs: bit-equal
    assert sorted((c.row, c.col) for c in cells) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    got = {(c.row, c.col): c.margin_delta for c in cells}
    assert got[(1, 1)] == pytest.approx(result.margin_delta[1][1])
    assert jobs.record(lm, spec, result).kind == "sweep"


def test_diagnose_grid_and_versus_jobs(lm, vs):
    from steerdesk.core.diagnostics import diagnose

    d = jobs.run(lm, jobs.DiagnoseSpec(vectors=vs, dataset=rude4()))
    assert d.auc == diagnose(lm, vs, rude4()).auc
    rows: list = []
    grid = jobs.run(lm, jobs.GridSpec(vectors=vs, layers=(1,), scales=(2.0,), prompts=(PROMPT,),
                                      sampling=SamplingSettings(max_new_tokens=4), pattern="paris"),
                    jobs.JobContext(on_partial=rows.append))
    assert rows == grid and [r.layer for r in grid] == [None, 1]
    versus = jobs.run(lm, jobs.VersusSpec(heldout=rude4(), steering=jobs.SteeringSpec(vectors=vs, layers=(1,)),
                                          instruction="Reply rudely.", prompt=PROMPT,
                                          sampling=SamplingSettings(max_new_tokens=4)))
    assert [c.name for c in versus.conditions] == ["unsteered", "prompt", "vector", "both"]


def _rerun_from_file(lm, record, tmp_path, **kwargs):
    from steerdesk.core.records import RunRecord

    record.save(tmp_path / f"{record.kind}.json")
    loaded = RunRecord.load(tmp_path / f"{record.kind}.json")
    assert loaded == record
    return jobs.run(lm, jobs.RerunSpec(recipe=loaded, **kwargs))


def test_diagnose_record_reruns_through_the_same_job(lm, vs, tmp_path):
    ds = rude4()
    spec = jobs.DiagnoseSpec(vectors=vs, dataset=ds.split(0.5)[1], source=ds, heldout_fraction=0.5, batch_size=2)
    result = jobs.run(lm, spec)
    record = jobs.record(lm, spec, result, seconds=0.5)
    assert record.kind == "diagnose" and record.seconds == 0.5 and record.dataset["part"] == "heldout"
    assert record.outputs["diagnostics"]["auc"] == result.auc and "embedded" in record.vector
    assert record.title.startswith("diagnose")
    again = _rerun_from_file(lm, record, tmp_path)
    assert again.reproduced, again.differences
    assert again.result.auc == result.auc and isinstance(again.spec, jobs.DiagnoseSpec)


def test_versus_record_reruns_through_the_same_job(lm, vs, tmp_path):
    spec = jobs.VersusSpec(heldout=rude4(), steering=jobs.SteeringSpec(vectors=vs, layers=(1, 2), scale=1.5),
                           instruction="Reply rudely.", prompt=PROMPT, sampling=SamplingSettings(max_new_tokens=5),
                           max_pairs=3)
    result = jobs.run(lm, spec)
    record = jobs.record(lm, spec, result)
    assert record.kind == "versus" and record.layers == [1, 2] and record.scales == [1.5, 1.5]
    assert record.settings["instruction"] == "Reply rudely." and record.dataset["max_pairs"] == 3
    again = _rerun_from_file(lm, record, tmp_path)
    assert again.reproduced, again.differences
    assert [c.token_ids for c in again.result.conditions] == [c.token_ids for c in result.conditions]
    record.outputs["versus"]["conditions"][2]["token_ids"][0] += 1
    assert "condition vector: tokens differ" in jobs.run(lm, jobs.RerunSpec(recipe=record)).differences[0]


def test_grid_record_reruns_through_the_same_job(lm, vs, tmp_path):
    spec = jobs.GridSpec(vectors=vs, layers=(0, 2), scales=(1.0, 3.0), prompts=(PROMPT, "Hi."),
                         sampling=SamplingSettings(max_new_tokens=4), pattern="the")
    result = jobs.run(lm, spec)
    record = jobs.record(lm, spec, result, seconds=1.0)
    assert record.kind == "grid" and len(record.outputs["rows"]) == len(result) == 2 + 2 * 2 * 2
    assert set(record.vector["embedded"]) == {"0", "2"}  # no file: the used layers travel with the recipe
    again = _rerun_from_file(lm, record, tmp_path)
    assert again.reproduced, again.differences
    assert [r.text for r in again.result] == [r.text for r in result]


def test_rerun_refuses_changed_inputs_and_reports_other_outputs(lm, vs, tmp_path):
    from steerdesk.core.datasets import save_dataset

    save_dataset(rude4(), tmp_path / "d.jsonl")
    from steerdesk.core.datasets import resolve_dataset

    ds = resolve_dataset(str(tmp_path / "d.jsonl"))
    spec = jobs.SweepSpec(vectors=vs, heldout=ds, layers=(1,), scales=(0.0, 2.0), dataset=ds,
                          dataset_spec=str(tmp_path / "d.jsonl"))
    result = jobs.run(lm, spec)
    record = jobs.record(lm, spec, result)
    again = jobs.run(lm, jobs.RerunSpec(recipe=record, output=str(tmp_path / "again.json")))
    assert again.reproduced and (tmp_path / "again.json").is_file()
    assert again.result.margin_delta == result.margin_delta
    (tmp_path / "d.jsonl").write_text((tmp_path / "d.jsonl").read_text().replace("six", "seven"))
    with pytest.raises(SteerdeskError, match="dataset .* has changed"):
        jobs.run(lm, jobs.RerunSpec(recipe=record))
    changed = jobs.run(lm, jobs.RerunSpec(recipe=record, allow_changes=True))
    assert changed.differences[0].startswith("dataset")
    record.num_layers = 99
    with pytest.raises(SteerdeskError, match="not the recipe's"):
        jobs.run(lm, jobs.RerunSpec(recipe=record))


def test_generate_rerun_with_different_settings_per_layer(lm, vs):
    """A hand-written recipe may steer each layer differently: the re-run keeps each layer's settings."""
    from steerdesk.core.generate import generate

    spec = jobs.GenerateSpec.single(PROMPT, jobs.SteeringSpec(vectors=vs, layers=(1, 2), scale=1.0),
                                    sampling=SamplingSettings(max_new_tokens=6))
    record = jobs.record(lm, spec, jobs.run(lm, spec))
    record.settings["steers"][1]["scale"] = 3.0
    again = jobs.run(lm, jobs.RerunSpec(recipe=record))
    direct = generate(lm, [PROMPT], [vs.steers([1], scale=1.0) + vs.steers([2], scale=3.0)],
                      sampling=SamplingSettings(max_new_tokens=6))
    assert again.result[0].token_ids == direct[0].token_ids
    assert [s.scale for s in again.spec.steering.steers(lm)] == [1.0, 3.0]
    assert again.record.scales == [1.0, 3.0] and "method" not in again.record.vector  # embedded: no set identity


def test_load_job_loads_a_saved_model_and_reports_progress(lm, tmp_path):
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    messages: list[str] = []
    loaded = jobs.run(None, jobs.LoadSpec(spec=str(tmp_path / "m"), device="cpu", dtype="float32"),
                      jobs.JobContext(on_progress=lambda done, total, msg: messages.append(msg)))
    assert loaded.info.num_layers == lm.info.num_layers and loaded.info.hidden_size == lm.info.hidden_size
    assert messages
    with pytest.raises(SteerdeskError):
        jobs.run(None, jobs.LoadSpec(spec=str(tmp_path / "nothing-here")))


def test_every_spec_has_a_job_and_specs_are_frozen(vs):
    import dataclasses

    for spec_type, module in jobs.JOBS.items():
        assert dataclasses.is_dataclass(spec_type) and spec_type.__dataclass_params__.frozen
        assert callable(module.run) and module.NAME and module.TITLE
    with pytest.raises(TypeError, match="not a job spec"):
        jobs.run(None, object())
    with pytest.raises(dataclasses.FrozenInstanceError):
        jobs.SteeringSpec(vectors=vs, layers=(1,)).scale = 3.0  # type: ignore[misc]


def test_jobs_never_import_qt():
    import subprocess
    import sys

    code = ("import sys, steerdesk.jobs; bad = [m for m in sys.modules if m.startswith(('PySide6', 'pyqtgraph', "
            "'steerdesk.ui'))]; print(bad); sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
