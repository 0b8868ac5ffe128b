"""Issue 15 on the CLI (tiny llama): ``--positions`` windows are recorded and re-run token for token,
unreadable windows are a one-line usage error; ``calibrate`` computes condition vectors and finds a
gate; ``generate --condition`` gates the steered row and is recorded and re-run with its gate;
``datasets`` lists the condition set."""

from __future__ import annotations

import json

import pytest
import torch

from steerdesk import cli


@pytest.fixture(scope="module")
def tiny_folder(tiny_llama_folder):
    return tiny_llama_folder


@pytest.fixture(scope="module")
def tiny_vectors(tmp_path_factory, tiny_folder):
    from steerdesk.core.models import load_model
    from steerdesk.core.vectors import VectorSet, save_vectors

    lm = load_model(str(tiny_folder), device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(3)
    d = torch.randn(lm.info.num_layers, lm.info.hidden_size, generator=g) * 4.0
    vs = VectorSet(directions=d, norms=torch.full((lm.info.num_layers,), float("nan")),
                   metadata={"model": lm.info.name, "architecture": lm.info.architecture, "method": "random",
                             "read_position": "last", "layer_convention": "block_output"})
    path = tmp_path_factory.mktemp("vec") / "v.safetensors"
    save_vectors(vs, path)
    return str(path)


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_window_is_recorded_and_reruns(capsys, tiny_folder, tiny_vectors, tmp_path):
    model = ["--model", tiny_folder, "--device", "cpu", "--dtype", "float32"]
    recipe = tmp_path / "gen.json"
    code, out, err = run(capsys, "generate", *model, "--prompt", "Tell me about cats.", "--vector", tiny_vectors,
                         "--layers", "1", "--positions", "first:2", "--compare", "--max-new-tokens", "8", "--json",
                         "--record", recipe)
    assert code == 0, err
    first = json.loads(out)
    assert first["token_ids"] != first["unsteered"]["token_ids"]
    saved = json.loads(recipe.read_text())
    assert saved["positions"] == "first:2" and saved["settings"]["steers"][0]["positions"] == "first:2"
    code, out, err = run(capsys, "run", recipe, "--json")
    assert code == 0, err
    assert json.loads(out)["reproduced"] is True


def test_bad_window_is_a_usage_error(capsys, tiny_folder, tiny_vectors):
    code, _, err = run(capsys, "generate", "--model", tiny_folder, "--prompt", "x", "--vector", tiny_vectors,
                       "--layers", "1", "--positions", "gen:5-2")
    assert code == 2
    assert "0 <= A <= B" in err


def test_calibrate_computes_conditions_then_gates_generate(capsys, tiny_folder, tiny_vectors, tmp_path):
    model = ["--model", tiny_folder, "--device", "cpu", "--dtype", "float32"]
    cond, out_json = tmp_path / "cooking.safetensors", tmp_path / "cal.json"
    code, out, err = run(capsys, "calibrate", *model, "--condition", cond, "--dataset", "cooking", "--compute",
                         "--thresholds", "20", "-o", out_json, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["computed"] and res["prompts"] == 64 and 0 <= res["f1"] <= 1 and cond.is_file()
    full = json.loads(out_json.read_text())
    assert len(full["scores"]) == 4 and len(full["scores"][0]) == 64 and len(full["per_layer"]) == 4
    # Re-calibrating from the written file finds the same point (no --compute).
    code, out, err = run(capsys, "calibrate", *model, "--condition", cond, "--dataset", "cooking",
                         "--thresholds", "20", "--json")
    assert code == 0, err
    again = json.loads(out)
    assert (again["layer"], again["threshold"], again["f1"]) == (res["layer"], res["threshold"], res["f1"])
    # A gate that is always open steers like no gate, one that is always closed not at all.
    base = ["generate", *model, "--prompt", "How do I bake bread?", "--vector", tiny_vectors, "--layers", "1",
            "--max-new-tokens", "6", "--json", "--compare"]
    code, out, err = run(capsys, *base)
    assert code == 0, err
    plain = json.loads(out)
    for side, threshold in (("below", "1.0"), ("above", "-1.0")):  # scores lie in [-1, 1]: always open
        code, out, err = run(capsys, *base, "--condition", cond, "--condition-layer", str(res["layer"]),
                             "--threshold", threshold, "--gate-side", side)
        assert code == 0, err
        got = json.loads(out)
        assert got["gate"]["open"] is True
        assert got["token_ids"] == plain["token_ids"]
    code, out, err = run(capsys, *base, "--condition", cond, "--condition-layer", str(res["layer"]),
                         "--threshold", "1.0", "--gate-side", "above")
    assert code == 0, err
    closed = json.loads(out)
    assert closed["gate"]["open"] is False and closed["token_ids"] == plain["unsteered"]["token_ids"]
    # A gated run is recorded with its gate (direction embedded) and re-runs with it, open or closed.
    for threshold, is_open in (("-1.0", True), ("1.0", False)):
        rec = tmp_path / f"gated{threshold}.json"
        code, out, err = run(capsys, *base, "--condition", cond, "--condition-layer", str(res["layer"]),
                             "--threshold", threshold, "--record", rec)
        assert code == 0, err
        saved = json.loads(rec.read_text())
        g = saved["settings"]["gate"]
        assert (g["layer"], g["threshold"], g["side"], len(g["direction"])) == (res["layer"], float(threshold),
                                                                                "above", 64)
        assert saved["outputs"]["rows"][1]["gate_open"] is is_open
        code, out, err = run(capsys, "run", rec, "--json")
        assert code == 0, err
        assert json.loads(out)["reproduced"] is True
    code, _, err = run(capsys, *base, "--condition", cond)
    assert code == 2 and "--condition-layer" in err


def test_datasets_lists_the_condition_set(capsys):
    code, out, err = run(capsys, "datasets")
    assert code == 0, err
    assert "cooking  (condition set: 128 prompts, 64 on-topic; 64 held out)" in out
