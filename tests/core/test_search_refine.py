"""The search's refine phase (issue 16): the trust region and the constrained single-objective proposals."""

from __future__ import annotations

import math

import pytest

from steerdesk.core.search_refine import (
    NEAR,
    RADIUS,
    centre_of,
    edge_factor,
    edge_margin,
    edge_shrink,
    propose,
    refine_from,
    region,
)
from steerdesk.core.search_space import SearchSpace, TrialResult, best_within_budget

SPACE = SearchSpace(first_layer=0, last_layer=11, max_span=3)
BUDGET = 0.5


def _objective(params: dict) -> tuple[float, float]:
    """A made-up landscape with a known constrained optimum: margin grows with the scale and peaks at
    layer 8 (one layer wide: 30 % less per layer away); the fluency loss is scale squared. With a budget
    of 0.5 the best is layer 8 at scale sqrt(0.5): margin 0.7071."""
    layer, scale = params["start"], params["scale"]
    margin = scale * max(0.0, 1.0 - 0.3 * abs(layer - 8))
    return margin, -scale * scale


def _trial(number: int, params: dict, phase: str = "search") -> TrialResult:
    m, f = _objective(params)
    t = TrialResult(number=number, state="complete", params=dict(params), settings=None, margin_delta=m, kl=m * m,
                    fluency_delta=f, phase=phase)
    t.within_budget = -f <= BUDGET
    return t


def test_refine_starts_in_the_second_half_after_the_start_batch():
    assert refine_from(25, 5) == 12 and refine_from(25, 4) == 12
    assert refine_from(6, 4) == 4 and refine_from(100, 5) == 50


def test_region_keeps_the_centre_structure_and_clips_layers_and_scales_to_the_space():
    centre = {"start": 1, "span": 2, "scale": 1.5, "mode": "clamp", "normalize": True}
    searched, fixed = region(SPACE, centre)
    assert fixed == {"span": 2, "mode": "clamp", "normalize": True}
    assert (searched["start"].low, searched["start"].high) == (0, 1 + RADIUS)
    assert (searched["scale"].low, searched["scale"].high) == pytest.approx((1.05, 2.0))  # 1.4 x 1.5 clipped to 2
    searched, _ = region(SPACE, {**centre, "start": 10, "scale": 0.4})
    assert (searched["start"].low, searched["start"].high) == (10 - RADIUS, 11)
    assert (searched["scale"].low, searched["scale"].high) == pytest.approx((0.28, 0.56))
    # The window moves to the centre's projected budget edge: down for a centre over it, up inside it.
    searched, _ = region(SPACE, {**centre, "scale": 1.0}, edge=edge_factor(-2.0, BUDGET))  # sqrt(0.5 / 2) = 0.5
    assert (searched["scale"].low, searched["scale"].high) == pytest.approx((0.35, 0.7))
    searched, _ = region(SPACE, {**centre, "scale": 0.4}, edge=edge_factor(-0.125, BUDGET))  # sqrt(4) = 2
    assert (searched["scale"].low, searched["scale"].high) == pytest.approx((0.56, 1.12))
    assert edge_factor(0.1, BUDGET) == 2.0 and edge_factor(-800.0, BUDGET) == 0.25  # clipped
    # A negative scale (a space reaching below 0) gets the mirrored window; scale 0 the whole range.
    signed = SearchSpace(first_layer=0, last_layer=11, max_span=3, scale_min=-2.0, scale_max=2.0)
    searched, _ = region(signed, {**centre, "scale": -1.0})
    assert (searched["scale"].low, searched["scale"].high) == pytest.approx((-1.4, -0.7))
    # A clamp at scale 0 has no scale to take factors of: the whole range.
    searched, _ = region(SPACE, {**centre, "scale": 0.0})
    assert (searched["scale"].low, searched["scale"].high) == (0.0, 2.0)
    # Dimensions the space does not search are neither searched nor fixed.
    narrow = SearchSpace(first_layer=0, last_layer=11, max_span=1, modes=("add",), normalize=(False,))
    searched, fixed = region(narrow, {"start": 5, "scale": 1.0})
    assert fixed == {} and set(searched) == {"start", "scale"}


def test_the_centre_is_the_best_margin_projected_to_the_budget_edge():
    fixed = {"span": 1, "mode": "add", "normalize": False}
    inside = _trial(0, {**fixed, "start": 2, "scale": 0.3})  # margin 0.3 * (1 - 1.8) -> 0, fluency -0.09
    weak = _trial(1, {**fixed, "start": 10, "scale": 0.6})  # margin 0.24, within the budget
    over = _trial(2, {**fixed, "start": 7, "scale": 1.0})  # margin 0.7, fluency -1.0: 0.7 * sqrt(0.5) = 0.495
    assert edge_shrink(-1.0, BUDGET) == pytest.approx(math.sqrt(0.5)) and edge_shrink(-0.2, BUDGET) == 1.0
    assert edge_margin(over, BUDGET) == pytest.approx(0.7 * math.sqrt(0.5))
    assert best_within_budget([inside, weak, over], BUDGET) is weak
    assert centre_of([inside, weak, over], BUDGET) is over
    # Far over the budget (more than NEAR x) a trial is the centre only when no trial is nearer.
    far_over = _trial(3, {**fixed, "start": 8, "scale": 2.0})  # margin 2, fluency -4: 2 * sqrt(1/8) = 0.707
    assert -far_over.fluency_delta > NEAR * BUDGET
    assert centre_of([weak, over, far_over], BUDGET) is over
    assert centre_of([far_over, _trial(4, {**fixed, "start": 9, "scale": 1.9})], BUDGET) is far_over
    # its region is around the scale that would sit at the edge (2 x sqrt(1/8) = 0.707)
    searched, _ = region(SPACE, far_over.params, edge_factor(far_over.fluency_delta, BUDGET))
    assert searched["scale"].low < 2.0 * math.sqrt(1 / 8) < searched["scale"].high
    failed = TrialResult(number=5, state="failed", params={**fixed, "start": 1, "scale": 2.0}, settings=None)
    assert centre_of([failed], BUDGET) is None and propose([failed], SPACE, BUDGET, 3, seed=1) == []


def test_proposals_climb_to_the_constrained_optimum_inside_their_regions():
    """From start points two layers off the peak at a scale well inside the budget, the refine phase
    (4 rounds of 3) must reach >= 95 % of the constrained optimum (layer 8, margin 0.7071). It fails if
    the objective were minimised, the constraint's sign flipped (scales far over the budget) or the
    region did not move with the best trial."""
    fixed = {"span": 1, "mode": "add", "normalize": False}
    trials = [_trial(i, {**fixed, "start": layer, "scale": 0.3}, "start") for i, layer in enumerate((2, 6, 10))]
    for round_ in range(4):
        before = centre_of(trials, BUDGET)
        assert before is not None
        searched, kept = region(SPACE, before.params, edge_factor(before.fluency_delta, BUDGET))
        proposals = propose(trials, SPACE, BUDGET, 3, seed=round_)
        assert len(proposals) == 3
        for params, centre in proposals:
            assert centre == before.number
            assert {k: params[k] for k in kept} == kept
            assert searched["start"].low <= params["start"] <= searched["start"].high
            assert searched["scale"].low <= params["scale"] <= searched["scale"].high
            trials.append(_trial(len(trials), params, "refine"))
    best = best_within_budget(trials, BUDGET)
    assert best is not None and best.params["start"] == 8
    assert best.margin_delta >= 0.95 * math.sqrt(0.5), [(t.params["start"], t.params["scale"]) for t in trials]


def test_same_trials_and_seed_give_the_same_proposals():
    fixed = {"span": 1, "mode": "add", "normalize": False}
    trials = [_trial(i, {**fixed, "start": layer, "scale": s}, "start")
              for i, (layer, s) in enumerate(((3, 0.4), (6, 0.5), (7, 0.6), (9, 0.3)))]
    a = propose(trials, SPACE, BUDGET, 3, seed=11)
    b = propose(trials, SPACE, BUDGET, 3, seed=11)
    assert a == b and len({tuple(sorted(p.items())) for p, _ in a}) == 3  # a batch spreads out
