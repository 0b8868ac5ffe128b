"""Opt-in int8 weight-only linears (core/quantize.py): the product, and steering stays exact on them."""

from __future__ import annotations

import pytest
import torch
from tinylm import strong_vectors

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


def test_fused_group_members_equal_their_own_int8_linears():
    torch.manual_seed(1)
    from steerdesk.core.quantize import Int8Group, Int8GroupMember

    lins = [torch.nn.Linear(64, n, bias=b) for n, b in ((64, True), (16, False), (16, True))]
    singles = [Int8Linear(lin) for lin in lins]
    group = Int8Group(singles)
    members = [Int8GroupMember(group, i, s.out_features) for i, s in enumerate(singles)]
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


@pytest.mark.parametrize("family, fused_per_block", [("llama", 5), ("qwen2", 5), ("mistral", 5), ("gemma2", 5),
                                                     ("phi3", 0)])  # phi3 ships qkv_proj / gate_up_proj fused
def test_fused_int8_model_equals_unfused_bit_for_bit(fresh_tiny, family, fused_per_block):
    from steerdesk.core.quantize import Int8GroupMember

    fused, plain = fresh_tiny(family), fresh_tiny(family)
    quantize_int8(fused.model, fused.blocks)
    quantize_int8(plain.model, plain.blocks, fuse=False)
    n_members = sum(isinstance(m, Int8GroupMember) for m in fused.model.modules())
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
