"""Conditional steering (issue 15 items 1-3, 6) on tiny models: CAST scores, condition vectors,
the gate's exactness (closed rows == unsteered, mixed batch == alone, cache on == off) and
calibration (== a naive search over layers and thresholds)."""

from __future__ import annotations

import pytest
import torch
from tinylm import strong_vectors

from steerdesk.core.condition import (
    ConditionGate,
    calibrate,
    cast_scores,
    compute_condition_vectors,
    condition_read,
    f1_grid,
    gate_scores,
    load_condition_set,
    prompt_states,
    thresholds_for,
)
from steerdesk.core.errors import SteerdeskError
from steerdesk.core.generate import SamplingSettings, encode_prompts, generate
from steerdesk.core.steering import Steering, steers_for
from steerdesk.core.vectors import load_vectors, save_vectors

GREEDY = SamplingSettings(max_new_tokens=8)
COOKING = load_condition_set("cooking")
POS, NEG = COOKING.part("train").positives()[:6], COOKING.part("train").negatives()[:6]
MIXED = [POS[0], NEG[0], POS[1], NEG[1], "Hi", POS[2], NEG[2], "How do I bake bread?"]


def test_cast_score_is_the_cosine_with_the_tanh_projection():
    g = torch.Generator().manual_seed(0)
    h, c = torch.randn(5, 16, generator=g) * 3, torch.randn(16, generator=g)
    proj = torch.outer(c, c) / (c @ c)
    for i in range(5):
        p = torch.tanh(proj @ h[i])
        ref = torch.dot(h[i], p) / (h[i].norm() * p.norm())
        assert float(cast_scores(h[i:i + 1], c)[0]) == pytest.approx(float(ref), rel=1e-3, abs=1e-5)
    with pytest.raises(SteerdeskError, match="zero"):
        cast_scores(h, torch.zeros(16))


@pytest.mark.parametrize("read", ["mean", "last"])
def test_prompt_states_equal_single_unpadded_forwards(tiny, read):
    layers = [0, 2]
    states = prompt_states(tiny, MIXED[:4], layers, read=read, batch_size=3)
    for i, p in enumerate(MIXED[:4]):
        inputs = encode_prompts(tiny, [p])
        seen = {}
        with torch.inference_mode(), Steering(tiny, [], observe=lambda la, h: seen.update({la: h.clone()}),
                                              watch=layers):
            tiny.model(**inputs)
        for j, layer in enumerate(layers):
            ref = seen[layer][0].mean(0) if read == "mean" else seen[layer][0, -1]
            assert torch.allclose(states[j, i], ref.float(), atol=1e-4), (p, layer)


def test_condition_vectors_are_marked_and_round_trip(tiny, tmp_path):
    vs = compute_condition_vectors(tiny, POS, NEG, read="last", name="cooking")
    assert vs.metadata["kind"] == "condition" and condition_read(vs) == "last"
    states = prompt_states(tiny, POS + NEG, [1], read="last")[0]
    assert torch.allclose(vs.directions[1], states[:6].mean(0) - states[6:].mean(0), atol=1e-5)
    save_vectors(vs, tmp_path / "c.safetensors")
    back = load_vectors(tmp_path / "c.safetensors")
    assert back.metadata["kind"] == "condition" and condition_read(back) == "last"
    assert torch.equal(back.directions, vs.directions)
    steering = type(vs)(directions=vs.directions, norms=vs.norms, metadata={"method": "mean-diff"})
    with pytest.raises(SteerdeskError, match="not condition vectors"):
        condition_read(steering)


def _gate(lm, layer=2):
    vs = compute_condition_vectors(lm, POS, NEG)
    scores = gate_scores(lm, MIXED, ConditionGate(layer, vs.directions[layer], 0.0))
    ranked = scores.sort().values  # half the rows open; no score sits on the threshold
    threshold = float(ranked[3] + ranked[4]) / 2
    return ConditionGate(layer, vs.directions[layer], threshold), scores


def test_gate_closed_rows_are_unsteered_and_a_mixed_batch_equals_alone(tiny):
    gate, scores = _gate(tiny)
    steers = steers_for(strong_vectors(tiny, factor=4.0), [1, 3])
    gated = generate(tiny, MIXED, steers, sampling=GREEDY, gate=gate)
    opened = [bool(r.gate_open) for r in gated]
    assert any(opened) and not all(opened)
    assert [r.gate_score for r in gated] == pytest.approx(scores.tolist(), abs=1e-5)
    plain = generate(tiny, MIXED, sampling=GREEDY)
    steered = generate(tiny, MIXED, steers, sampling=GREEDY)
    for r in range(len(MIXED)):
        want = steered[r] if opened[r] else plain[r]
        assert gated[r].token_ids == want.token_ids, r
        alone = generate(tiny, [MIXED[r]], steers, sampling=GREEDY, gate=gate)[0]
        assert alone.gate_open == opened[r] and alone.token_ids == gated[r].token_ids, r
    assert any(steered[r].token_ids != plain[r].token_ids for r in range(len(MIXED)) if opened[r])


@pytest.mark.parametrize("positions", ["all", "first:3", "prompt:0-4"])
def test_gate_cache_on_equals_off(tiny, positions):
    gate, _ = _gate(tiny, layer=1)
    steers = steers_for(strong_vectors(tiny, factor=4.0), [0, 2], positions=positions)  # before and after it
    on = generate(tiny, MIXED, steers, sampling=GREEDY, gate=gate, use_cache=True)
    off = generate(tiny, MIXED, steers, sampling=GREEDY, gate=gate, use_cache=False)
    assert [r.token_ids for r in on] == [r.token_ids for r in off]
    assert [r.gate_open for r in on] == [r.gate_open for r in off]


def test_gate_refusals(tiny):
    d = torch.ones(tiny.info.hidden_size)
    for gate, match in [(ConditionGate(99, d, 0.1), "out of range"), (ConditionGate(1, d, 2.0), "outside"),
                        (ConditionGate(1, d, 0.1, side="left"), "Unknown gate side"),
                        (ConditionGate(1, torch.zeros_like(d), 0.1), "zero"),
                        (ConditionGate(1, torch.ones(3), 0.1), "hidden size")]:
        with pytest.raises(SteerdeskError, match=match):
            generate(tiny, ["Hi"], sampling=GREEDY, gate=gate)


def test_f1_grid_by_hand():
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    labels = torch.tensor([False, False, True, True])
    f1, p, r = f1_grid(scores, labels, torch.tensor([[0.15, 0.25, 0.5]]))
    assert p.tolist() == [[pytest.approx(2 / 3), 1.0, 0.0]]
    assert r.tolist() == [[1.0, 1.0, 0.0]]
    assert f1.tolist() == [[pytest.approx(0.8), 1.0, 0.0]]


def test_calibration_equals_a_naive_search(tiny):
    """One pass over all layers == one gate_scores call per layer and a loop over thresholds."""
    vs = compute_condition_vectors(tiny, POS, NEG)
    held = COOKING.part("heldout")
    prompts, labels = held.prompts[:10] + held.prompts[-10:], held.labels[:10] + held.labels[-10:]
    cal = calibrate(tiny, vs, prompts, labels, num_thresholds=7, batch_size=8)
    best = None
    for layer in range(tiny.info.num_layers):
        s = gate_scores(tiny, prompts, ConditionGate(layer, vs.directions[layer], 0.0))
        assert torch.allclose(cal.scores[layer], s, atol=1e-4)
        for sgn in (1.0, -1.0):  # above, below
            for t in thresholds_for((s * sgn).unsqueeze(0), 7)[0].tolist():
                pred = [bool(x * sgn > t) for x in s.tolist()]  # the gate's own rule
                tp = sum(p and y for p, y in zip(pred, labels))
                prec = tp / max(1, sum(pred))
                rec = tp / sum(labels)
                f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
                if best is None or f1 > best[0] + 1e-9:
                    best = (f1, layer)
    assert cal.f1 == pytest.approx(best[0], abs=1e-6)
    gate = ConditionGate(cal.layer, vs.directions[cal.layer], cal.threshold, cal.side)
    opened = gate.opens(gate_scores(tiny, prompts, gate))
    tp = sum(o and y for o, y in zip(opened, labels))
    assert tp / sum(labels) == pytest.approx(cal.recall, abs=1e-6)
    with pytest.raises(SteerdeskError, match="both"):
        calibrate(tiny, vs, prompts[:3], [True] * 3)


def test_bundled_condition_set():
    assert len(COOKING.prompts) == 128
    for part in ("train", "heldout"):
        s = COOKING.part(part)
        assert len(s.positives()) == 32 and len(s.negatives()) == 32
    assert not set(COOKING.part("train").prompts) & set(COOKING.part("heldout").prompts)
    with pytest.raises(SteerdeskError, match="not found"):
        load_condition_set("no-such-set")
