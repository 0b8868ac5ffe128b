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
