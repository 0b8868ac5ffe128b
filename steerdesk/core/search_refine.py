"""The refine phase of a steering search (issue 16): a trust region around the best trial within the
fluency budget, proposed by Optuna's Gaussian-process sampler on the single constrained objective.

Why: "the best margin delta within the fluency budget" is a constrained single objective, while the
study's samplers spend trials describing the whole margin-KL front (low-scale, low-KL settings are
Pareto-optimal too), and over the full space (start x span x scale x mode x normalize) 25 trials did
not find a one-layer optimum unless a start point sat on it (docs/benchmarks.md, "Search (issue 16)").
So the last part of the budget (from :func:`refine_from` evaluated trials on) is spent near the best
trial so far, as trust-region Bayesian optimisation does (TuRBO: Eriksson et al., "Scalable Global
Optimization via Local Bayesian Optimization", NeurIPS 2019):

* **centre**: the complete trial with the largest margin delta *projected to the budget's edge*
  (:func:`edge_margin`: a trial over the budget counts with its margin times
  ``sqrt(budget / fluency loss)``, what scaling it down to the edge gives when the fluency loss grows
  with the square of the scale and the margin linearly; a trial within the budget with its own
  margin), among the trials at most :data:`NEAR` times over the budget where there are any
  (:func:`centre_of`), re-chosen before every batch. So a strong setting just over the budget is refined
  rather than a weak one inside it (a set whose start points at x1 all break fluency but one);
* **region**: its span, mode and normalisation kept; start layer within :data:`RADIUS` layers of its
  start; searched scale within :data:`SCALE_FACTORS` times the scale at its projected budget edge
  (its searched scale times ``sqrt(budget / fluency loss)``, :func:`edge_factor`: down for a centre
  over the budget, up for one inside it), clipped to the space;
* **proposals**: a seeded ``optuna.samplers.GPSampler`` on an in-memory single-objective study
  (maximise margin delta, constraint ``fluency loss - budget <= 0``: Optuna's constrained log-EI; a
  batch of k proposals is its q-batch acquisition over running trials) that is first told every
  stored trial inside the region. Its proposals are enqueued in the stored study, which keeps its
  two objectives; the trials carry the user attribute ``refine`` (the centre's trial number).

Optuna does the optimising; steerdesk only chooses the region and the objective. Nothing here reads
the clock or global random state: the proposals are a function of the stored trials and the seed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from .search_space import SearchSpace, TrialResult

#: Start layers either side of the centre's start that the refine phase may choose.
RADIUS = 3
#: The refine phase's scale window, as factors of the centre's searched scale moved to its projected
#: budget edge (:func:`region`).
SCALE_FACTORS = (0.7, 1.4)
#: The most :func:`edge_factor` moves a scale down or up.
EDGE_RANGE = (0.25, 2.0)
#: Trials whose fluency loss is at most NEAR x the budget are preferred as the centre (:func:`centre_of`).
NEAR = 2.0
#: Random (independent) proposals before the Gaussian process is fitted inside a region.
GP_STARTUP = 2


def refine_from(trials: int, startup: int) -> int:
    """How many evaluated trials a study needs before its batches are refined, for a budget of
    ``trials``: half the budget, at least the start batch of ``startup`` trials. A count, not a trial
    number: the phase starts with the first batch asked once the study holds that many (25 trials:
    12, so batches of 4 or 6 refine trials 12-24, batches of 5 trials 15-24)."""
    return max(startup, trials // 2)


def edge_factor(fluency_delta: float, fluency_budget: float) -> float:
    """``sqrt(budget / fluency loss)`` clipped to :data:`EDGE_RANGE`: the factor that takes a trial's
    scale to the fluency budget's edge if the loss grows with the square of the scale (below 1 over
    the budget, above 1 inside it; the upper end for a trial that gained fluency)."""
    loss = -fluency_delta
    lo, hi = EDGE_RANGE
    if loss <= 0:
        return hi
    return min(hi, max(lo, math.sqrt(max(fluency_budget, 0.0) / loss)))


def edge_shrink(fluency_delta: float, fluency_budget: float) -> float:
    """``min(1, edge_factor)``: how much a trial over the budget must be scaled down (1 inside it)."""
    return min(1.0, edge_factor(fluency_delta, fluency_budget))


def edge_margin(trial: TrialResult, fluency_budget: float) -> float | None:
    """A complete trial's margin delta projected to the fluency budget's edge (``margin x
    edge_shrink``); None for a trial without finite scores."""
    m, f = trial.margin_delta, trial.fluency_delta
    if trial.state != "complete" or m is None or f is None or not (math.isfinite(m) and math.isfinite(f)):
        return None
    return m * edge_shrink(f, fluency_budget)


def centre_of(trials: Sequence[TrialResult], fluency_budget: float) -> TrialResult | None:
    """The trial the trust region is centred on: the largest :func:`edge_margin` among the trials whose
    fluency loss is at most :data:`NEAR` times the budget (where the square law is a fair guess; far
    over the budget, e.g. a 4-layer range at -4.8 nats/token, the loss grows much faster than the
    square of the scale), else among all (ties: the smaller fluency loss, then the earlier trial);
    None when no trial has finite scores."""
    for limit in (NEAR * fluency_budget, math.inf):
        best: tuple[float, float, int] | None = None
        out: TrialResult | None = None
        for t in trials:
            e = edge_margin(t, fluency_budget)
            if e is None or -(t.fluency_delta or 0.0) > limit:
                continue
            key = (e, t.fluency_delta or 0.0, -t.number)
            if best is None or key > best:
                best, out = key, t
        if out is not None:
            return out
    return None


def region(space: SearchSpace, centre: Mapping[str, Any], edge: float = 1.0) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trust region around a trial's parameters ``centre`` (Optuna parameter names); ``edge``
    (:func:`edge_factor` of the centre) moves the scale window to the centre's projected budget edge:
    searched scales ``SCALE_FACTORS x edge x`` the centre's (clipped to the space).

    Returns ``(distributions, fixed)``: the Optuna distributions of the dimensions searched in the
    region (``start``, ``scale``) and the fixed parameter values (``span``, ``mode``, ``normalize``),
    both holding only dimensions the space searches (:meth:`SearchSpace.distributions`). A centre at
    scale 0 (a clamp) gets the whole scale range; a negative scale the mirrored window.
    """
    from optuna.distributions import FloatDistribution, IntDistribution

    dists = space.distributions()
    searched: dict[str, Any] = {}
    fixed: dict[str, Any] = {key: centre[key] for key in ("span", "mode", "normalize") if key in dists}
    if "start" in dists:
        c = int(centre["start"])
        lo, hi = max(space.first_layer, c - RADIUS), min(space.last_layer, c + RADIUS)
        searched["start"] = IntDistribution(lo, hi)
    if "scale" in dists:
        target = min(space.scale_max, max(space.scale_min, float(centre["scale"]) * edge))
        a, b = sorted((target * SCALE_FACTORS[0], target * SCALE_FACTORS[1]))
        lo_f, hi_f = max(space.scale_min, a), min(space.scale_max, b)
        if hi_f > lo_f:  # (target in [min, max] and target != 0)
            searched["scale"] = FloatDistribution(lo_f, hi_f)
        else:  # a centre at scale 0 (clamp): the whole range
            searched["scale"] = FloatDistribution(space.scale_min, space.scale_max)
    return searched, fixed


def _inside(params: Mapping[str, Any], searched: Mapping[str, Any], fixed: Mapping[str, Any]) -> bool:
    if any(key not in params or params[key] != value for key, value in fixed.items()):
        return False
    for key, dist in searched.items():
        if key not in params:
            return False
        v = params[key]
        if not (dist.low <= v <= dist.high):
            return False
    return True


def propose(trials: Sequence[TrialResult], space: SearchSpace, fluency_budget: float, k: int,
            seed: int) -> list[tuple[dict[str, Any], int]]:
    """``k`` refine-phase proposals as ``(Optuna parameters of the stored study, centre trial number)``.

    ``trials``: the study's trials (:func:`~steerdesk.core.search_study.trial_results`). Returns an
    empty list when no trial has finite scores (the study's own sampler continues then). ``seed``
    seeds the Gaussian process sampler. Raises nothing for a well-formed study.
    """
    centre = centre_of(trials, fluency_budget)
    if centre is None or k < 1:
        return []
    assert centre.fluency_delta is not None
    searched, fixed = region(space, centre.params, edge_factor(centre.fluency_delta, fluency_budget))
    if not searched:  # a space of one layer and one scale: nothing to refine
        return []
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=GP_STARTUP, deterministic_objective=True)
        local = optuna.create_study(direction="maximize", sampler=sampler)
        for t in trials:
            if (t.state != "complete" or t.margin_delta is None or t.fluency_delta is None
                    or not math.isfinite(t.margin_delta) or not math.isfinite(t.fluency_delta)
                    or not _inside(t.params, searched, fixed)):
                continue
            local.enqueue_trial({key: t.params[key] for key in searched})
            lt = local.ask(searched)
            lt.set_constraint("fluency", -t.fluency_delta - fluency_budget)
            local.tell(lt, t.margin_delta)
        out = []
        for _ in range(k):
            lt = local.ask(searched)
            out.append(({**fixed, **lt.params}, centre.number))
    return out


__all__ = ["EDGE_RANGE", "GP_STARTUP", "NEAR", "RADIUS", "SCALE_FACTORS", "centre_of", "edge_factor", "edge_margin",
           "edge_shrink", "propose", "refine_from", "region"]
