"""The refine phase of a steering search (issue 16): a trust region around the best trial within the
fluency budget, proposed by Optuna's Gaussian-process sampler on the single constrained objective.

Why: "the best margin delta within the fluency budget" is a constrained single objective, while the
study's samplers spend trials describing the whole margin-KL front (low-scale, low-KL settings are
Pareto-optimal too), and over the full space (start x span x scale x mode x normalize) 25 trials did
not find a one-layer optimum unless a start point sat on it (docs/benchmarks.md, "Search (issue 16)").
So the last part of the budget (trials numbered from :func:`refine_from` on) is spent near the best
trial so far, as trust-region Bayesian optimisation does (TuRBO: Eriksson et al., "Scalable Global
Optimization via Local Bayesian Optimization", NeurIPS 2019):

* **centre**: the complete trial with the largest margin delta whose fluency loss is within the
  budget (:func:`~steerdesk.core.search_space.best_within_budget`), re-chosen before every batch;
* **region**: its span, mode and normalisation kept; start layer within :data:`RADIUS` layers of its
  start; searched scale within :data:`SCALE_FACTORS` times its searched scale (clipped to the space);
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

from .search_space import SearchSpace, TrialResult, best_within_budget

#: Start layers either side of the centre's start that the refine phase may choose.
RADIUS = 3
#: The refine phase's scale range, as factors of the centre's searched scale.
SCALE_FACTORS = (0.5, 2.0)
#: Random (independent) proposals before the Gaussian process is fitted inside a region.
GP_STARTUP = 2


def refine_from(trials: int, startup: int) -> int:
    """The first trial number of the refine phase for a budget of ``trials``: the second half of the
    budget, after the start batch of ``startup`` trials (25 trials, batch 4 or 5: from trial 12)."""
    return max(startup, trials // 2)


def region(space: SearchSpace, centre: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trust region around a trial's parameters ``centre`` (Optuna parameter names).

    Returns ``(distributions, fixed)``: the Optuna distributions of the dimensions searched in the
    region (``start``, ``scale``; a dimension whose range collapses to one value goes to ``fixed``)
    and the fixed parameter values (``span``, ``mode``, ``normalize`` and collapsed ones), both
    holding only dimensions the space searches (:meth:`SearchSpace.distributions`).
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
        s = float(centre["scale"])
        lo_f, hi_f = max(space.scale_min, s * SCALE_FACTORS[0]), min(space.scale_max, s * SCALE_FACTORS[1])
        if hi_f > lo_f:
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
    empty list when no trial is within the fluency budget (the study's own sampler continues then).
    ``seed`` seeds the Gaussian process sampler. Raises nothing for a well-formed study.
    """
    centre = best_within_budget(trials, fluency_budget)
    if centre is None or k < 1:
        return []
    searched, fixed = region(space, centre.params)
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


__all__ = ["GP_STARTUP", "RADIUS", "SCALE_FACTORS", "propose", "refine_from", "region"]
