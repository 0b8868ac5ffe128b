"""Issue 15 item 5 on the CLI (tiny llama): ``sweep --positions WINDOW --condition ...`` scores with the
window and the gate, records both, and ``steerdesk run`` re-runs the recipe to the same cells and the
same gate decisions; a generation grid recorded with a window and a gate re-runs token for token;
bad gate options and windows are one line, exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from steerdesk import cli


@pytest.fixture(scope="module")
def lm(tiny_llama_folder):
    from steerdesk.core.models import load_model

    return load_model(str(tiny_llama_folder), device="cpu", dtype="float32")


def _save(lm, path, seed, scale, **meta):
    from steerdesk.core.vectors import VectorSet, save_vectors

    g = torch.Generator().manual_seed(seed)
    d = torch.randn(lm.info.num_layers, lm.info.hidden_size, generator=g) * scale
    vs = VectorSet(directions=d, norms=torch.full((lm.info.num_layers,), float("nan")),
                   metadata={"model": lm.info.name, "architecture": lm.info.architecture,
                             "layer_convention": "block_output", **meta})
    save_vectors(vs, path)
    return vs


@pytest.fixture(scope="module")
def files(tmp_path_factory, lm):
    """A steering vector file, a condition vector file and a threshold that opens half the prompts."""
    from steerdesk.core.condition import ConditionGate, gate_scores
    from steerdesk.core.datasets import resolve_dataset

    folder = tmp_path_factory.mktemp("gate")
    vec, cond = folder / "v.safetensors", folder / "c.safetensors"
    _save(lm, vec, 3, 2.0, method="random", read_position="last")
    cs = _save(lm, cond, 5, 1.0, kind="condition", method="mean-diff", read_position="prompt-mean")
    prompts = [e.prompt for e in resolve_dataset("neutral_rude", None).examples[:4]]
    scores = gate_scores(lm, prompts, ConditionGate(2, cs.directions[2], 0.0)).sort().values
    assert float(scores[2] - scores[1]) > 1e-4
    return str(vec), str(cond), float(scores[1] + scores[2]) / 2


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _model(folder):
    return ["--model", folder, "--device", "cpu", "--dtype", "float32"]


def test_gated_windowed_sweep_is_recorded_and_reruns(capsys, tiny_llama_folder, files, tmp_path):
    vec, cond, threshold = files
    out, rec = tmp_path / "s.json", tmp_path / "recipe.json"
    common = [*_model(tiny_llama_folder), "--vector", vec, "--dataset", "neutral_rude", "--max-pairs", 4,
              "--layers", "1,2", "--scales", "0,2", "--positions", "first:2", "--kl"]
    code, stdout, err = run(capsys, "sweep", *common, "--condition", cond, "--condition-layer", 2,
                            "--threshold", threshold, "-o", out, "--record", rec, "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["positions"] == "first:2" and summary["gate"]["n_open"] == 2
    obj = json.loads(out.read_text())
    assert obj["settings"]["positions"] == "first:2" and obj["gate"]["open"].count(True) == 2
    recipe = json.loads(rec.read_text())
    assert recipe["positions"] == "first:2"
    assert recipe["settings"]["gate"]["layer"] == 2 and recipe["settings"]["gate"]["threshold"] == threshold
    assert recipe["outputs"]["gate"]["open"] == obj["gate"]["open"]
    # The same sweep without the gate differs (half the pairs were unsteered), so the gate was used.
    code, _, err = run(capsys, "sweep", *common, "-o", tmp_path / "plain.json")
    assert code == 0, err
    plain = json.loads((tmp_path / "plain.json").read_text())
    flat = lambda rows: [x for r in rows for x in r]
    assert plain["margin_delta"] != obj["margin_delta"] and flat(plain["kl"]) == pytest.approx(flat(obj["kl"]))
    code, stdout, err = run(capsys, "run", rec, "--json")
    assert code == 0, err
    again = json.loads(stdout)
    assert again["reproduced"] is True, again["differences"]
    assert again["record"]["settings"]["gate"] == recipe["settings"]["gate"]
    assert again["record"]["positions"] == "first:2"


def test_grid_recipe_with_window_and_gate_reruns(capsys, lm, files, tmp_path):
    from steerdesk import jobs
    from steerdesk.core.condition import ConditionGate, condition_read
    from steerdesk.core.generate import SamplingSettings
    from steerdesk.core.vectors import load_vectors

    vec, cond, threshold = files
    cs = load_vectors(cond)
    gate = ConditionGate(2, cs.directions[2], threshold, "above", condition_read(cs))
    prompts = ("How do I boil an egg?", "What is the capital of France?", "Can you recommend a book?")
    spec = jobs.GridSpec(vectors=load_vectors(vec), layers=(1, 2), scales=(2.0,), prompts=prompts,
                         sampling=SamplingSettings(max_new_tokens=6), positions="gen:1-3", gate=gate,
                         vector_path=vec, model=str(lm.info.name))
    rows = jobs.grid.run(lm, spec, jobs.JobContext())
    rec = jobs.grid.record(lm, spec, rows)
    assert rec.positions == "gen:1-3" and rec.settings["gate"]["threshold"] == threshold
    assert {r["gate_open"] for r in rec.outputs["rows"] if r["layer"] is not None} == {True, False}
    path = tmp_path / "grid.json"
    rec.model = str(lm.info.name)
    rec.save(path)
    out = jobs.rerun.rerun(rec, lm=lm)
    assert out.reproduced, out.differences
    assert out.spec.positions == "gen:1-3" and out.spec.gate.threshold == threshold


@pytest.mark.parametrize("extra,match", [
    (["--condition", "C", "--condition-layer", "2"], "--condition needs --condition-layer and --threshold"),
    (["--threshold", "0.1"], "need --condition"),
    (["--condition", "missing.safetensors", "--condition-layer", "2", "--threshold", "0.1"], "not found"),
    (["--positions", "gen:5-2"], "0 <= A <= B"),
])
def test_bad_gate_or_window_is_one_line(capsys, tiny_llama_folder, files, tmp_path, extra, match):
    vec, cond, _ = files
    extra = [cond if x == "C" else x for x in extra]
    code, _, err = run(capsys, "sweep", *_model(tiny_llama_folder), "--vector", vec, "--dataset", "neutral_rude",
                       "--max-pairs", 2, "--layers", "1", "-o", tmp_path / "x.json", *extra)
    assert code == 2
    assert match in err and len(err.strip().splitlines()) <= 2  # argparse adds its usage line
    assert not (tmp_path / "x.json").exists()
