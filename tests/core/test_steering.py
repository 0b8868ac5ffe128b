"""Steering hooks: identity for a zero vector, where vectors land, the three modes, cleanup, dtypes."""

from __future__ import annotations

import pytest
import torch
from tinylm import ARCHS, NUM_LAYERS, PROMPT, ids_of, random_vectors, steerdesk_hooks

from steerdesk.core.errors import SteerdeskError
from steerdesk.core.steering import Steer, Steering, steers_for


def _logits(lm, ids):
    with torch.inference_mode():
        return lm.model(input_ids=ids).logits


def _hidden(lm, ids):
    with torch.inference_mode():
        return lm.model(input_ids=ids, output_hidden_states=True).hidden_states


# ---------------------------------------------------------------- identity: scale 0

@pytest.mark.parametrize("layers", [[0], [1], [NUM_LAYERS - 1], [0, 2, 3]])
@pytest.mark.parametrize("zero", [True, False])
def test_scale_zero_is_bit_identical(tiny, layers, zero):
    """Scale 0 (add) is the identity, for a zero vector (a missing layer) and a real one."""
    ids = ids_of(tiny, PROMPT)
    base = _logits(tiny, ids)
    vecs = torch.zeros(tiny.info.num_layers, tiny.info.hidden_size) if zero else random_vectors(tiny, scale=3.0)
    with Steering(tiny, steers_for(vecs, layers, scale=0.0, mode="add")):
        steered = _logits(tiny, ids)
    assert torch.equal(base, steered)


def test_scale_zero_per_row_is_bit_identical(tiny):
    ids = ids_of(tiny, PROMPT).repeat(2, 1)
    base = _logits(tiny, ids)
    zeros = torch.zeros(tiny.info.num_layers, tiny.info.hidden_size)
    with Steering(tiny, [steers_for(zeros, [1], scale=0.0), []]):
        steered = _logits(tiny, ids)
    assert torch.equal(base, steered)


@pytest.mark.parametrize("mode,normalize,scale", [("add", False, 3.0), ("add", False, -0.5), ("add", True, 1.0),
                                                  ("project", False, 1.0), ("clamp", False, 0.0),
                                                  ("clamp", True, 2.0)])
def test_zero_vector_with_an_effect_asked_is_refused(tiny, mode, normalize, scale):
    """A zero vector at a non-zero scale would silently do nothing (issue 10): one-line refusal."""
    zeros = torch.zeros(tiny.info.num_layers, tiny.info.hidden_size)
    with pytest.raises(SteerdeskError, match=r"^Layer 2 has no steering direction \(zero vector\)[^\n]*$"):
        Steering(tiny, steers_for(zeros, [2], scale=scale, mode=mode, normalize=normalize))
    # Per-row requests are checked too, and nothing is left installed.
    with pytest.raises(SteerdeskError, match="zero vector"):
        Steering(tiny, [[], steers_for(zeros, [2], scale=scale, mode=mode, normalize=normalize)])
    assert not any(steerdesk_hooks(b) for b in tiny.blocks)


@pytest.mark.parametrize("mode", ["add", "project"])
def test_zero_vector_at_scale_zero_is_allowed(tiny, mode):
    zeros = torch.zeros(tiny.info.num_layers, tiny.info.hidden_size)
    for normalize in (False, True):
        Steering(tiny, steers_for(zeros, [2], scale=0.0, mode=mode, normalize=normalize))  # no error


# ------------------------------------------------------------------ injection convention

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layer", [0, 1, NUM_LAYERS - 2])
def test_add_lands_exactly_at_block_output(fresh_tiny, arch, layer):
    """Steering layer L with v changes hidden_states[L+1] by exactly v and nothing before it."""
    # A fresh model: the steered forward must be the first output_hidden_states call, so that
    # transformers' lazily installed capture hooks run after the steering hook (see conftest).
    lm = fresh_tiny(arch)
    ids = ids_of(lm, PROMPT)
    v = random_vectors(lm, scale=0.05)
    with Steering(lm, steers_for(v, [layer], scale=2.0)):
        steered = _hidden(lm, ids)
    plain = _hidden(lm, ids)
    assert len(plain) == lm.info.num_layers + 1
    for k in range(layer + 1):
        assert torch.equal(steered[k], plain[k]), f"hidden_states[{k}] changed by steering layer {layer}"
    delta = steered[layer + 1] - plain[layer + 1]
    torch.testing.assert_close(delta, (2.0 * v[layer]).expand_as(delta), atol=1e-5, rtol=0)
    assert not torch.allclose(steered[layer + 2], plain[layer + 2] + 2.0 * v[layer], atol=1e-4), \
        "the next block should transform the steered state, not just pass the vector on"


# --------------------------------------------------------------------------- modes math

def _steered_hidden(fresh_tiny, arch, steer):
    lm = fresh_tiny(arch)
    ids = ids_of(lm, PROMPT)
    with Steering(lm, [steer]):
        steered = _hidden(lm, ids)
    return lm, steered


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_project_scale_one_removes_the_direction(fresh_tiny, arch):
    layer = 1
    lm = fresh_tiny(arch)
    v = random_vectors(lm, scale=0.05)[layer]
    v_hat = v / v.norm()
    ids = ids_of(lm, PROMPT)
    with Steering(lm, [Steer(layer, v, scale=1.0, mode="project")]):
        steered = _hidden(lm, ids)
    plain = _hidden(lm, ids)
    before = plain[layer + 1] @ v_hat
    assert before.abs().max() > 1e-3, "the direction should have a component to remove"
    after = steered[layer + 1] @ v_hat
    assert after.abs().max() < 1e-5
    # Only the component along v changed.
    expected = plain[layer + 1] - before.unsqueeze(-1) * v_hat
    torch.testing.assert_close(steered[layer + 1], expected, atol=1e-5, rtol=0)


def test_project_partial_scale_shrinks_the_component(fresh_tiny):
    layer = 2
    lm = fresh_tiny("qwen2")
    v = random_vectors(lm, scale=0.05)[layer]
    v_hat = v / v.norm()
    ids = ids_of(lm, PROMPT)
    with Steering(lm, [Steer(layer, v, scale=0.25, mode="project")]):
        steered = _hidden(lm, ids)
    plain = _hidden(lm, ids)
    torch.testing.assert_close(steered[layer + 1] @ v_hat, 0.75 * (plain[layer + 1] @ v_hat), atol=1e-5, rtol=0)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gptneox"])
def test_clamp_sets_the_component(fresh_tiny, arch, normalize):
    layer, scale = 1, 1.5
    lm = fresh_tiny(arch)
    v = random_vectors(lm, scale=0.05)[layer]
    v_hat = v / v.norm()
    ids = ids_of(lm, PROMPT)
    with Steering(lm, [Steer(layer, v, scale=scale, mode="clamp", normalize=normalize)]):
        steered = _hidden(lm, ids)
    plain = _hidden(lm, ids)
    want = scale if normalize else scale * float(v.norm())
    comp = steered[layer + 1] @ v_hat
    torch.testing.assert_close(comp, torch.full_like(comp, want), atol=1e-5, rtol=0)
    # Orthogonal part untouched.
    orth_s = steered[layer + 1] - comp.unsqueeze(-1) * v_hat
    orth_p = plain[layer + 1] - (plain[layer + 1] @ v_hat).unsqueeze(-1) * v_hat
    torch.testing.assert_close(orth_s, orth_p, atol=1e-5, rtol=0)


def test_add_normalize_adds_a_unit_vector_times_scale(fresh_tiny):
    layer = 0
    lm = fresh_tiny("phi3")
    v = random_vectors(lm, scale=0.05)[layer]
    ids = ids_of(lm, PROMPT)
    with Steering(lm, [Steer(layer, v, scale=0.3, mode="add", normalize=True)]):
        steered = _hidden(lm, ids)
    plain = _hidden(lm, ids)
    delta = steered[layer + 1] - plain[layer + 1]
    torch.testing.assert_close(delta, (0.3 * v / v.norm()).expand_as(delta), atol=1e-5, rtol=0)


def test_two_layers_at_once(fresh_tiny):
    lm = fresh_tiny("llama")
    ids = ids_of(lm, PROMPT)
    v = random_vectors(lm, scale=0.05)
    with Steering(lm, steers_for(v, [0, 2])):
        steered = _hidden(lm, ids)
    plain = _hidden(lm, ids)
    torch.testing.assert_close(steered[1] - plain[1], v[0].expand_as(plain[1]), atol=1e-5, rtol=0)
    assert not torch.equal(steered[3], plain[3])


# ----------------------------------------------------------------------------- cleanup

def test_hooks_removed_after_exception_in_block(fresh_tiny):
    lm = fresh_tiny("llama")
    v = random_vectors(lm)
    assert all(not b._forward_hooks for b in lm.blocks)
    with pytest.raises(RuntimeError, match="boom"), Steering(lm, steers_for(v, [0, 1, 3])):
        assert lm.blocks[1]._forward_hooks
        lm.model(input_ids=ids_of(lm, PROMPT))
        raise RuntimeError("boom")
    for block in lm.blocks:
        assert not block._forward_hooks
    assert not lm.model._forward_pre_hooks
    assert not lm.model._forward_hooks


def test_hooks_removed_after_error_raised_by_a_hook(fresh_tiny):
    lm = fresh_tiny("gpt2")
    v = random_vectors(lm)
    ids = ids_of(lm, PROMPT).repeat(3, 1)  # 3 rows, but steering set up for 2
    with pytest.raises(SteerdeskError, match="2 rows but the batch has 3"), Steering(lm, [steers_for(v, [1]), []]):
        lm.model(input_ids=ids)
    assert not any(steerdesk_hooks(m) for m in [lm.model, *lm.blocks])
    # The model still works unsteered afterwards.
    lm.model(input_ids=ids)


# ------------------------------------------------------------------------------ dtypes

@pytest.mark.parametrize("mode", ["add", "project", "clamp"])
def test_bfloat16_model_with_float32_vector(fresh_tiny, mode):
    lm = fresh_tiny("llama", dtype=torch.bfloat16)
    assert lm.info.dtype == "bfloat16"
    v = random_vectors(lm, scale=0.05)
    assert v.dtype == torch.float32
    seen = {}

    def observe(layer, h):
        seen[layer] = h.dtype

    ids = ids_of(lm, PROMPT)
    with torch.inference_mode(), Steering(lm, steers_for(v, [1], mode=mode), observe=observe, watch=[1]):
        out = lm.model(input_ids=ids, output_hidden_states=True)
    assert seen == {1: torch.bfloat16}
    assert out.logits.dtype == torch.bfloat16
    assert all(h.dtype == torch.bfloat16 for h in out.hidden_states)
    assert torch.isfinite(out.logits.float()).all()
    if mode == "add":
        plain = _hidden(lm, ids)
        delta = (out.hidden_states[2] - plain[2]).float()
        torch.testing.assert_close(delta, v[1].expand_as(delta), atol=2e-2, rtol=0)


def test_bfloat16_generation_steered(fresh_tiny):
    from steerdesk.core.generate import SamplingSettings, generate

    lm = fresh_tiny("qwen2", dtype=torch.bfloat16)
    v = random_vectors(lm)
    res = generate(lm, [PROMPT], steers_for(v, [1, 2], scale=2.0), sampling=SamplingSettings(max_new_tokens=4))
    assert len(res[0].token_ids) >= 1


# ------------------------------------------------------------------------- validation

def test_steer_check_errors(tiny):
    n, h = tiny.info.num_layers, tiny.info.hidden_size
    v = torch.ones(h)
    cases = [
        (Steer(n, v), "out of range"),
        (Steer(-1, v), "out of range"),
        (Steer(0, v, mode="rotate"), "Unknown steering mode"),
        (Steer(0, v, positions="middle"), "Unknown positions"),
        (Steer(0, v, scale=float("nan")), "finite"),
        (Steer(0, v, scale=1e5), "absurd"),
        (Steer(0, torch.ones(h + 1)), "hidden size"),
        (Steer(0, torch.full((h,), float("nan"))), "NaN"),
        (Steer(0, torch.zeros(h), mode="project"), "zero"),
        (Steer(0, torch.zeros(h), mode="add", normalize=True), "zero"),
    ]
    for steer, match in cases:
        with pytest.raises(SteerdeskError, match=match):
            Steering(tiny, [steer])
    with pytest.raises(SteerdeskError, match="prompt length"):
        Steering(tiny, [Steer(0, v, positions="prompt")])
    with pytest.raises(SteerdeskError, match="out of range"):
        steers_for(torch.zeros(n, h), [n])


# ------------------------------------------------- blocks that return tuples (older layouts)

class _TupleBlock(torch.nn.Module):
    """A residual block in the pre-5.x style: returns ``(hidden, extra)``."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(hidden, hidden)

    def forward(self, x):
        return x + torch.tanh(self.lin(x)), "extra"


class _ToyLM(torch.nn.Module):
    def __init__(self, vocab: int, hidden: int = 8, layers: int = 3) -> None:
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(num_hidden_layers=layers, hidden_size=hidden)
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(_TupleBlock(hidden) for _ in range(layers))
        self.extras: list = []

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        h = self.embed(input_ids)
        self.extras.clear()
        states = [h]
        for block in self.model.layers:
            h, extra = block(h)
            self.extras.append(extra)
            states.append(h)
        return states


@pytest.fixture
def toy(plain_tokenizer):
    from steerdesk.core.models import wrap_model

    torch.manual_seed(0)
    return wrap_model(_ToyLM(len(plain_tokenizer)).eval(), plain_tokenizer, name="toy")


@pytest.mark.parametrize("mode", ["add", "project", "clamp"])
def test_tuple_returning_blocks(toy, mode):
    ids = ids_of(toy, PROMPT)
    v = torch.randn(toy.info.num_layers, toy.info.hidden_size)
    plain = toy.model(ids)
    with torch.inference_mode(), Steering(toy, steers_for(v, [1], mode=mode, scale=0.5)):
        steered = toy.model(ids)
    assert toy.model.extras == ["extra"] * 3  # the rest of the tuple survives
    h = plain[2]
    v_hat = v[1] / v[1].norm()
    coeff = (h @ v_hat).unsqueeze(-1)
    want = {"add": h + 0.5 * v[1], "project": h - 0.5 * coeff * v_hat, "clamp": h - coeff * v_hat + 0.5 * v[1]}[mode]
    torch.testing.assert_close(steered[2], want, atol=1e-5, rtol=1e-5)
    assert torch.equal(steered[1], plain[1])


def test_collect_reads_tuple_returning_blocks(toy):
    from steerdesk.core.extract import collect, encode

    enc = encode(toy, [(PROMPT, "A reply.")])
    reads, _ = collect(toy, enc)
    states = toy.model(torch.tensor([enc[0].ids]))
    for layer in range(toy.info.num_layers):
        torch.testing.assert_close(reads[0, layer], states[layer + 1][0, -1], atol=1e-6, rtol=1e-6)
