"""The lean Llama-style block forward (core/lean_blocks.py): bitwise the transformers forward, or not used.

The reference is transformers' own block forward on the same weights (the lean one uninstalled),
compared with ``torch.equal``: logits of a padded batch, KV-cached steered generation token for
token, and int8 / int4 quantised blocks. Architectures of another shape keep transformers' forward.
"""

from __future__ import annotations

import pytest
import torch
from tinylm import HIDDEN, NUM_LAYERS, tiny_config

from steerdesk.core import lean_blocks
from steerdesk.core.generate import SamplingSettings, generate
from steerdesk.core.models import wrap_model
from steerdesk.core.steering import Steer


def _sdpa_tiny(arch: str, tokenizer, attn: str = "sdpa"):
    import transformers as T

    torch.manual_seed(0)
    sizes = dict(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=NUM_LAYERS,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if arch == "qwen3":  # q/k norms inside attention: another shape
        config = T.Qwen3Config(head_dim=16, **sizes)
    elif arch == "smollm3":  # Llama's shape, but layers without RoPE: code the structure does not show
        config = T.SmolLM3Config(no_rope_layers=[1, 0, 1, 1], pad_token_id=tokenizer.pad_token_id, **sizes)
    else:
        config = tiny_config(arch, tokenizer)
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    model.eval().requires_grad_(False)
    return wrap_model(model, tokenizer, name=f"tiny-{arch}")


def _logits(lm, on: bool) -> torch.Tensor:
    if on:
        assert lean_blocks.install(lm.model, lm.blocks) == NUM_LAYERS
    else:
        lean_blocks.uninstall(lm.blocks)
    assert lean_blocks.installed(lm.blocks) == on
    ids = torch.tensor([[5, 17, 300, 41, 9, 77, 1000], [0, 0, 12, 13, 14, 15, 16]])
    mask = (torch.arange(7)[None] >= torch.tensor([[0], [2]])).long()  # row 1 left-padded
    with torch.inference_mode():
        return lm.model(input_ids=ids, attention_mask=mask).logits


def _tokens(lm, on: bool) -> list[list[int]]:
    lean_blocks.install(lm.model, lm.blocks) if on else lean_blocks.uninstall(lm.blocks)
    torch.manual_seed(3)
    v = torch.randn(HIDDEN) * 4
    rows = [[], [Steer(layer=1, vector=v, scale=2.0)], [Steer(layer=2, vector=v, mode="clamp", positions="gen:2-5")]]
    out = generate(lm, ["Tell me about cats.", "Hi", "Write a haiku about rain, please."], rows,
                   sampling=SamplingSettings(max_new_tokens=12, temperature=0.8, seed=7))
    return [r.token_ids for r in out]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_bitwise_equal_logits_and_tokens(tokenizer, arch):
    lm = _sdpa_tiny(arch, tokenizer)
    assert torch.equal(_logits(lm, True), _logits(lm, False))
    assert _tokens(lm, True) == _tokens(lm, False)  # KV cache, steering hooks, per-row sampling


@pytest.mark.parametrize("bits", [8, 4])
def test_bitwise_equal_on_quantised_blocks(tokenizer, bits):
    from steerdesk.core.quantize import quantize_weights

    lm = _sdpa_tiny("llama", tokenizer)
    quantize_weights(lm.model, lm.blocks, bits=bits)
    assert hasattr(lm.blocks[0].self_attn, "fused_q_proj_k_proj_v_proj")  # the one-product path is taken
    assert torch.equal(_logits(lm, True), _logits(lm, False))
    assert _tokens(lm, True) == _tokens(lm, False)


def test_hooks_on_blocks_still_run(tokenizer):
    lm = _sdpa_tiny("llama", tokenizer)
    assert lean_blocks.install(lm.model, lm.blocks) == NUM_LAYERS
    seen = []
    handle = lm.blocks[2].register_forward_hook(lambda _m, _a, out: seen.append(out.shape))
    try:
        _logits(lm, True)
    finally:
        handle.remove()
    assert seen == [torch.Size([2, 7, HIDDEN])]


@pytest.mark.parametrize("arch, attn", [("phi3", "sdpa"), ("qwen3", "sdpa"), ("smollm3", "sdpa"),
                                        ("gemma2", "eager"), ("gpt2", "sdpa"), ("llama", "eager")])
def test_other_shapes_keep_the_transformers_forward(tokenizer, arch, attn):
    lm = _sdpa_tiny(arch, tokenizer, attn)
    assert not any(lean_blocks.fits(lm.model, b) for b in lm.blocks)  # refused before any check runs
    assert lean_blocks.install(lm.model, lm.blocks) == 0
    assert not lean_blocks.installed(lm.blocks) and all("forward" not in b.__dict__ for b in lm.blocks)


def test_a_lean_forward_that_differs_is_not_used(tokenizer, monkeypatch):
    """The equality check is what decides: one rounding step off in the norm, and the model keeps
    transformers' forward on every block."""
    lm = _sdpa_tiny("llama", tokenizer)
    real = lean_blocks._rms
    monkeypatch.setattr(lean_blocks, "_rms", lambda x, norm: real(x, norm) * (1 + 2 ** -20))
    assert lean_blocks.install(lm.model, lm.blocks) == 0
    assert all("forward" not in b.__dict__ for b in lm.blocks)


def test_the_embedded_model_runs_lean(smol):
    assert smol.info.lean_blocks and lean_blocks.installed(smol.blocks)


def test_blocks_under_accelerate_hooks_keep_their_forward(tokenizer):
    """``device_map`` places accelerate hooks that wrap each block's forward (moving inputs between
    devices); replacing it would bypass them, so such a model keeps its forward."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    lm = _sdpa_tiny("llama", tokenizer)
    wrapped = add_hook_to_module(lm.blocks[1], ModelHook())
    before = wrapped.forward
    assert lean_blocks.install(lm.model, lm.blocks) == 0
    assert lm.blocks[1].forward == before and not lean_blocks.installed(lm.blocks)
