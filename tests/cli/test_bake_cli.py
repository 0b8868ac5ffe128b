"""``steerdesk bake``: a tiny model folder in, a checkpoint folder out; bad input is one line and exit 2.

Tiny random models saved to folders (loaded by path, float32, CPU) keep these tests fast; the
exactness of baking in a fresh process is tested in tests/core/test_bake.py.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import pytest
import torch

from steerdesk import cli


def _save_tiny(folder, tokenizer, config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # non-trivial norms and biases
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory, smol_folder):
    """A tiny Mistral (re-expressed with a sliding-window limit) and a tiny Gemma 2 (refused), on disk."""
    import transformers as T
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol_folder))
    root = tmp_path_factory.mktemp("tiny-models")
    common = {"vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
              "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    _save_tiny(root / "mistral", tok, T.MistralConfig(sliding_window=128, **common))
    _save_tiny(root / "gemma2", tok, T.Gemma2Config(head_dim=16, sliding_window=16, **common))
    return root


def _vector_file(path, model_folder, seed=1, **meta):
    from transformers import AutoConfig

    from steerdesk.core.vectors import VectorSet, save_vectors

    cfg = AutoConfig.from_pretrained(str(model_folder))
    g = torch.Generator().manual_seed(seed)
    metadata = {"model": str(model_folder), "architecture": cfg.architectures[0], "method": "mean-diff",
                "read_position": "last", "layer_convention": "block_output", **meta}
    save_vectors(VectorSet(torch.randn(4, 64, generator=g), torch.ones(4), metadata), path)
    return path


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _model_args(folder):
    return ["--model", str(folder), "--device", "cpu", "--dtype", "float32"]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("steerdesk: error:")
    return lines[0]


def test_bake_writes_a_checkpoint_and_states_the_window_limit(capsys, tiny_folders, tmp_path):
    vec = _vector_file(tmp_path / "v.safetensors", tiny_folders / "mistral")
    out_dir = tmp_path / "baked"
    code, out, err = run(capsys, "bake", *_model_args(tiny_folders / "mistral"), "--vector", str(vec),
                         "--layers", "1-2", "--scale", "-1.5", "--normalize", "-o", str(out_dir), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["layers"] == [1, 2] and summary["target_model_type"] == "llama" and summary["re_expressed"]
    assert summary["exact_up_to_tokens"] == 128 and summary["max_logit_diff"] < 1e-4
    meta = json.loads((out_dir / "steerdesk_bake.json").read_text())
    assert meta["scale"] == -1.5 and meta["normalize"] is True and meta["exact_up_to_tokens"] == 128
    assert len(meta["vector"]["file_sha256"]) == 64 and meta["vector"]["path"] == str(vec.resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baked", "v.safetensors"]
    # Plain text output names the limit.
    code, out, err = run(capsys, "bake", *_model_args(tiny_folders / "mistral"), "--vector", str(vec),
                         "--layers", "1", "-o", str(out_dir), "--force")
    assert code == 0, err
    assert "LIMIT: exact only for sequences up to 128 tokens" in out


@pytest.mark.parametrize("argv, fragment", [
    (["--mode", "project"], "'project' steering cannot be baked exactly"),
    (["--mode", "clamp"], "'clamp' steering cannot be baked exactly"),
    (["--layers", "9"], "Layer 9 is out of range"),
    (["--layers", "x"], "Cannot read layers"),
])
def test_bad_settings_are_one_line_exit_2(capsys, tiny_folders, tmp_path, argv, fragment):
    vec = _vector_file(tmp_path / "v.safetensors", tiny_folders / "mistral")
    base = ["bake", *_model_args(tiny_folders / "mistral"), "--vector", str(vec), "--layers", "1",
            "-o", str(tmp_path / "out")]
    code, _, err = run(capsys, *base, *argv)
    assert code == 2 and fragment in _one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_existing_folder_needs_force(capsys, tiny_folders, tmp_path):
    vec = _vector_file(tmp_path / "v.safetensors", tiny_folders / "mistral")
    (tmp_path / "out").mkdir()
    argv = ["bake", *_model_args(tiny_folders / "mistral"), "--vector", str(vec), "--layers", "1",
            "-o", str(tmp_path / "out")]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "already exists" in _one_error_line(err)
    code, _, err = run(capsys, *argv, "--force")
    assert code == 0 and (tmp_path / "out" / "config.json").is_file()


def test_gemma2_and_foreign_vectors_are_refused(capsys, tiny_folders, tmp_path):
    vec = _vector_file(tmp_path / "g.safetensors", tiny_folders / "gemma2")
    code, _, err = run(capsys, "bake", *_model_args(tiny_folders / "gemma2"), "--vector", str(vec),
                       "--layers", "1", "-o", str(tmp_path / "out"))
    assert code == 2 and "norm follows each residual writer" in _one_error_line(err)
    # A set made for Gemma 2 on the Mistral model (same sizes, another architecture).
    code, _, err = run(capsys, "bake", *_model_args(tiny_folders / "mistral"), "--vector", str(vec),
                       "--layers", "1", "-o", str(tmp_path / "out"))
    assert code == 2 and "were made for" in _one_error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.safetensors"]


def test_disk_full_is_one_line_and_leaves_nothing(capsys, tiny_folders, tmp_path, monkeypatch):
    import transformers.modeling_utils as mu

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\0" * 1024)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mu, "safe_save_file", full)
    vec = _vector_file(tmp_path / "v.safetensors", tiny_folders / "mistral")
    code, _, err = run(capsys, "bake", *_model_args(tiny_folders / "mistral"), "--vector", str(vec),
                       "--layers", "1", "-o", str(tmp_path / "out"))
    assert code == 2 and "the disk is full" in _one_error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.safetensors"]


def test_refusal_in_a_fresh_process(tmp_path, tiny_folders):
    """The real entry point: a refused mode exits 2 with one line, before the model loads."""
    vec = _vector_file(tmp_path / "v.safetensors", tiny_folders / "mistral")
    proc = subprocess.run([sys.executable, "-m", "steerdesk", "bake", "--model", str(tmp_path / "absent"),
                           "--vector", str(vec), "--layers", "1", "--mode", "clamp", "-o", str(tmp_path / "o")],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "'clamp' steering cannot be baked exactly" in _one_error_line(proc.stderr)
