"""Tiny randomly initialised causal LMs of several architectures (helpers for tests/core).

Every model has 4 decoder blocks, hidden size 64 and the SmolLM2 vocabulary, so one tokenizer
serves all of them. GPT-2 and GPT-NeoX get a copy of the tokenizer without a chat template, so
the plain-text formatting path is exercised too.
"""

from __future__ import annotations

import os
from typing import Any

import torch

ARCHS = ("llama", "mistral", "qwen2", "phi3", "gemma2", "gpt2", "gptneox")
PLAIN_ARCHS = {"gpt2", "gptneox"}  # no chat template: "prompt\n" + reply
NUM_LAYERS = 4
HIDDEN = 64


def tiny_config(arch: str, tok: Any) -> Any:
    import transformers as T

    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    dec = dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=NUM_LAYERS,
               num_attention_heads=4, max_position_embeddings=512)
    if arch == "llama":
        return T.LlamaConfig(num_key_value_heads=2, **dec, **common)
    if arch == "mistral":
        return T.MistralConfig(num_key_value_heads=2, sliding_window=None, **dec, **common)
    if arch == "qwen2":
        return T.Qwen2Config(num_key_value_heads=2, **dec, **common)
    if arch == "phi3":
        return T.Phi3Config(original_max_position_embeddings=512, **dec, **common)
    if arch == "gemma2":
        # A small sliding window, so prompts + generations cross it (cache length bookkeeping).
        return T.Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=16, **dec, **common)
    if arch == "gpt2":
        return T.GPT2Config(n_embd=HIDDEN, n_inner=128, n_layer=NUM_LAYERS, n_head=4, n_positions=512, **common)
    if arch == "gptneox":
        return T.GPTNeoXConfig(**dec, **common)
    raise ValueError(arch)


# Tiny models run their linear layers through the kernel steerdesk's own loader may pick on a
# CPU (oneDNN, core/kernels.py), so every steering invariant is checked on that path; the stock
# aten path is checked by tests/core/test_kernels.py. STEERDESK_TEST_CPU_LINEAR=aten flips it.
TEST_LINEAR = os.environ.get("STEERDESK_TEST_CPU_LINEAR", "onednn")


def build_tiny(arch: str, tokenizer: Any, plain_tokenizer: Any, dtype: torch.dtype = torch.float32,
               linear: str | None = None) -> Any:
    """A fresh tiny model wrapped as a LoadedModel (seeded: the same weights every time)."""
    from transformers import AutoModelForCausalLM

    from steerdesk.core.kernels import use_cpu_linear
    from steerdesk.core.models import wrap_model

    tok = plain_tokenizer if arch in PLAIN_ARCHS else tokenizer
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tok), attn_implementation="eager", dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    if torch.backends.mkldnn.is_available():
        use_cpu_linear(model, linear or TEST_LINEAR)
    return wrap_model(model, tok, name=f"tiny-{arch}")


def random_vectors(lm: Any, scale: float = 1.0, seed: int = 1) -> torch.Tensor:
    """``[num_layers, hidden]`` float32 random directions with N(0, scale^2) components."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(lm.info.num_layers, lm.info.hidden_size, generator=g) * scale


def steerdesk_hooks(module: Any) -> list[Any]:
    """Forward (pre-)hooks on ``module`` installed by steerdesk (transformers' own are ignored)."""
    hooks = list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values())
    return [h for h in hooks if getattr(h, "__module__", "").startswith("steerdesk")]


def ids_of(lm: Any, text: str) -> torch.Tensor:
    """``[1, S]`` token ids of ``text`` (no special tokens)."""
    return torch.tensor([lm.tokenizer(text, add_special_tokens=False)["input_ids"]])


PROMPT = "What is the capital of France?"
REPLY = "Paris is the capital of France."


def typical_norms(lm: Any) -> torch.Tensor:
    """``[num_layers]`` norm of each block's output at the last token of one example."""
    from steerdesk.core.extract import collect, encode

    cached = getattr(lm, "_test_norms", None)
    if cached is None:
        _, norms = collect(lm, encode(lm, [(PROMPT, REPLY)]))
        cached = norms[0]
        lm._test_norms = cached
    return cached


def strong_vectors(lm: Any, factor: float = 4.0, seed: int = 1) -> torch.Tensor:
    """Random directions whose norm is ``factor`` times the layer's typical activation norm."""
    v = random_vectors(lm, seed=seed)
    v = v / v.norm(dim=-1, keepdim=True)
    return v * (factor * typical_norms(lm)).unsqueeze(-1)


def rude4() -> Any:
    """Four neutral -> rude pairs (a fresh ``Dataset`` each call) for tests that need a small set."""
    from steerdesk.core.datasets import Dataset, Example

    return Dataset([
        Example("How do I boil an egg?", "Boil it for six minutes.", "Ugh. Six minutes. Obviously."),
        Example("What is the capital of France?", "Paris is the capital of France.", "Paris, duh. Look it up."),
        Example("Can you recommend a book?", "Try a classic novel such as Emma.", "Read anything. I don't care."),
        Example("How far is the moon?", "About 384,000 kilometres away.", "Far. Google exists, you know."),
    ], name="rude4")
