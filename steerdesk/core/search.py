"""Multi-objective search for steering settings, with Optuna, in a SQLite study (issue 16).

A **trial** is one steering configuration: a contiguous layer range ``start .. start + span - 1``
(clipped to the space's last layer), one scale, a mode (``add`` / ``clamp`` / ``project``) and
``normalize``. Its two **objectives**, from :mod:`steerdesk.core.evaluate` on held-out pairs and
neutral texts, are the behaviour **margin delta** (nats/token, maximised) and the **KL** to the
unsteered model on neutral text (nats/token, minimised). The fluency delta is kept with every
trial: the "best" trial is the largest margin delta whose fluency loss is within the budget (as
in :func:`steerdesk.core.sweep.pick_best`), and the budget is given to the sampler as an Optuna
constraint (``Trial.set_constraint``), so it steers toward feasible settings.

Optuna does the optimising (``TPESampler`` by default, ``NSGAIISampler`` on request, both
seeded); steerdesk does not write its own optimiser. Trials are proposed in batches with
``study.ask()`` (TPE with ``constant_liar``, so a batch spreads out) and scored together by
:class:`Evaluator`: the texts are tokenised and the unsteered pass is run **once per run** (the
baseline, the KL reference and, with the default ``recorded`` engine, the block outputs at every
layer of the space, within a memory budget: :class:`steerdesk.core.sweep_recording.Recording`); each
batch then runs only its trials' steered tails (a trial whose range starts at layer L runs
blocks L+1..end from block L's recorded output, on packed rows, as a sweep does). The ``scorer``
engine (one :meth:`steerdesk.core.evaluate.TextScorer.score` call per batch, full forwards, one batch row per
configuration and text) and ``sweep`` (one sweep-engine run per batch) remain selectable.

**Refine phase** (default for a new study): from the first batch asked once the study holds
:func:`~steerdesk.core.search_refine.refine_from` evaluated trials (about the second half of the
budget), each batch is proposed by Optuna's Gaussian-process sampler on the single constrained
objective (margin delta, fluency within the budget) inside a trust region around the best trial so
far, and enqueued in the study (:mod:`steerdesk.core.search_refine`).

**Scale units.** The searched ``scale`` multiplies the raw vector in every mode but ``project``
(where it is the fraction of the component removed, as in :mod:`steerdesk.core.steering`). With
``normalize`` the applied scale is ``scale x`` the mean raw norm of the range's directions, so the
same searched scale means the same strength with and without normalisation (exactly so for a
one-layer range); :attr:`TrialSettings.scale` is the scale actually applied.

**Storage.** The study lives in a SQLite file through Optuna's RDB storage (``sqlite:///path``),
so Optuna's own tools read it. Study name :data:`STUDY_NAME`; study user attributes record the
steerdesk format, the model identity and vector identity (:func:`steerdesk.core.sweep.model_identity`,
:func:`steerdesk.core.sweep.vector_identity`), what was scored (held-out set hash, neutral texts
hash, system message, pair limit), the space, the seed, the sampler and the fluency budget.
An existing file is validated **read-only** before anything is written: an unreadable or foreign
file, a study made for another model / vector / held-out set, or an explicitly given space, seed,
sampler or budget that differs from the stored one is a one-line :class:`SteerdeskError` and the
file is left untouched.

**Resume.** A search continues from the stored trials. The sampler of each batch is seeded from
``(seed, number of trials stored)``, so the proposals are a function of the stored trials: the same
seed gives the same trials, and a search stopped between batches resumes exactly where an
uninterrupted one would be. Trials left ``RUNNING`` by a killed process (their recorded process is
gone) are marked ``FAIL`` (user attribute ``interrupted``) and their parameters are enqueued again
(``retry_of``), so nothing is lost and nothing is counted twice: the budget counts evaluated trials
(``COMPLETE``, plus ``FAIL`` with a non-finite score).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .datasets import Dataset
from .defaults import SEARCH_TRIALS
from .errors import Cancelled, SteerdeskError
from .evaluate import NEUTRAL_TEXTS
from .layouts import prepare_texts
from .search_eval import DEFAULT_ENGINE, ENGINES, Evaluator, check_engine
from .search_refine import propose, refine_from
from .search_space import (
    DEFAULT_MAX_SPAN,
    DEFAULT_SCALE,
    SearchSpace,
    TrialResult,
    TrialSettings,
    best_within_budget,
    finite_or_none,
    pareto_mask,
    settings_for,
    start_points,
)
from .search_study import (
    DEFAULT_BATCH,
    DEFAULT_BUDGET,
    FORMAT,
    SAMPLERS,
    STUDY_NAME,
    StoredStudy,
    StudyIdentity,
    batch_seed,
    close_study,
    identity_for,
    is_evaluated,
    make_sampler,
    open_for_search,
    read_study,
    recover_interrupted,
    retry_attrs,
    trial_phase,
    trial_results,
)

log = logging.getLogger(__name__)

DEFAULT_TRIALS = SEARCH_TRIALS

TrialCallback = Callable[[TrialResult], None]


# ================================================================================ result

@dataclass
class SearchResult:
    """A search as stored after this run: every trial, the Pareto front and the best feasible trial."""

    study: str
    trials: list[TrialResult]
    space: SearchSpace
    seed: int
    sampler: str
    fluency_budget: float
    model: dict[str, Any]
    vector: dict[str, Any]
    evaluation: dict[str, Any]
    baseline: dict[str, Any] = field(default_factory=dict)
    evaluated_before: int = 0  # trials already stored when this run started (resume)
    evaluated_now: int = 0
    batches: int = 0
    seconds: float = 0.0
    stopped: bool = False
    created: str = ""
    refine_from: int | None = None  # evaluated trials after which the search refines; None: no refine phase

    @property
    def evaluated(self) -> list[TrialResult]:
        return [t for t in self.trials if t.state in ("complete", "failed")]

    @property
    def pareto(self) -> list[TrialResult]:
        """The non-dominated complete trials, by increasing KL."""
        return sorted((t for t in self.trials if t.on_front), key=lambda t: (t.kl, -(t.margin_delta or 0.0)))

    @property
    def best(self) -> TrialResult | None:
        return best_within_budget(self.trials, self.fluency_budget)

    def trial(self, number: int) -> TrialResult:
        for t in self.trials:
            if t.number == number:
                return t
        raise SteerdeskError(f"The study has no trial {number}.")

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {"format": FORMAT, "study": self.study, "space": self.space.to_dict(), "seed": self.seed,
                "sampler": self.sampler, "fluency_budget": self.fluency_budget, "model": self.model,
                "vector": self.vector, "evaluation": self.evaluation, "baseline": self.baseline,
                "evaluated": len(self.evaluated), "evaluated_before": self.evaluated_before,
                "evaluated_now": self.evaluated_now, "batches": self.batches, "seconds": self.seconds,
                "stopped": self.stopped, "created": self.created, "refine_from": self.refine_from,
                "best": best.to_dict() if best else None,
                "pareto": [t.to_dict() for t in self.pareto],
                "trials": [t.to_dict() for t in self.trials]}

    def save_json(self, path: str | Path) -> None:
        """Write the result (Pareto set, best, every trial) as JSON (atomic)."""
        from .fileio import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, ensure_ascii=False, allow_nan=False) + "\n")

    def pareto_csv(self) -> str:
        """The Pareto set as CSV: one row per trial, by increasing KL."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["trial", "margin_delta", "kl", "fluency_delta", "within_budget", "first_layer", "last_layer",
                    "scale", "mode", "normalize", "positions", "searched_scale"])
        for t in self.pareto:
            s = t.settings
            assert s is not None
            w.writerow([t.number, repr(t.margin_delta), repr(t.kl), repr(t.fluency_delta), t.within_budget,
                        s.layers[0], s.layers[-1], repr(s.scale), s.mode, s.normalize, s.positions,
                        repr(s.searched_scale)])
        return buf.getvalue()

    def save_csv(self, path: str | Path) -> None:
        from .fileio import atomic_write_text

        atomic_write_text(path, self.pareto_csv())

    def summary(self) -> str:
        """A few lines for a terminal: counts, the best feasible trial, the Pareto front."""
        lines = [f"study {self.study}: {len(self.evaluated)} trials evaluated "
                 f"({self.evaluated_now} in this run, {self.batches} batches, {self.seconds:.1f} s)"
                 + (" - stopped" if self.stopped else ""),
                 f"space: {self.space.size_text()}; sampler {self.sampler}, seed {self.seed}; "
                 + ("no refine phase" if self.refine_from is None else
                    f"refine phase from {self.refine_from} evaluated trials "
                    f"({sum(1 for t in self.trials if t.phase == 'refine')} so far)")]
        b = self.best
        if b is not None and b.settings is not None:
            lines.append(f"best within the fluency budget {self.fluency_budget:g}: trial {b.number} "
                         f"{b.settings.label()}: margin {b.margin_delta:+.3f}, KL {b.kl:.3f}, "
                         f"fluency {b.fluency_delta:+.3f}")
        else:
            lines.append(f"no trial within the fluency budget {self.fluency_budget:g}")
        lines.append("pareto front (margin delta up, KL down):")
        for t in self.pareto:
            assert t.settings is not None
            lines.append(f"  trial {t.number:>4}  margin {t.margin_delta:+.3f}  KL {t.kl:.4f}  "
                         f"fluency {t.fluency_delta:+.3f}{'' if t.within_budget else ' ~'}  {t.settings.label()}")
        return "\n".join(lines)


def load_result(path: str | Path, vectors: Any | None = None) -> SearchResult:
    """The stored study at ``path`` as a :class:`SearchResult`, read without writing (no model needed:
    trial settings come from the trials' stored attributes unless ``vectors`` is given)."""
    stored = read_study(path)
    if stored is None:
        raise SteerdeskError(f"Study file not found: {path}")
    a = stored.attrs
    trials = trial_results(stored.trials, stored.space, vectors, stored.fluency_budget)
    return SearchResult(study=str(path), trials=trials, space=stored.space, seed=stored.seed, sampler=stored.sampler,
                        fluency_budget=stored.fluency_budget, model=dict(a.get("model") or {}),
                        vector=dict(a.get("vector") or {}), evaluation=dict(a.get("evaluation") or {}),
                        baseline=dict(a.get("baseline") or {}),
                        evaluated_before=sum(1 for t in trials if t.state in ("complete", "failed")),
                        created=str(a.get("created", "")), refine_from=stored.refine_from)


def search(
    lm: Any,
    vectors: Any,
    heldout: Dataset,
    study_path: str | Path,
    *,
    trials: int = DEFAULT_TRIALS,
    batch: int = DEFAULT_BATCH,
    space: SearchSpace | None = None,
    seed: int | None = None,
    sampler: str | None = None,
    fluency_budget: float | None = None,
    neutral: Sequence[str] | None = None,
    system: str | None = None,
    max_pairs: int | None = None,
    batch_size: int = 16,
    max_rows: int = 64,
    vector_path: str | None = None,
    spread_start: bool = True,
    refine: bool | None = None,
    engine: str = DEFAULT_ENGINE,
    on_trial: TrialCallback | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> SearchResult:
    """Run (or resume) a search until the study holds ``trials`` evaluated trials.

    ``trials`` is the study's total budget (a resumed study counts what it already has);
    ``batch`` trials are asked, scored together and told at a time. ``space``, ``seed``,
    ``sampler`` and ``fluency_budget`` default to the stored ones (resume) or to
    :meth:`SearchSpace.default`, 0, ``"tpe"`` and 0.5. ``neutral`` defaults to
    :data:`~steerdesk.core.evaluate.NEUTRAL_TEXTS`. ``on_trial`` gets each finished trial;
    ``progress(done, total)`` counts evaluated trials. A set ``cancel`` stops after marking the
    batch in flight interrupted (it is retried on resume); the result then has ``stopped``.
    ``spread_start`` (the default): a fresh study's first ``max(batch, 4)`` trials are the
    depth-spread single layers of :func:`~steerdesk.core.search_space.start_points` (enqueued, user
    attribute ``start_point``) instead of random ones; ``False`` gives Optuna's random start.
    ``refine`` (a new study's default ``True``): once the study holds
    :func:`~steerdesk.core.search_refine.refine_from` evaluated trials (half the budget the study was
    created with; stored as the study attribute ``refine_from``, so a resume keeps it), each batch
    from the next one on is proposed inside a trust region around the best trial (margin projected
    to the fluency budget's edge) by a single-objective Gaussian process
    (:mod:`steerdesk.core.search_refine`; user attribute ``refine``).
    ``engine``: how each batch is scored (:meth:`Evaluator.score`; the default records the
    unsteered pass once and runs only the trials' steered tails; the scores do not depend on it
    beyond float rounding). Raises a one-line ``SteerdeskError`` for bad input, before the study
    file is touched.
    """
    t0 = time.perf_counter()
    if not isinstance(trials, int) or trials < 1:
        raise SteerdeskError("The trial budget must be at least 1.")
    if not isinstance(batch, int) or batch < 1:
        raise SteerdeskError("The batch size (trials scored together) must be at least 1.")
    if fluency_budget is not None and not (math.isfinite(fluency_budget) and fluency_budget >= 0):
        raise SteerdeskError("The fluency budget must be a number >= 0.")
    if sampler is not None and sampler not in SAMPLERS:
        raise SteerdeskError(f"Unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}.")
    check_engine(engine)
    info = lm.info
    d = getattr(vectors, "directions", vectors)
    if d.ndim != 2 or d.shape[1] != info.hidden_size:
        raise SteerdeskError(f"The vectors have hidden size {d.shape[-1]}, the model {info.hidden_size}.")
    check = getattr(vectors, "check_compatible", None)
    if callable(check):
        check(info)
    neutral = list(NEUTRAL_TEXTS if neutral is None else neutral)
    if not [t for t in neutral if t.strip()]:
        raise SteerdeskError("A search needs neutral texts for its KL objective.")
    default_space = SearchSpace.default(vectors, info.num_layers)
    if space is not None:
        space.check(vectors, info.num_layers)
    identity = identity_for(lm, vectors, heldout, neutral=neutral, system=system, max_pairs=max_pairs,
                            vector_path=vector_path)
    # The texts are checked before the study is created (an unusable held-out set writes nothing).
    prepare_texts(lm, heldout, neutral=neutral, system=system, max_pairs=max_pairs)
    startup = max(batch, 4)
    study, _stored, space, seed, sampler, fluency_budget, refine_at = open_for_search(
        study_path, identity, space=space, seed=seed, sampler=sampler, fluency_budget=fluency_budget,
        default_space=default_space, refine=refine, refine_start=refine_from(trials, startup))
    assert space is not None and seed is not None and sampler is not None and fluency_budget is not None
    try:
        space.check(vectors, info.num_layers)
        recovered = recover_interrupted(study)
        if recovered:
            log.info("trials %s were interrupted; retrying them", recovered)
        if spread_start and not study.get_trials(deepcopy=False):
            for params in start_points(space, min(startup, trials)):
                study.enqueue_trial(params, user_attrs={"start_point": True}, skip_if_exists=False)
        dists = space.distributions()

        def nis_evaluated() -> int:
            return sum(1 for t in study.get_trials(deepcopy=False) if is_evaluated(t))

        before = nis_evaluated()
        done_now = 0
        batches = 0
        stopped = False
        evaluator: Evaluator | None = None
        host, pid = socket.gethostname(), os.getpid()
        if progress:
            progress(min(before, trials), trials)
        while nis_evaluated() < trials:
            if cancel is not None and cancel.is_set():
                stopped = True
                break
            if evaluator is None:
                evaluator = Evaluator.prepare(lm, vectors, heldout, neutral=neutral, system=system, max_pairs=max_pairs,
                                              batch_size=batch_size, max_rows=max_rows, cancel=cancel, engine=engine,
                                              layers=range(space.first_layer, space.last_layer + 1))
                study.set_user_attr("baseline", {"margin": evaluator.base.margin, "fluency": evaluator.base.fluency})
            k = min(batch, trials - nis_evaluated())
            n_stored = len(study.get_trials(deepcopy=False))
            study.sampler = make_sampler(sampler, batch_seed(seed, n_stored), startup=startup)
            if refine_at is not None and nis_evaluated() >= refine_at:
                from optuna.trial import TrialState

                waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
                stored_results = trial_results(study.get_trials(deepcopy=False), space, vectors, fluency_budget)
                for params, centre in propose(stored_results, space, fluency_budget, k - waiting,
                                              batch_seed(seed, n_stored)):
                    study.enqueue_trial(params, user_attrs={"refine": centre}, skip_if_exists=False)
            asked = []
            for _ in range(k):
                trial = study.ask(dists)
                trial.set_user_attr("pid", pid)
                trial.set_user_attr("host", host)
                asked.append(trial)
            settings = [settings_for(t.params, space, vectors) for t in asked]
            try:
                scored = evaluator.score(settings, cancel=cancel)
            except Cancelled:
                from optuna.trial import TrialState

                for t in asked:
                    t.set_user_attr("interrupted", True)
                    study.tell(t, state=TrialState.FAIL)
                    study.enqueue_trial(dict(t.params), user_attrs=retry_attrs(t), skip_if_exists=False)
                stopped = True
                break
            batches += 1
            from optuna.trial import TrialState

            for t, s, (m, kl, f) in zip(asked, settings, scored):
                t.set_user_attr("fluency_delta", f if math.isfinite(f) else None)
                t.set_user_attr("settings", s.to_dict())
                if math.isfinite(m) and math.isfinite(kl) and math.isfinite(f):
                    t.set_constraint("fluency", -f - fluency_budget)
                    study.tell(t, [m, kl])
                else:
                    t.set_user_attr("failed", "non-finite score (the steering blew the model up)")
                    study.tell(t, state=TrialState.FAIL)
                done_now += 1
                if on_trial is not None:
                    r = TrialResult(number=t.number, state="complete" if math.isfinite(m + kl + f) else "failed",
                                    params=dict(t.params), settings=s, margin_delta=m, kl=kl, fluency_delta=f,
                                    retry_of=t.user_attrs.get("retry_of"),
                                    phase=trial_phase(t.user_attrs))
                    r.within_budget = r.state == "complete" and -f <= fluency_budget
                    on_trial(r)
            if progress:
                progress(min(nis_evaluated(), trials), trials)
        all_trials = trial_results(study.get_trials(deepcopy=False), space, vectors, fluency_budget)
        attrs = study.user_attrs
    finally:
        close_study(study)
    return SearchResult(study=str(study_path), trials=all_trials, space=space, seed=seed, sampler=sampler,
                        fluency_budget=fluency_budget, model=identity.model, vector=identity.vector,
                        evaluation=identity.evaluation, baseline=dict(attrs.get("baseline") or {}),
                        evaluated_before=before, evaluated_now=done_now, batches=batches,
                        seconds=round(time.perf_counter() - t0, 3), stopped=stopped,
                        created=str(attrs.get("created", "")), refine_from=refine_at)


# ================================================================================ export

def export_vectors(vectors: Any, trial: TrialResult, path: str | Path, *, study: str | None = None) -> None:
    """Write ``vectors`` (a VectorSet) to ``path`` with the trial's settings in its metadata
    (``steering_settings``: JSON with layers, scale, mode, normalize, positions, scores, study, trial)."""
    from .vectors import VectorSet, export_gguf, save_vectors

    if trial.settings is None:
        raise SteerdeskError(f"Trial {trial.number} has no settings to export.")
    if not isinstance(vectors, VectorSet):
        raise SteerdeskError("Exporting needs the vector set the study was made for.")
    meta = dict(vectors.metadata)
    scores = {"margin_delta": finite_or_none(trial.margin_delta), "kl": finite_or_none(trial.kl),
              "fluency_delta": finite_or_none(trial.fluency_delta)}
    meta["steering_settings"] = json.dumps({**trial.settings.to_dict(), **scores, "source": "search", "study": study,
                                            "trial": trial.number})
    out = replace(vectors, metadata=meta)
    if str(path).lower().endswith(".gguf"):
        export_gguf(out, path)
    else:
        save_vectors(out, path)


__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_BUDGET",
    "DEFAULT_ENGINE",
    "DEFAULT_MAX_SPAN",
    "DEFAULT_SCALE",
    "DEFAULT_TRIALS",
    "ENGINES",
    "FORMAT",
    "SAMPLERS",
    "STUDY_NAME",
    "Evaluator",
    "SearchResult",
    "SearchSpace",
    "StoredStudy",
    "StudyIdentity",
    "TrialResult",
    "TrialSettings",
    "batch_seed",
    "best_within_budget",
    "close_study",
    "export_vectors",
    "identity_for",
    "load_result",
    "make_sampler",
    "open_for_search",
    "pareto_mask",
    "read_study",
    "recover_interrupted",
    "search",
    "settings_for",
    "start_points",
    "trial_results",
]
