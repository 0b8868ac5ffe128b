"""Finding decoder blocks, resolving model sources, ModelInfo."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from steerdesk.core import models
from steerdesk.core.errors import SteerdeskError
from steerdesk.core.models import find_blocks, pick_dtype, resolve_source, wrap_model

EXPECTED_PATH = {
    "llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers", "phi3": "model.layers",
    "gemma2": "model.layers", "gpt2": "transformer.h", "gptneox": "gpt_neox.layers",
}


def test_find_blocks_each_arch(tiny, arch):
    blocks, path = find_blocks(tiny.model)
    assert path == EXPECTED_PATH[arch]
    assert isinstance(blocks, torch.nn.ModuleList)
    assert len(blocks) == tiny.model.config.num_hidden_layers == tiny.info.num_layers
    obj = tiny.model
    for part in path.split("."):
        obj = getattr(obj, part)
    assert obj is blocks
    assert tiny.info.block_path == path
    assert tiny.info.hidden_size == 64
    assert tiny.info.architecture == type(tiny.model).__name__


class _NoBlocks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=4, hidden_size=8)
        self.proj = torch.nn.Linear(8, 8)


def test_find_blocks_unknown_layout_names_what_it_found():
    with pytest.raises(SteerdeskError) as err:
        find_blocks(_NoBlocks())
    msg = str(err.value)
    assert "_NoBlocks" in msg
    assert "proj (Linear)" in msg


class _OddLayout(torch.nn.Module):
    """No known attribute path: falls back to the ModuleList whose length is num_hidden_layers."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=3, hidden_size=8)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(5))
        self.stack = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))


def test_find_blocks_fallback_prefers_num_hidden_layers():
    blocks, path = find_blocks(_OddLayout())
    assert path == "stack" and len(blocks) == 3


def test_resolve_source_missing_path(tmp_path):
    with pytest.raises(SteerdeskError, match="does not exist"):
        resolve_source(str(tmp_path / "nope" / "model"))
    with pytest.raises(SteerdeskError, match="does not exist"):
        resolve_source("./definitely-not-here")


def test_resolve_source_missing_gguf_file(tmp_path):
    with pytest.raises(SteerdeskError, match="not found") as err:
        resolve_source(str(tmp_path / "model.gguf"))
    assert "model.gguf" in str(err.value)


def test_resolve_source_folder_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(SteerdeskError, match="config.json") as err:
        resolve_source(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_resolve_source_file_that_is_not_a_model(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hi")
    with pytest.raises(SteerdeskError, match="not a model folder"):
        resolve_source(str(f))


def test_resolve_source_ok_cases(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_source(str(tmp_path)) == (str(tmp_path.resolve()), None)
    gg = tmp_path / "sub"
    gg.mkdir()
    (gg / "m.gguf").write_bytes(b"GGUF")
    assert resolve_source(str(gg)) == (str(gg.resolve()), "m.gguf")
    assert resolve_source(str(gg / "m.gguf")) == (str(gg.resolve()), "m.gguf")
    assert resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    _, name = resolve_source("default")
    assert name.endswith(".gguf")


def test_load_model_missing_path_is_a_steerdesk_error(tmp_path):
    with pytest.raises(SteerdeskError):
        models.load_model(str(tmp_path / "missing"))


def test_pick_dtype():
    assert pick_dtype("auto", "cpu") == torch.float32
    assert pick_dtype("bf16", "cpu") == torch.bfloat16
    assert pick_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(SteerdeskError, match="Unknown dtype"):
        pick_dtype("float8", "cpu")


def test_wrap_model_sets_a_pad_token(fresh_tiny, plain_tokenizer):
    import copy

    tok = copy.deepcopy(plain_tokenizer)
    tok.pad_token = None
    assert tok.pad_token_id is None
    lm = wrap_model(fresh_tiny("gpt2").model, tok)
    assert lm.tokenizer.pad_token_id is not None
    assert lm.info.has_chat_template is False


@pytest.mark.slow
def test_smol_model_info(smol):
    info = smol.info
    assert info.num_layers == 30
    assert info.hidden_size == 576
    assert info.has_chat_template is True
    assert info.architecture == "LlamaForCausalLM"
    assert info.block_path == "model.layers"
    assert info.name == models.EMBEDDED_NAME
    assert info.dtype == "float32" and info.device == "cpu"
    assert len(smol.blocks) == 30
    assert info.to_dict()["num_layers"] == 30


def test_load_model_from_a_local_folder(fresh_tiny, tmp_path):
    lm = fresh_tiny("qwen2")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    loaded = models.load_model(str(tmp_path), device="cpu")
    assert loaded.info.architecture == "Qwen2ForCausalLM"
    assert loaded.info.num_layers == 4 and loaded.info.hidden_size == 64
    assert loaded.info.source == str(tmp_path.resolve())
    assert not loaded.model.training
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, lm.model(input_ids=ids).logits)
    half = models.load_model(str(tmp_path), device="cpu", dtype="bfloat16")
    assert half.info.dtype == "bfloat16"
