"""Job: search steering settings (layer range, scale, mode, normalise) with Optuna, stored in SQLite.

The engine is :func:`steerdesk.core.search.search` (see its module docstring for the objectives,
batching, storage and resume). Here: the frozen :class:`SearchSpec`, :func:`run`, one run record
per trial (:func:`trial_records`; :func:`record` gives the best feasible trial's) and the export of
a chosen trial as a generation recipe (:func:`generate_spec_for`, :func:`export_recipe`) or a vector
file (:func:`steerdesk.core.search.export_vectors`) or a baked checkpoint (:func:`bake_spec_for`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.datasets import Dataset
from ..core.errors import SteerdeskError
from ..core.evaluate import NEUTRAL_TEXTS
from ..core.generate import SamplingSettings
from ..core.models import LoadedModel
from ..core.records import RunRecord
from ..core.search import (
    DEFAULT_BATCH,
    DEFAULT_TRIALS,
    SearchResult,
    SearchSpace,
    TrialResult,
)
from ..core.vectors import VectorSet
from .bake import BakeSpec
from .context import JobContext
from .generate import GenerateSpec
from .steering_spec import SteeringSpec

NAME = "search"
TITLE = "Search failed"


@dataclass(frozen=True)
class SearchSpec:
    """Arguments of :func:`steerdesk.core.search.search`, plus how records name their inputs.

    ``study`` is the SQLite study file (created, or resumed when it exists). ``trials`` is the
    study's total budget of evaluated trials; ``batch`` trials are scored together. ``space``,
    ``seed``, ``sampler`` and ``fluency_budget`` left ``None`` mean "the stored ones" for an
    existing study and the defaults for a new one. ``spread_start`` (default): a new study starts
    from the depth-spread single layers of :func:`steerdesk.core.search_space.start_points`.
    ``refine`` None: a new study refines about the second half of its trials near the best one within the
    fluency budget (:mod:`steerdesk.core.search_refine`), an existing one keeps its stored choice.
    ``heldout`` is the pairs scored; ``dataset``
    (as loaded) and ``heldout_fraction`` let a record name where they came from.
    """

    vectors: VectorSet = field(compare=False)
    heldout: Dataset = field(compare=False)
    study: str
    trials: int = DEFAULT_TRIALS
    batch: int = DEFAULT_BATCH
    space: SearchSpace | None = None
    seed: int | None = None
    sampler: str | None = None
    fluency_budget: float | None = None
    neutral: tuple[str, ...] = NEUTRAL_TEXTS
    system: str | None = None
    max_pairs: int | None = None
    batch_size: int = 16
    max_rows: int = 64
    spread_start: bool = True
    refine: bool | None = None
    vector_path: str | None = None
    dataset: Dataset | None = field(default=None, compare=False)
    dataset_spec: str | None = None
    heldout_fraction: float = 0.0
    model: str | None = None


def run(lm: LoadedModel, spec: SearchSpec, ctx: JobContext) -> SearchResult:
    """Run or resume the search; ``ctx.partial(TrialResult)`` per finished trial, progress per batch.

    A stop (``ctx.cancel``) keeps every finished trial; the batch in flight is retried on resume,
    and the result comes back with ``stopped`` set (no exception).
    """
    from ..core.search import search

    return search(lm, spec.vectors, spec.heldout, spec.study, trials=spec.trials, batch=spec.batch, space=spec.space,
                  seed=spec.seed, sampler=spec.sampler, fluency_budget=spec.fluency_budget,
                  neutral=list(spec.neutral), system=spec.system, max_pairs=spec.max_pairs,
                  batch_size=spec.batch_size, max_rows=spec.max_rows, vector_path=spec.vector_path,
                  spread_start=spec.spread_start, refine=spec.refine,
                  on_trial=ctx.partial if ctx.on_partial else None,
                  progress=lambda done, total: ctx.progress(done, total, "Searching"), cancel=ctx.cancel)


def trial_record(lm: LoadedModel, spec: SearchSpec, result: SearchResult, trial: TrialResult) -> RunRecord:
    """A trial as a run record: a one-cell sweep (the trial's layer range as a named layer set at its
    scale), which ``steerdesk run`` re-runs and checks like any sweep recipe."""
    from ..core.records import record_sweep
    from ..core.sweep_result import SetRow, SweepResult

    s = trial.settings
    if s is None or trial.state not in ("complete", "failed"):
        raise SteerdeskError(f"Trial {trial.number} was not evaluated.")
    name = f"trial {trial.number}"
    within = trial.within_budget
    cell = SweepResult(
        layers=[], scales=[s.scale], margin_delta=[], fluency_delta=[], kl=None,
        sets=[SetRow(name, list(s.layers), [trial.margin_delta], [trial.fluency_delta], [trial.kl])],
        baseline=dict(result.baseline), fluency_budget=result.fluency_budget,
        best={"row": 0, "col": 0, "layer": None, "set": name, "layers": list(s.layers), "scale": s.scale,
              "margin_delta": trial.margin_delta, "fluency_delta": trial.fluency_delta} if within else None,
        settings={"mode": s.mode, "normalize": s.normalize, "positions": s.positions, "system": spec.system,
                  "max_pairs": spec.max_pairs, "batch_size": spec.batch_size, "max_rows": spec.max_rows,
                  "prefix_reuse": True, "pack": True, "neutral_texts": list(spec.neutral),
                  "search": {"study": result.study, "trial": trial.number, "params": trial.params,
                             "searched_scale": s.searched_scale, "seed": result.seed, "sampler": result.sampler}},
        model=dict(result.model), vector=dict(result.vector),
        dataset={"name": spec.heldout.name, "sha256": spec.heldout.sha256()},
        created=result.created,
    )
    rec = record_sweep(lm, cell, spec.dataset if spec.dataset is not None else spec.heldout, spec.vectors,
                       dataset_spec=spec.dataset_spec, heldout=spec.heldout_fraction,
                       vector_path=spec.vector_path, model=spec.model)
    rec.settings["search"] = cell.settings["search"]
    return rec


def trial_records(lm: LoadedModel, spec: SearchSpec, result: SearchResult) -> list[RunRecord]:
    """One run record per evaluated trial of the study (see :func:`trial_record`), by trial number."""
    return [trial_record(lm, spec, result, t) for t in result.trials if t.state in ("complete", "failed")]


def record(lm: LoadedModel, spec: SearchSpec, result: SearchResult) -> RunRecord | None:
    """The run record of the best trial within the fluency budget (None when no trial is)."""
    best = result.best
    return None if best is None else trial_record(lm, spec, result, best)


def steering_spec_for(spec: SearchSpec, trial: TrialResult) -> SteeringSpec:
    """The trial's settings as a :class:`SteeringSpec` (the window's generation pane, a bake)."""
    s = trial.settings
    if s is None:
        raise SteerdeskError(f"Trial {trial.number} has no settings.")
    return SteeringSpec(vectors=spec.vectors, layers=tuple(s.layers), scale=s.scale, mode=s.mode,
                        normalize=s.normalize, positions=s.positions, vector_path=spec.vector_path)


def bake_spec_for(spec: SearchSpec, trial: TrialResult, out_dir: str, *, force: bool = False) -> BakeSpec:
    """A bake of the trial's settings into a checkpoint folder (the ``bake`` job refuses what it
    cannot bake exactly: ``project`` / ``clamp``, see :mod:`steerdesk.jobs.bake`)."""
    return BakeSpec(steering=steering_spec_for(spec, trial), out_dir=out_dir, force=force)


def generate_spec_for(spec: SearchSpec, trial: TrialResult, prompt: str, *,
                      sampling: SamplingSettings | None = None, compare: bool = True) -> GenerateSpec:
    """A generation with the trial's settings (and an unsteered row first with ``compare``)."""
    steering = steering_spec_for(spec, trial)
    return GenerateSpec.single(prompt, steering, compare=compare, sampling=sampling or SamplingSettings(),
                               system=spec.system, model=spec.model)


def export_recipe(lm: LoadedModel, spec: SearchSpec, trial: TrialResult, prompt: str, path: str | Path, *,
                  sampling: SamplingSettings | None = None, ctx: JobContext | None = None) -> RunRecord:
    """Generate ``prompt`` with the trial's settings (unsteered row first) and save the run record
    as a recipe at ``path`` (``steerdesk run`` re-runs it token for token when greedy)."""
    from . import generate as generate_job

    gspec = generate_spec_for(spec, trial, prompt, sampling=sampling)
    out = generate_job.run(lm, gspec, ctx or JobContext())
    rec = generate_job.record(lm, gspec, out)
    rec.settings["search"] = {"study": spec.study, "trial": trial.number, "margin_delta": trial.margin_delta,
                              "kl": trial.kl, "fluency_delta": trial.fluency_delta}
    rec.save(path)
    return rec
