"""Fixtures shared by the CLI tests."""

from __future__ import annotations

import pytest
import torch

from steerdesk.core import models


@pytest.fixture
def fast_model(monkeypatch, smol):
    """Reuse the session's loaded SmolLM2 instead of loading it again for every command."""
    real_load = models.load_model

    def fake_load(spec="default", **kwargs):
        if spec not in (None, "", "default"):
            return real_load(spec, **kwargs)
        return smol

    monkeypatch.setattr(models, "load_model", fake_load)
    return smol


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory, smol_folder):
    """A tiny random Llama (4 blocks, hidden 64, tied embeddings) saved with the SmolLM2 tokenizer:
    a model folder the CLI loads by path in well under a second."""
    import transformers as T

    tok = T.AutoTokenizer.from_pretrained(str(smol_folder))
    folder = tmp_path_factory.mktemp("tiny-llama")
    cfg = T.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
