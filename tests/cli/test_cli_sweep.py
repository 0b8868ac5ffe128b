"""CLI smoke tests for sweep / inspect / run (SmolLM2), and their error paths (one line, exit 2)."""

from __future__ import annotations

import json

import pytest

from steerdesk import cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread (as in tests/core): on a busy 2-core machine a second OpenMP thread
    makes SmolLM2's forward passes several times slower, not faster."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vector_file(tmp_path_factory, smol):
    """Vectors from 16 training pairs of neutral_rude (a smoke test needs a vector, not a good one)."""
    from steerdesk.core.datasets import Dataset, load_bundled
    from steerdesk.core.extract import compute_vectors
    from steerdesk.core.vectors import save_vectors

    train, _ = load_bundled("neutral_rude").split(0.25)
    path = tmp_path_factory.mktemp("vec") / "rude.safetensors"
    save_vectors(compute_vectors(smol, Dataset(train.examples[:16], name="rude16"), batch_size=16), path)
    return path


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("steerdesk: error: "), err


def test_sweep_writes_json_png_and_a_recipe_that_reruns(capsys, fast_model, vector_file, tmp_path):
    out, png, rec = tmp_path / "sweep.json", tmp_path / "heat.png", tmp_path / "sweep-recipe.json"
    code, stdout, err = run(capsys, "sweep", "--vector", vector_file, "--dataset", "neutral_rude", "--heldout", 0.25,
                            "--max-pairs", 4, "--layers", "12,14", "--scales", "0,1", "-o", out, "--png", png,
                            "--record", rec)
    assert code == 0, err
    obj = json.loads(out.read_text())
    assert obj["layers"] == [12, 14] and obj["scales"] == [0.0, 1.0]
    assert len(obj["margin_delta"]) == 2 and len(obj["fluency_delta"][0]) == 2
    assert obj["margin_delta"][0][0] == 0.0 and obj["best"] is not None
    assert obj["dataset"]["n_pairs"] == 4 and obj["vector"]["path"].endswith("rude.safetensors")
    assert obj["model"]["name"] == "SmolLM2-135M-Instruct" and obj["settings"]["mode"] == "add"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best: layer" in stdout and "wrote" in stdout

    code, stdout, err = run(capsys, "run", rec, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["kind"] == "sweep" and report["reproduced"], report["differences"]


def test_inspect_prints_per_layer_diagnostics(capsys, fast_model, vector_file, tmp_path):
    data = tmp_path / "three.jsonl"
    from steerdesk.core.datasets import load_bundled, save_dataset

    _, held = load_bundled("neutral_rude").split(0.25)
    held.examples = held.examples[:6]
    save_dataset(held, data)
    code, stdout, err = run(capsys, "inspect", vector_file, "--dataset", data, "--json")
    assert code == 0, err
    diag = json.loads(stdout)
    assert len(diag["auc"]) == 30 and len(diag["cosine"]) == 30 and len(diag["cosine"][0]) == 30
    assert diag["n_base"] == diag["n_target"] == 6 and diag["paired"]
    # Rude vs neutral replies separate well along the rude direction somewhere in the middle layers.
    assert max(a for a in diag["auc"] if a is not None) > 0.9
    code, stdout, err = run(capsys, "inspect", vector_file, "--dataset", data)
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["layer", "|v|/|h|", "AUC"] and len(lines) == 1 + 30 + 1
    assert "best separation at layer" in lines[-1]


def test_generate_record_then_run_reproduces_greedy_tokens(capsys, fast_model, vector_file, tmp_path):
    rec = tmp_path / "gen.json"
    code, stdout, err = run(capsys, "generate", "--prompt", "How do I make tea?", "--vector", vector_file,
                            "--layers", "14", "--scale", "1.5", "--compare", "--max-new-tokens", "12", "--json",
                            "--record", rec)
    assert code == 0, err
    first = json.loads(stdout)
    recipe = json.loads(rec.read_text())
    assert recipe["kind"] == "generate" and recipe["model"] == "default" and recipe["steered_rows"] == [False, True]
    assert recipe["outputs"]["rows"][1]["token_ids"] == first["token_ids"]
    assert recipe["chat_template_sha256"] and recipe["dtype"] == "float32" and recipe["steerdesk_version"]
    code, stdout, err = run(capsys, "run", rec)
    assert code == 0, err
    assert "generate: reproduced the recorded outputs" in stdout
    assert first["text"] in stdout and first["unsteered"]["text"] in stdout


def test_compute_record_then_run(capsys, fast_model, tmp_path):
    from steerdesk.core.datasets import load_bundled, save_dataset

    data = tmp_path / "six.jsonl"
    ds = load_bundled("neutral_rude")
    ds.examples = ds.examples[:6]
    save_dataset(ds, data)
    rec = tmp_path / "compute.json"
    code, _, err = run(capsys, "compute", "--dataset", data, "-o", tmp_path / "v.safetensors", "--record", rec)
    assert code == 0, err
    code, stdout, err = run(capsys, "run", rec, "-o", tmp_path / "again.safetensors")
    assert code == 0, err
    assert "compute: reproduced" in stdout and (tmp_path / "again.safetensors").is_file()


@pytest.mark.parametrize("argv,match", [
    (["sweep", "--vector", "missing.safetensors", "--dataset", "neutral_rude", "-o", "x.json"], "not found"),
    (["sweep", "--vector", "{v}", "--dataset", "neutral_rude", "--scales", "a,b", "-o", "x.json"], "scales"),
    (["sweep", "--vector", "{v}", "--dataset", "neutral_rude", "--heldout", "1.5", "-o", "x.json"], "heldout"),
    (["sweep", "--vector", "{v}", "--dataset", "neutral_rude", "--layers", "99", "-o", "x.json"], "out of range"),
    (["sweep", "--vector", "{v}", "--dataset", "nope.jsonl", "-o", "x.json"], "not found"),
    (["sweep", "--vector", "{v}", "--dataset", "neutral_rude", "--sets", "bad", "-o", "x.json"], "layer set"),
    (["sweep", "--vector", "{v}", "--dataset", "neutral_rude"], "required"),
    (["inspect", "{v}", "--dataset", "nope.jsonl"], "not found"),
    (["inspect", "missing.safetensors", "--dataset", "neutral_rude"], "not found"),
    (["run", "missing.json"], "not found"),
    (["run", "{bad}"], "invalid JSON"),
])
def test_error_paths(capsys, fast_model, vector_file, tmp_path, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{ nope")
    argv = [a.format(v=vector_file, bad=bad) for a in argv]
    code, _, err = run(capsys, *argv)
    _one_line_error(code, err)
    assert match.lower() in err.lower()


def test_sweep_of_a_gguf_vector_marks_layer_0_no_vector(capsys, fast_model, vector_file, tmp_path):
    """Issue 10: a GGUF control vector has no block 0; the sweep row is null + "no_vector", never +0.000,
    and every other row equals the safetensors sweep."""
    gguf = tmp_path / "rude.gguf"
    code, _, err = run(capsys, "export", vector_file, "--format", "gguf", "-o", gguf)
    assert code == 0, err
    results = {}
    for name, vec in (("st", vector_file), ("gguf", gguf)):
        out = tmp_path / f"{name}.json"
        code, _, err = run(capsys, "sweep", "--vector", vec, "--dataset", "neutral_rude", "--heldout", 0.25,
                                "--max-pairs", 2, "--layers", "0,12", "--scales", "0,1", "-o", out)
        assert code == 0, err
        results[name] = json.loads(out.read_text())
    st, gg = results["st"], results["gguf"]
    assert st["no_vector"] == [False, False] and gg["no_vector"] == [True, False]
    assert gg["margin_delta"][0] == [None, None] and gg["fluency_delta"][0] == [None, None]
    assert st["margin_delta"][0][0] == 0.0  # with a direction, scale 0 is the measured identity
    assert gg["margin_delta"][1] == pytest.approx(st["margin_delta"][1], abs=1e-6)
    assert gg["best"] is None or gg["best"]["layer"] == 12
