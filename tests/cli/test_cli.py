"""CLI smoke tests: every command, JSON output, and error paths (one line, exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from steerdesk import cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vector_file(tmp_path_factory, smol):
    from steerdesk.core.datasets import load_bundled
    from steerdesk.core.extract import compute_vectors
    from steerdesk.core.vectors import save_vectors

    train, _ = load_bundled("neutral_rude").split(0.25)
    path = tmp_path_factory.mktemp("vec") / "rude.safetensors"
    save_vectors(compute_vectors(smol, train, batch_size=16), path)
    return path


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_json(capsys, fast_model):
    code, out, _ = run(capsys, "info", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["num_layers"] == 30 and info["hidden_size"] == 576 and info["has_chat_template"]


def test_compute_writes_a_vector_file(capsys, fast_model, tmp_path):
    from steerdesk.core.datasets import load_bundled, save_dataset

    small = load_bundled("neutral_rude")
    small.examples = small.examples[:8]
    save_dataset(small, tmp_path / "small.jsonl")
    out_file = tmp_path / "v.safetensors"
    code, out, err = run(capsys, "compute", "--dataset", str(tmp_path / "small.jsonl"), "--batch-size", "8",
                         "-o", str(out_file), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["layers"] == 30 and out_file.is_file()
    from steerdesk.core.vectors import load_vectors

    vs = load_vectors(out_file)
    assert vs.metadata["method"] == "mean-diff" and vs.metadata["layer_convention"] == "block_output"


def test_generate_compare_json(capsys, fast_model, vector_file):
    code, out, err = run(capsys, "generate", "--prompt", "How do I make tea?", "--vector", str(vector_file),
                         "--layers", "14", "--scale", "1.5", "--compare", "--max-new-tokens", "16", "--json")
    assert code == 0, err
    obj = json.loads(out)
    assert set(obj) >= {"text", "token_ids", "unsteered"}
    assert set(obj["unsteered"]) >= {"text", "token_ids"}
    assert 0 < len(obj["token_ids"]) <= 16
    assert obj["token_ids"] != obj["unsteered"]["token_ids"]


def test_generate_unsteered_equals_compare_row(capsys, fast_model, vector_file):
    code, out, _ = run(capsys, "generate", "--prompt", "How do I make tea?", "--max-new-tokens", "12", "--json")
    assert code == 0
    plain = json.loads(out)
    code, out, _ = run(capsys, "generate", "--prompt", "How do I make tea?", "--vector", str(vector_file),
                       "--layers", "14", "--compare", "--max-new-tokens", "12", "--json")
    assert json.loads(out)["unsteered"]["token_ids"] == plain["token_ids"]


def test_export_gguf_and_generate_from_it(capsys, fast_model, vector_file, tmp_path):
    gguf_file = tmp_path / "rude.gguf"
    code, out, _ = run(capsys, "export", str(vector_file), "--format", "gguf", "-o", str(gguf_file))
    assert code == 0 and gguf_file.is_file()
    code, out, _ = run(capsys, "generate", "--prompt", "How do I make tea?", "--vector", str(vector_file),
                       "--layers", "14,15", "--max-new-tokens", "10", "--json")
    from_st = json.loads(out)
    code, out, err = run(capsys, "generate", "--prompt", "How do I make tea?", "--vector", str(gguf_file),
                         "--layers", "14-15", "--max-new-tokens", "10", "--json")
    assert code == 0, err
    assert json.loads(out)["token_ids"] == from_st["token_ids"]


@pytest.mark.parametrize("argv, fragment", [
    (["generate", "--prompt", "x", "--layers", "99", "--vector", "VEC"], "out of range"),
    (["generate", "--prompt", "x", "--vector", "VEC"], "--layers"),
    (["generate", "--prompt", "x", "--vector", "VEC", "--layers", "3", "--scale", "nan"], "finite"),
    (["generate", "--prompt", "x", "--vector", "VEC", "--layers", "3", "--scale", "1e6"], "absurd"),
    (["generate", "--prompt", "x", "--vector", "/no/such.safetensors", "--layers", "3"], "not found"),
    (["generate", "--prompt", "x", "--model", "/no/such/model"], "does not exist"),
    (["compute", "--dataset", "/no/such.jsonl", "-o", "x.safetensors"], "not found"),
    (["generate"], "--prompt"),
    (["frobnicate"], "invalid choice"),
])
def test_errors_are_one_line_exit_2(capsys, fast_model, vector_file, argv, fragment):
    argv = [str(vector_file) if a == "VEC" else a for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert fragment in lines[0]


def test_wrong_model_vectors_refused(capsys, fast_model, tmp_path):
    import torch

    from steerdesk.core.vectors import VectorSet, save_vectors

    other = VectorSet(torch.ones(12, 768), torch.ones(12), {
        "format": "steerdesk.vectors/1", "model": "gpt2", "architecture": "GPT2LMHeadModel", "num_layers": "12",
        "hidden_size": "768", "method": "mean-diff", "read_position": "last", "layer_convention": "block_output"})
    path = tmp_path / "gpt2.safetensors"
    save_vectors(other, path)
    code, _, err = run(capsys, "generate", "--prompt", "x", "--vector", str(path), "--layers", "3")
    assert code == 2
    assert "made for gpt2" in err and "hidden size 768 vs 576" in err


def test_subprocess_end_to_end(tmp_path):
    """The real entry point in a fresh process: bad input exits 2 with one line, no traceback."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"base": "a", "target": "b"}\n{not json}\n', encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "steerdesk", "compute", "--dataset", str(bad), "-o",
                           str(tmp_path / "x.safetensors")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("steerdesk: error:")
    assert "line 2" in proc.stderr and "Traceback" not in proc.stderr
