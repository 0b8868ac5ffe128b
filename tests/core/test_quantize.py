"""Opt-in int8 weight-only linears (core/quantize.py): the product, and steering stays exact on them."""

from __future__ import annotations

import pytest
import torch
from tinylm import strong_vectors

from steerdesk.core.datasets import Dataset, Example
from steerdesk.core.errors import SteerdeskError
from steerdesk.core.generate import SamplingSettings, generate
from steerdesk.core.quantize import Int8Linear, quantize_int8
from steerdesk.core.steering import Steer, Steering


def test_int8_linear_equals_dequantised_product():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    q = Int8Linear(lin)
    x = torch.randn(3, 5, 96)
    # Independent reference: round each row to 127 steps of its max |w|, product in float64
    # on bfloat16-rounded activations (what the kernel consumes).
    w = lin.weight.detach().double()
    step = w.abs().amax(1, keepdim=True) / 127
    w_q = torch.round(w / step) * step.to(torch.bfloat16).double()
    ref = x.to(torch.bfloat16).double() @ w_q.T + lin.bias.detach().double()
    out = q(x)
    assert out.shape == (3, 5, 40) and out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, rtol=1e-2, atol=1e-2)
    exact = lin(x).detach()
    rel = (out - exact).norm() / exact.norm()
    assert rel < 0.02, rel  # int8 weights + bf16 activations: about 1 % of the output's norm
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.abs().max() == 127


def _quantized(fresh_tiny):
    lm = fresh_tiny("llama")
    emb_before = lm.model.get_input_embeddings().weight.detach().clone()
    n = quantize_int8(lm.model, lm.blocks)
    assert n == 4 * 7 + 1  # q k v o gate up down per block, and the LM head
    assert torch.equal(lm.model.get_input_embeddings().weight, emb_before)  # input embedding kept
    return lm


def test_steering_on_an_int8_model_is_the_same_hook(fresh_tiny):
    lm = _quantized(fresh_tiny)
    v = strong_vectors(lm)
    ids = torch.tensor([[lm.tokenizer.bos_token_id or 1, 11, 12, 13, 14]])
    layer = 2
    seen = {}

    def manual(module, args, output):  # an independent hook: block 2's output + 1.5 * v[2]
        h = output[0] if isinstance(output, tuple) else output
        h = h + 1.5 * v[layer]
        seen["hit"] = True
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    with torch.inference_mode():
        handle = lm.blocks[layer].register_forward_hook(manual)
        try:
            ref = lm.model(ids).logits
        finally:
            handle.remove()
        with Steering(lm, [Steer(layer=layer, vector=v[layer], scale=1.5)]):
            out = lm.model(ids).logits
    assert seen["hit"]
    assert torch.equal(out, ref)


def test_int8_model_cache_on_equals_cache_off_and_identity(fresh_tiny):
    lm = _quantized(fresh_tiny)
    v = strong_vectors(lm)
    s = SamplingSettings(max_new_tokens=12)
    steer = [Steer(layer=1, vector=v[1], scale=1.0)]
    on = generate(lm, ["Tell me about cats."], steer, sampling=s, use_cache=True)[0]
    off = generate(lm, ["Tell me about cats."], steer, sampling=s, use_cache=False)[0]
    assert on.token_ids == off.token_ids and len(on.token_ids) > 0
    plain = generate(lm, ["Tell me about cats."], sampling=s)[0]
    zero = generate(lm, ["Tell me about cats."], [Steer(layer=1, vector=v[1], scale=0.0)], sampling=s)[0]
    assert zero.token_ids == plain.token_ids
    assert on.token_ids != plain.token_ids  # the steering acts on the int8 model too


def test_int8_refuses_models_without_linear_blocks(fresh_tiny):
    lm = fresh_tiny("gpt2")  # Conv1D writers
    with pytest.raises(SteerdeskError, match="no nn.Linear"):
        quantize_int8(lm.model, lm.blocks)


@pytest.mark.parametrize("bits", [8, 4])
def test_fused_group_members_equal_their_own_quantised_linears(bits):
    torch.manual_seed(1)
    from steerdesk.core.quantize import FusedGroup, FusedMember, quantized_linear

    lins = [torch.nn.Linear(64, n, bias=b) for n, b in ((64, True), (16, False), (32, True))]
    singles = [quantized_linear(lin, bits) for lin in lins]
    group = FusedGroup(lins, bits)
    members = [FusedMember(group, i, lin.out_features) for i, lin in enumerate(lins)]
    x = torch.randn(2, 3, 64)
    # the fused path: every member called with the same tensor object, as an attention module does
    outs = [m(x) for m in members]
    for out, single in zip(outs, singles):
        assert torch.equal(out, single(x))  # bit for bit: columns do not depend on their neighbours
    assert group._y is None  # cache released once every member took its slice
    # another input: recomputed, not served from the cache
    y = torch.randn(2, 3, 64)
    assert torch.equal(members[0](x), singles[0](x))
    assert torch.equal(members[1](y), singles[1](y))
    # the same object changed in place between members: recomputed
    z = torch.randn(1, 64)
    assert torch.equal(members[0](z), singles[0](z))
    z.mul_(2.0)
    assert torch.equal(members[1](z), singles[1](z))
    # a member called twice with the same input: still its own product
    w = torch.randn(4, 64)
    assert torch.equal(members[2](w), singles[2](w))
    assert torch.equal(members[2](w), singles[2](w))


def test_int4_linear_is_q4_1_blocks():
    from steerdesk.core.quantize import Int4Linear

    torch.manual_seed(2)
    lin = torch.nn.Linear(96, 48)
    q = Int4Linear(lin)
    x = torch.randn(5, 96)
    # Independent reference (ggml's block_q4_1): per 32 weights of a row, d = (max - min) / 15,
    # q = round((w - min) / d) in 0..15, w' = d q + min; d and min + 8 d stored in bfloat16.
    w = lin.weight.detach().double().reshape(48, 3, 32)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    d = (high - low) / 15
    codes = torch.clamp(torch.round((w - low) / d), 0, 15)
    d16 = d.float().to(torch.bfloat16).double()
    z16 = (low + 8 * d).float().to(torch.bfloat16).double()
    w_q = ((codes - 8) * d16 + z16).reshape(48, 96)
    ref = x.to(torch.bfloat16).double() @ w_q.T + lin.bias.detach().double()
    out = q(x)
    assert out.shape == (5, 48) and out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, rtol=2e-2, atol=2e-2)
    exact = lin(x).detach()
    rel = (out - exact).norm() / exact.norm()
    assert 0.005 < rel < 0.1, rel  # 16 levels per block: a few % of the output's norm, more than int8
    with pytest.raises(ValueError, match="int4 needs"):
        Int4Linear(torch.nn.Linear(40, 48))  # 40 inputs are not whole blocks of 32


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("family, fused_per_block", [("llama", 5), ("qwen2", 5), ("mistral", 5), ("gemma2", 5),
                                                     ("phi3", 0)])  # phi3 ships qkv_proj / gate_up_proj fused
def test_fused_model_equals_unfused_bit_for_bit(fresh_tiny, family, fused_per_block, bits):
    from steerdesk.core.quantize import FusedMember, quantize_weights

    fused, plain = fresh_tiny(family), fresh_tiny(family)
    quantize_weights(fused.model, fused.blocks, bits=bits)
    quantize_weights(plain.model, plain.blocks, bits=bits, fuse=False)
    n_members = sum(isinstance(m, FusedMember) for m in fused.model.modules())
    assert n_members == fused_per_block * len(fused.blocks)  # q k v and gate up in every block
    v = strong_vectors(fused)
    s = SamplingSettings(max_new_tokens=10)
    steer = [Steer(layer=1, vector=v[1], scale=1.0)]
    ids = torch.tensor([[fused.tokenizer.bos_token_id or 1, 11, 12, 13, 14]])
    with torch.inference_mode():
        assert torch.equal(fused.model(ids).logits, plain.model(ids).logits)
    a = generate(fused, ["Tell me about cats.", "Hi"], steer, sampling=s)
    b = generate(plain, ["Tell me about cats.", "Hi"], steer, sampling=s)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_int4_model_steering_cache_and_identity(fresh_tiny):
    from steerdesk.core.quantize import Int4Linear, is_quantized, quantize_weights

    lm = fresh_tiny("llama")
    n = quantize_weights(lm.model, lm.blocks, bits=4)
    assert n == 4 * 7 + 1 and is_quantized(lm.model)
    assert sum(isinstance(m, Int4Linear) for m in lm.model.modules()) == 4 * 4  # 2 fused groups + o + down
    v = strong_vectors(lm)
    s = SamplingSettings(max_new_tokens=12)
    steer = [Steer(layer=1, vector=v[1], scale=1.0)]
    on = generate(lm, ["Tell me about cats."], steer, sampling=s, use_cache=True)[0]
    off = generate(lm, ["Tell me about cats."], steer, sampling=s, use_cache=False)[0]
    assert on.token_ids == off.token_ids and len(on.token_ids) > 0
    plain = generate(lm, ["Tell me about cats."], sampling=s)[0]
    zero = generate(lm, ["Tell me about cats."], [Steer(layer=1, vector=v[1], scale=0.0)], sampling=s)[0]
    assert zero.token_ids == plain.token_ids
    assert on.token_ids != plain.token_ids


def test_optimize_refuses_an_int4_model(fresh_tiny):
    from steerdesk.core.optimize import optimize_vectors
    from steerdesk.core.quantize import quantize_weights

    lm = fresh_tiny("llama")
    quantize_weights(lm.model, lm.blocks, bits=4)
    topics = ("owls", "kites", "tea", "rain")
    data = Dataset([Example(f"Tell me about {t}.", f"{t} are fine.", f"Meh, {t}.") for t in topics], name="four")
    with pytest.raises(SteerdeskError, match="gradients"):
        optimize_vectors(lm, data, layers=[1])
