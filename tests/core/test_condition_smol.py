"""Conditional steering on the real SmolLM2-135M-Instruct with the bundled ``cooking`` set (slow):
the calibrated gate separates held-out prompts, closed rows generate exactly as unsteered, a mixed
batch equals each prompt alone, and cache on equals cache off."""

from __future__ import annotations

import pytest

from steerdesk.core.condition import (
    ConditionGate,
    calibrate,
    compute_condition_vectors,
    gate_scores,
    load_condition_set,
)
from steerdesk.core.datasets import load_bundled
from steerdesk.core.extract import compute_vectors
from steerdesk.core.generate import SamplingSettings, generate
from steerdesk.core.steering import steers_for

pytestmark = pytest.mark.slow

COOKING = load_condition_set("cooking")
TRAIN, HELD = COOKING.part("train"), COOKING.part("heldout")


@pytest.fixture(scope="module")
def conditions(smol):
    return {read: compute_condition_vectors(smol, TRAIN.positives(), TRAIN.negatives(), read=read)
            for read in ("mean", "last")}


def _rates(opened, labels):
    pos = sum(o for o, y in zip(opened, labels) if y) / sum(labels)
    neg = sum(o for o, y in zip(opened, labels) if not y) / (len(labels) - sum(labels))
    return pos, neg


@pytest.mark.parametrize("read", ["mean", "last"])
def test_gate_calibrated_on_train_fires_on_heldout(smol, conditions, read):
    """Out of sample: the point calibrated on the training prompts, applied to the held-out ones."""
    vs = conditions[read]
    cal = calibrate(smol, vs, TRAIN.prompts, TRAIN.labels)
    gate = ConditionGate(cal.layer, vs.directions[cal.layer], cal.threshold, cal.side, read)
    pos, neg = _rates(gate.opens(gate_scores(smol, HELD.prompts, gate)), HELD.labels)
    assert pos >= 0.90 and neg <= 0.10, (cal.layer, cal.threshold, pos, neg)


def test_gate_calibrated_on_heldout(smol, conditions):
    """What 'steerdesk calibrate --dataset cooking' does: calibrate on the held-out split."""
    cal = calibrate(smol, conditions["mean"], HELD.prompts, HELD.labels)
    assert cal.f1 >= 0.95 and cal.recall >= 0.90
    gate = ConditionGate(cal.layer, conditions["mean"].directions[cal.layer], cal.threshold, cal.side)
    pos, neg = _rates(gate.opens(gate_scores(smol, HELD.prompts, gate)), HELD.labels)
    assert pos >= 0.90 and neg <= 0.10
    assert pos == pytest.approx(cal.recall)


def test_gated_generation_on_smol(smol, conditions):
    """8 mixed held-out prompts: open rows == steered, closed rows == unsteered (byte-identical
    text), every row == the prompt alone, cache on == cache off."""
    vs = conditions["last"]
    cal = calibrate(smol, vs, TRAIN.prompts, TRAIN.labels)
    gate = ConditionGate(cal.layer, vs.directions[cal.layer], cal.threshold, cal.side, "last")
    prompts = [p for pair in zip(HELD.positives()[:4], HELD.negatives()[:4]) for p in pair]
    rude = compute_vectors(smol, load_bundled("neutral_rude").split(0.25)[0])
    steers = steers_for(rude.directions, [15], scale=1.5)
    greedy = SamplingSettings(max_new_tokens=12)
    gated = generate(smol, prompts, steers, sampling=greedy, gate=gate)
    assert [r.gate_open for r in gated] == [True, False] * 4
    plain = generate(smol, prompts, sampling=greedy)
    steered = generate(smol, prompts, steers, sampling=greedy)
    for r, res in enumerate(gated):
        want = steered[r] if res.gate_open else plain[r]
        assert res.token_ids == want.token_ids and res.text == want.text, r
        alone = generate(smol, [prompts[r]], steers, sampling=greedy, gate=gate)[0]
        assert alone.token_ids == res.token_ids, r
    assert any(steered[r].token_ids != plain[r].token_ids for r in range(0, 8, 2))
    off = generate(smol, prompts, steers, sampling=greedy, gate=gate, use_cache=False)
    assert [r.token_ids for r in off] == [r.token_ids for r in gated]
