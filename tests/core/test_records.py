"""Run records: JSON recipes round-trip, and re-running one reproduces its outputs."""

from __future__ import annotations

import json

import pytest
from tinylm import PROMPT, rude4, strong_vectors

from steerdesk.core.datasets import Dataset, save_dataset
from steerdesk.core.errors import SteerdeskError
from steerdesk.core.extract import compute_vectors
from steerdesk.core.generate import SamplingSettings, generate
from steerdesk.core.records import FORMAT, RunRecord, record_compute, record_generation, record_sweep
from steerdesk.core.steering import steers_for
from steerdesk.core.sweep import sweep
from steerdesk.core.vectors import save_vectors
from steerdesk.jobs.rerun import rerun

PAIRS = rude4()

ARCH = pytest.mark.parametrize("arch", ["llama"])


def _roundtrip(record: RunRecord, tmp_path) -> RunRecord:
    path = tmp_path / "recipe.json"
    record.save(path)
    obj = json.loads(path.read_text())
    assert obj["format"] == FORMAT and obj["kind"] == record.kind
    back = RunRecord.load(path)
    assert back == record
    return back


@ARCH
@pytest.mark.parametrize("sampling", [SamplingSettings(max_new_tokens=10),
                                      SamplingSettings(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=7)])
def test_generation_recipe_reproduces_its_tokens(tiny, tmp_path, sampling):
    steers = steers_for(strong_vectors(tiny, factor=2.0), [1, 2], scale=1.5)
    prompts = [PROMPT, PROMPT]
    results = generate(tiny, prompts, [[], steers], sampling=sampling)
    assert results[0].token_ids != results[1].token_ids  # the steering matters
    record = record_generation(tiny, prompts, results, steers=steers, steered_rows=[False, True], sampling=sampling)
    assert record.layers == [1, 2] and record.scales == [1.5, 1.5] and record.mode == "add"
    assert record.sampling["seed"] == sampling.seed and record.chat_template_sha256
    assert record.outputs["rows"][1]["token_ids"] == results[1].token_ids
    recipe = _roundtrip(record, tmp_path)
    again = rerun(recipe, lm=tiny)
    assert again.reproduced, again.differences
    assert [r.token_ids for r in again.result] == [r.token_ids for r in results]
    assert again.record.outputs == record.outputs
    assert "generate" in record.title and "L1 x1.5" in record.title


@ARCH
def test_a_changed_output_is_reported(tiny, tmp_path):
    steers = steers_for(strong_vectors(tiny), [1], scale=1.0)
    results = generate(tiny, [PROMPT], [steers], sampling=SamplingSettings(max_new_tokens=6))
    record = record_generation(tiny, [PROMPT], results, steers=steers, sampling=SamplingSettings(max_new_tokens=6))
    record.outputs["rows"][0]["token_ids"][2] += 1
    again = rerun(record, lm=tiny)
    assert not again.reproduced and "first at token 2" in again.differences[0]


@ARCH
def test_compute_recipe_reproduces_the_vectors(tiny, tmp_path):
    vs = compute_vectors(tiny, PAIRS.split(0.25)[0], batch_size=3)
    record = record_compute(tiny, PAIRS, vs, dataset_spec=None, heldout=0.25, batch_size=3)
    assert record.dataset["examples"] and record.dataset["part"] == "train"  # unsaved: embedded
    recipe = _roundtrip(record, tmp_path)
    out = tmp_path / "again.safetensors"
    again = rerun(recipe, lm=tiny, output=str(out))
    assert again.reproduced, again.differences
    assert out.is_file() and again.record.outputs["directions_sha256"] == record.outputs["directions_sha256"]


@ARCH
def test_sweep_recipe_reproduces_the_grid(tiny, tmp_path):
    data = tmp_path / "pairs.jsonl"
    save_dataset(PAIRS, data)
    vs = compute_vectors(tiny, PAIRS)
    vfile = tmp_path / "v.safetensors"
    save_vectors(vs, vfile)
    held = PAIRS.split(0.5)[1]
    res = sweep(tiny, vs, held, layers=[1, 3], scales=[0.0, 2.0], sets={"both": [1, 3]}, vector_path=str(vfile))
    record = record_sweep(tiny, res, PAIRS, vs, dataset_spec=str(data), heldout=0.5, vector_path=str(vfile))
    assert record.layers == [1, 3] and record.scales == [0.0, 2.0] and record.settings["sets"] == {"both": [1, 3]}
    assert record.vector["path"] == str(vfile) and "embedded" not in record.vector
    recipe = _roundtrip(record, tmp_path)
    again = rerun(recipe, lm=tiny)
    assert again.reproduced, again.differences
    for a, b in zip(again.result.margin_delta, res.margin_delta):
        assert a == pytest.approx(b, abs=1e-6)

    # The dataset file changed since: refused, unless asked.
    save_dataset(Dataset(PAIRS.examples[:3], name="x"), data)
    with pytest.raises(SteerdeskError, match="dataset .* has changed"):
        rerun(recipe, lm=tiny)
    assert rerun(recipe, lm=tiny, allow_changes=True).differences[0].startswith("dataset")


@ARCH
def test_sweep_recipe_without_a_vector_file_embeds_the_vectors(tiny, tmp_path):
    v = strong_vectors(tiny, factor=1.0)
    res = sweep(tiny, v, PAIRS, layers=[2], scales=[1.0])
    record = record_sweep(tiny, res, PAIRS, v)
    assert set(record.vector["embedded"]) == {"2"}
    again = rerun(_roundtrip(record, tmp_path), lm=tiny)
    assert again.reproduced, again.differences


def test_bad_recipes(tmp_path):
    bad = tmp_path / "bad.json"
    for text, match in (("{", "invalid JSON"), ("[]", "JSON object"), ('{"format": "x"}', "Not a steerdesk recipe"),
                        (json.dumps({"format": FORMAT, "kind": "dance", "model": "m"}), "Unknown recipe kind"),
                        (json.dumps({"format": FORMAT, "kind": "generate"}), "which model")):
        bad.write_text(text)
        with pytest.raises(SteerdeskError, match=match):
            RunRecord.load(bad)
    with pytest.raises(SteerdeskError, match="not found"):
        RunRecord.load(tmp_path / "missing.json")


@ARCH
def test_recipe_for_another_model_is_refused(tiny):
    record = record_generation(tiny, [PROMPT], generate(tiny, [PROMPT], sampling=SamplingSettings(max_new_tokens=2)))
    record.num_layers = 99
    with pytest.raises(SteerdeskError, match="99"):
        rerun(record, lm=tiny)
