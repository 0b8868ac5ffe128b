"""Hook arithmetic in float32 for reduced-precision models (issue 10, item 3).

A block's output is replaced by a crafted hidden state near the dtype's largest number, whose
component along the steering direction (4x that number) does not fit the dtype although every
exact result below does. Each mode's output is checked against a float64 reference computed
here from the formulas in README ("Steering conventions").
"""

from __future__ import annotations

import pytest
import torch
from tinylm import HIDDEN, PROMPT, ids_of

from steerdesk.core.errors import SteerdeskError
from steerdesk.core.generate import SamplingSettings, compare, generate
from steerdesk.core.steering import Steer, Steering

LAYER = 1
DTYPES = [torch.float16, torch.bfloat16]


def _crafted(dtype: torch.dtype, seq: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h [1, seq, H] in dtype, v [H] float32)``: h = 4M v^ + w with w orthogonal to v^.

    v has components +-M/4 (so v^ has +-1/8 and |v| = 2M); w has components below 0.4M. Every
    |h_i| <= 0.9M fits, but h.v^ = 4M does not (M = the dtype's largest finite number).
    """
    big = torch.finfo(dtype).max
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (HIDDEN,), generator=g).double() * 2 - 1
    v = signs * (big / 4)
    v_hat = signs / 8.0
    w = (torch.rand(seq, HIDDEN, generator=g, dtype=torch.float64) * 2 - 1) * 0.3 * big
    w = w - (w @ v_hat).unsqueeze(-1) * v_hat  # orthogonal to v^ (|w_i| stays below 0.4M)
    h = (4 * big * v_hat + w).unsqueeze(0).to(dtype)
    assert torch.isfinite(h).all()
    return h, v.float()


def _reference(h: torch.Tensor, steer: Steer) -> torch.Tensor:
    """The steered state in float64 (README: add h+a*u, project h-a(h.v^)v^, clamp h-(h.v^)v^+a*u)."""
    x = h.double()
    v = steer.vector.double()
    v_hat = v / v.norm()
    u = v_hat if steer.normalize else v
    c = (x * v_hat).sum(-1, keepdim=True)
    a = steer.scale
    return {"add": x + a * u, "project": x - a * c * v_hat, "clamp": x - c * v_hat + a * u}[steer.mode]


def _run(lm, h: torch.Tensor, rows, prompt_length=None) -> torch.Tensor:
    """Forward with block LAYER's output replaced by ``h``; returns the steered block output."""
    seen = {}

    def replace(module, args, output):
        return h.expand(output.shape[0], -1, -1).clone() if not isinstance(output, tuple) else \
            (h.expand(output[0].shape[0], -1, -1).clone(),) + tuple(output[1:])

    ids = ids_of(lm, PROMPT)[:, : h.shape[1]].repeat(len(rows) if rows and isinstance(rows[0], list) else 1, 1)
    handle = lm.blocks[LAYER].register_forward_hook(replace)  # runs before the steering hook
    try:
        with torch.inference_mode(), Steering(lm, rows, prompt_length=prompt_length,
                                              observe=lambda layer, x: seen.setdefault(layer, x.clone()),
                                              watch=[LAYER]):
            lm.model(input_ids=ids)
    finally:
        handle.remove()
    return seen[LAYER]


CASES = [  # (mode, normalize, scale): every exact result fits the dtype
    ("add", False, -1.0),       # h - v: components up to 0.65M
    ("add", True, 1000.0),
    ("project", False, 1.0),    # ablation: h.v^ = 4M does not fit, the result (w) does
    ("project", True, 0.5),
    ("project", False, -0.1),
    ("clamp", False, 1.0),      # w + v
    ("clamp", True, -3.0),
]


@pytest.fixture(scope="module", params=DTYPES, ids=["float16", "bfloat16"])
def half_lm(request, tokenizer, plain_tokenizer):
    from tinylm import build_tiny

    return build_tiny("llama", tokenizer, plain_tokenizer, request.param)


@pytest.mark.parametrize("mode,normalize,scale", CASES)
def test_every_mode_near_the_dtype_limit_matches_a_float64_reference(half_lm, mode, normalize, scale):
    dtype = half_lm.model.dtype
    h, v = _crafted(dtype, seq=5)
    steer = Steer(LAYER, v, scale=scale, mode=mode, normalize=normalize)
    out = _run(half_lm, h, [steer])
    assert out.dtype == dtype
    ref = _reference(h, steer)
    big = torch.finfo(dtype).max
    assert ref.abs().max() < big  # the exact result fits...
    assert torch.isfinite(out).all(), f"{mode}: NaN/inf although the exact result fits"
    # ...and the hook gets it to one rounding of the dtype (plus float32 rounding of the sums).
    err = (out.double() - ref).abs()
    allowed = torch.finfo(dtype).eps * ref.abs() + 1e-6 * big
    assert bool((err <= allowed).all()), f"{mode}: max error {float(err.max()):.4g}"


@pytest.mark.parametrize("positions", ["prompt", "generated"])
def test_positions_and_unsteered_rows_stay_exact(half_lm, positions):
    dtype = half_lm.model.dtype
    h, v = _crafted(dtype, seq=6, seed=3)
    steer = Steer(LAYER, v, scale=1.0, mode="project", positions=positions)
    out = _run(half_lm, h, [[], [steer]], prompt_length=4)
    assert torch.equal(out[0], h[0])  # the unsteered row: bit-identical
    steered = slice(0, 4) if positions == "prompt" else slice(4, 6)
    kept = slice(4, 6) if positions == "prompt" else slice(0, 4)
    assert torch.equal(out[1, kept], h[0, kept])
    ref = _reference(h, steer)[0, steered]
    err = (out[1, steered].double() - ref).abs()
    assert bool((err <= torch.finfo(dtype).eps * ref.abs() + 1e-6 * torch.finfo(dtype).max).all())


def test_true_overflow_is_named(half_lm):
    dtype = half_lm.model.dtype
    h, v = _crafted(dtype, seq=3)
    steer = Steer(LAYER, v, scale=1.0, mode="add")  # h + v: up to 1.15M, does not fit
    assert _reference(h, steer).abs().max() > torch.finfo(dtype).max
    name = str(dtype).replace("torch.", "")
    with pytest.raises(SteerdeskError, match=rf"^Steering overflowed {name} at layer {LAYER} \(add\): "
                                             rf"max \|value\| \S+ > \S+, the largest {name} number"):
        _run(half_lm, h, [steer])
    assert not half_lm.model._forward_pre_hooks and not half_lm.blocks[LAYER]._forward_hooks


def test_float32_path_is_the_plain_formula(fresh_tiny):
    """Float32 models: no conversion, no rescaling; add is exactly h + a*v."""
    lm = fresh_tiny("llama")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, 4, HIDDEN, generator=g) * 3
    v = torch.randn(HIDDEN, generator=g)
    out = _run(lm, h, [Steer(LAYER, v, scale=1.5)])
    assert torch.equal(out, h + 1.5 * v)
    for mode in ("project", "clamp"):
        steer = Steer(LAYER, v, scale=0.7, mode=mode)
        torch.testing.assert_close(_run(lm, h, [steer]).double(), _reference(h, steer), atol=1e-5, rtol=1e-6)


# ------------------------------------------------------------- NaN message in generation

def _overflowing(fresh_tiny):
    """A float16 model whose logits overflow by themselves (LM head weights at 60000)."""
    lm = fresh_tiny("llama", dtype=torch.float16)
    with torch.no_grad():
        lm.model.lm_head.weight.fill_(60000.0)
    return lm


def test_nan_without_steering_does_not_blame_the_scale(fresh_tiny):
    lm = _overflowing(fresh_tiny)
    greedy = SamplingSettings(max_new_tokens=3)
    with pytest.raises(SteerdeskError) as err:
        generate(lm, [PROMPT], sampling=greedy)
    assert "without steering" in str(err.value) and "float16" in str(err.value)
    assert "scale" not in str(err.value)
    v = torch.ones(HIDDEN)
    with pytest.raises(SteerdeskError) as err:
        compare(lm, PROMPT, [Steer(LAYER, v, scale=0.5)], sampling=greedy)
    assert "without steering" in str(err.value) and "scale" not in str(err.value)
