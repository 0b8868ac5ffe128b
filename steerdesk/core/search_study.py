"""The SQLite study of a steering search (issue 16): identity, read-only validation, open/create,
crash recovery, the seeded sampler. The engine and the rules are in :mod:`steerdesk.core.search`.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .datasets import Dataset
from .defaults import FLUENCY_BUDGET, SEARCH_BATCH
from .errors import SteerdeskError
from .identity import model_identity, vector_identity
from .search_space import SearchSpace, TrialResult, TrialSettings, pareto_mask, settings_for

FORMAT = "steerdesk.search/1"
STUDY_NAME = "steerdesk-search"
SAMPLERS = ("tpe", "nsga2", "gp")
DEFAULT_BATCH = SEARCH_BATCH
DEFAULT_BUDGET = FLUENCY_BUDGET
#: The model identity keys a stored study must match (device may differ).
MODEL_KEYS = ("name", "architecture", "revision", "num_layers", "hidden_size", "dtype", "chat_template_sha256")
_SQLITE_MAGIC = b"SQLite format 3\x00"


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class StudyIdentity:
    """What a study was made for; stored as study user attributes and compared on resume."""

    model: dict[str, Any]
    vector: dict[str, Any]
    evaluation: dict[str, Any]  # held-out set hash/name, pairs, neutral texts hash, system

    def mismatch(self, stored: Mapping[str, Any]) -> str | None:
        """Why a stored study is not for this model / vector / held-out set (None when it is)."""
        sm = stored.get("model") or {}
        for key in MODEL_KEYS:
            if sm.get(key) != self.model.get(key):
                return (f"the study was made for model {sm.get('name')!r} ({key} {sm.get(key)!r}), "
                        f"not {self.model.get('name')!r} ({key} {self.model.get(key)!r})")
        sv = stored.get("vector") or {}
        if sv.get("directions_sha256") != self.vector.get("directions_sha256"):
            return (f"the study was made for another vector set ({sv.get('path') or 'directions '}"
                    f"{'' if sv.get('path') else str(sv.get('directions_sha256'))[:12]})")
        se = stored.get("evaluation") or {}
        for key, what in (("dataset_sha256", "held-out set"), ("max_pairs", "pair limit"),
                          ("neutral_sha256", "neutral texts"), ("system", "system message")):
            if se.get(key) != self.evaluation.get(key):
                return (f"the study was scored with another {what} "
                        f"({se.get('dataset_name') if key == 'dataset_sha256' else se.get(key)!r})")
        return None


def identity_for(lm: Any, vectors: Any, heldout: Dataset, *, neutral: Sequence[str], system: str | None,
                 max_pairs: int | None, vector_path: str | None = None) -> StudyIdentity:
    """The identity of a search of ``vectors`` on ``lm`` scored on ``heldout`` + ``neutral``."""
    return StudyIdentity(
        model=model_identity(lm),
        vector=vector_identity(vectors, vector_path),
        evaluation={"dataset_name": heldout.name, "dataset_sha256": heldout.sha256(), "max_pairs": max_pairs,
                    "neutral_sha256": _sha(list(neutral)), "n_neutral": len(neutral), "system": system},
    )


@dataclass(frozen=True)
class StoredStudy:
    """A steerdesk study as stored (read without writing)."""

    path: str
    attrs: dict[str, Any]
    trials: list[Any]  # optuna FrozenTrial

    @property
    def space(self) -> SearchSpace:
        return SearchSpace.from_dict(self.attrs.get("space") or {})

    @property
    def seed(self) -> int:
        return int(self.attrs.get("seed", 0))

    @property
    def sampler(self) -> str:
        return str(self.attrs.get("sampler", "tpe"))

    @property
    def fluency_budget(self) -> float:
        return float(self.attrs.get("fluency_budget", DEFAULT_BUDGET))

    @property
    def refine_from(self) -> int | None:
        """The number of evaluated trials after which the search refines
        (:mod:`steerdesk.core.search_refine`); None: no refine phase (also studies made before it existed)."""
        v = self.attrs.get("refine_from")
        return int(v) if isinstance(v, int) else None

    @property
    def refine(self) -> bool:
        return self.refine_from is not None


def _url(path: Path, readonly: bool = False) -> str:
    if readonly:  # SQLite URI: no write can happen, whatever the library tries
        return f"sqlite:///file:{path.resolve()}?mode=ro&uri=true"
    return f"sqlite:///{path.resolve()}"


def quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def read_study(path: str | Path) -> StoredStudy | None:
    """Read a study file without writing to it; None when the file does not exist.

    Raises a one-line ``SteerdeskError`` for a file that is unreadable, not SQLite, an SQLite
    database that is not an Optuna study, or an Optuna study file with no steerdesk search.
    """
    p = Path(path)
    if not p.exists():
        return None
    if p.is_dir():
        raise SteerdeskError(f"{p} is a folder, not a study file.")
    try:
        with open(p, "rb") as fh:
            head = fh.read(len(_SQLITE_MAGIC))
    except OSError as exc:
        raise SteerdeskError(f"Cannot read the study file {p}: {exc.strerror or exc}.") from None
    if head != _SQLITE_MAGIC:
        if not head:
            raise SteerdeskError(f"{p} is an empty file, not a study (remove it to start a new search).")
        raise SteerdeskError(f"{p} is not a study file (not an SQLite database).")
    try:
        con = sqlite3.connect(f"file:{p.resolve()}?mode=ro", uri=True)
        try:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise SteerdeskError(f"{p} is not a readable study file ({exc}).") from None
    if not {"studies", "trials", "version_info", "study_user_attributes"} <= tables:
        raise SteerdeskError(f"{p} is an SQLite database but not an Optuna study file.")
    quiet_optuna()
    import optuna

    try:
        storage = optuna.storages.RDBStorage(_url(p, readonly=True), skip_table_creation=True)
        try:
            names = [s.study_name for s in storage.get_all_studies()]
            if STUDY_NAME not in names:
                raise SteerdeskError(f"{p} holds Optuna studies ({', '.join(names) or 'none'}) but no steerdesk "
                                     f"search (study {STUDY_NAME!r}).")
            sid = storage.get_study_id_from_name(STUDY_NAME)
            attrs = dict(storage.get_study_user_attrs(sid))
            trials = storage.get_all_trials(sid, deepcopy=False)
        finally:
            storage.remove_session()
            storage.engine.dispose()
    except SteerdeskError:
        raise
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy / Optuna errors: an old schema, a damaged file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SteerdeskError(f"{p} is not a readable study file ({first[:160]}).") from None
    if attrs.get("format") != FORMAT:
        raise SteerdeskError(f"{p}: the study {STUDY_NAME!r} is not a steerdesk search "
                             f"(format {attrs.get('format')!r}, expected {FORMAT}).")
    return StoredStudy(path=str(p), attrs=attrs, trials=list(trials))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def state_name(trial: Any) -> str:
    from optuna.trial import TrialState

    attrs = trial.user_attrs
    if trial.state == TrialState.COMPLETE:
        return "complete"
    if trial.state == TrialState.FAIL:
        return "failed" if attrs.get("failed") else "interrupted"
    if trial.state == TrialState.WAITING:
        return "waiting"
    return "running" if trial.state == TrialState.RUNNING else str(trial.state.name).lower()


def is_evaluated(trial: Any) -> bool:
    """A trial the budget counts: scored (complete, or failed with a non-finite score)."""
    return state_name(trial) in ("complete", "failed")


def trial_results(stored_trials: Sequence[Any], space: SearchSpace, vectors: Any | None,
                  fluency_budget: float) -> list[TrialResult]:
    """:class:`TrialResult` of every stored trial (by number), with the Pareto front marked."""
    out = []
    for t in sorted(stored_trials, key=lambda t: t.number):
        state = state_name(t)
        values = t.values if state == "complete" and t.values else None
        settings = None
        if vectors is not None and t.params is not None:
            settings = settings_for(t.params, space, vectors)
        elif t.user_attrs.get("settings"):
            s = t.user_attrs["settings"]
            settings = TrialSettings(layers=tuple(s["layers"]), scale=float(s["scale"]), mode=str(s["mode"]),
                                     normalize=bool(s["normalize"]), positions=str(s.get("positions", "all")),
                                     searched_scale=float(s.get("searched_scale", s["scale"])))
        f = t.user_attrs.get("fluency_delta")
        r = TrialResult(number=t.number, state=state, params=dict(t.params or {}), settings=settings,
                        margin_delta=float(values[0]) if values else None, kl=float(values[1]) if values else None,
                        fluency_delta=float(f) if isinstance(f, (int, float)) else None,
                        retry_of=t.user_attrs.get("retry_of"),
                        phase=trial_phase(t.user_attrs))
        r.within_budget = (r.state == "complete" and r.fluency_delta is not None
                           and -r.fluency_delta <= fluency_budget)
        out.append(r)
    done = [r for r in out if r.state == "complete" and r.margin_delta is not None and r.kl is not None]
    for r, on in zip(done, pareto_mask([r.margin_delta for r in done], [r.kl for r in done])):  # type: ignore[misc]
        r.on_front = on
    return out


def make_sampler(name: str, seed: int, startup: int = DEFAULT_BATCH) -> Any:
    """A seeded Optuna multi-objective sampler that treats the fluency budget as a constraint.

    ``tpe``: ``TPESampler(multivariate=True, constant_liar=True, n_startup_trials=startup)`` (batch asks
    spread out; the search passes its batch size (at least 4), so only the first batch is random: with a budget
    of 25 Optuna's default of 10 random trials left too few guided ones);
    ``nsga2``: ``NSGAIISampler`` (population 50: random until then, so meant for long searches);
    ``gp``: ``GPSampler`` (Gaussian-process Bayesian optimisation, log-EHVI with the constraint; its
    multi-objective search measured no better than ``tpe`` on the bundled sets, docs/benchmarks.md).
    The constraint ``fluency loss - budget <= 0`` is set on each trial with
    ``Trial.set_constraint`` (Optuna 5), which every sampler here reads.
    """
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=startup)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup, deterministic_objective=True)
    raise SteerdeskError(f"Unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}.")


def batch_seed(seed: int, n_stored: int) -> int:
    """The sampler seed of a batch: a function of the study seed and how many trials are stored."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{n_stored}".encode()).digest()[:4], "little")


def open_for_search(path: str | Path, identity: StudyIdentity, *, space: SearchSpace | None, seed: int | None,
                    sampler: str | None, fluency_budget: float | None, default_space: SearchSpace,
                    refine: bool | None = None, refine_start: int = 0
                    ) -> tuple[Any, StoredStudy | None, SearchSpace, int, str, float, int | None]:
    """Validate (read-only), then open or create the study.

    Returns ``(study, stored or None, space, seed, sampler, budget, refine_from)``; the settings are the
    stored ones for an existing study (an explicitly given different value is an error), else the given
    ones or the defaults. ``refine_from``: a new study refines after ``refine_start`` evaluated trials
    unless ``refine`` is False (then None); an existing study keeps its stored value. Nothing is
    written before every check passed.
    """
    stored = read_study(path)
    if stored is not None:
        why = identity.mismatch(stored.attrs)
        if why:
            raise SteerdeskError(f"{path}: {why}; use another study file.")
        for name, given, have in (("search space", space, stored.space), ("seed", seed, stored.seed),
                                  ("sampler", sampler, stored.sampler),
                                  ("fluency budget", fluency_budget, stored.fluency_budget),
                                  ("refine phase", refine, stored.refine)):
            if given is not None and given != have:
                shown = (have.size_text() if isinstance(have, SearchSpace)
                         else ("on" if have else "off") if isinstance(have, bool) else have)
                raise SteerdeskError(f"{path}: the study was made with {name} {shown}; leave it out to resume, "
                                     "or use another study file.")
        space, seed, sampler, fluency_budget = stored.space, stored.seed, stored.sampler, stored.fluency_budget
        start_refine = stored.refine_from
    else:
        start_refine = None if refine is False else int(refine_start)
        space = space or default_space
        seed = 0 if seed is None else int(seed)
        sampler = sampler or "tpe"
        fluency_budget = DEFAULT_BUDGET if fluency_budget is None else float(fluency_budget)
        if sampler not in SAMPLERS:
            raise SteerdeskError(f"Unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}.")
        parent = Path(path).resolve().parent
        if not parent.is_dir():
            raise SteerdeskError(f"Cannot create the study {path}: folder {parent} does not exist.")
    if stored is not None:
        # A trial left RUNNING by a process that is still alive: another search is using the file.
        host = socket.gethostname()
        for t in stored.trials:
            if state_name(t) == "running":
                pid = t.user_attrs.get("pid")
                if (isinstance(pid, int) and pid != os.getpid() and t.user_attrs.get("host") == host
                        and _pid_alive(pid)):
                    raise SteerdeskError(f"{path}: another search (process {pid}) is running on this study.")
    quiet_optuna()
    import optuna

    try:
        storage = optuna.storages.RDBStorage(_url(Path(path)))
        study = optuna.create_study(storage=storage, study_name=STUDY_NAME, directions=["maximize", "minimize"],
                                    load_if_exists=True)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy / Optuna errors, reported as one line
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SteerdeskError(f"Cannot open the study {path} ({first[:160]}).") from None
    if stored is None:
        study.set_user_attr("format", FORMAT)
        study.set_user_attr("model", identity.model)
        study.set_user_attr("vector", identity.vector)
        study.set_user_attr("evaluation", identity.evaluation)
        study.set_user_attr("space", space.to_dict())
        study.set_user_attr("seed", seed)
        study.set_user_attr("sampler", sampler)
        study.set_user_attr("fluency_budget", fluency_budget)
        study.set_user_attr("refine_from", start_refine)
        study.set_user_attr("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return study, stored, space, seed, sampler, fluency_budget, start_refine


def close_study(study: Any) -> None:
    """Release the study's SQLite connections now, in this thread (not whenever it is collected)."""
    storage = getattr(study, "_storage", None)
    backend = getattr(storage, "_backend", storage)
    remove = getattr(backend, "remove_session", None)
    if callable(remove):
        remove()
    engine = getattr(backend, "engine", None)
    if engine is not None:
        engine.dispose()


def trial_phase(user_attrs: Mapping[str, Any]) -> str:
    """Which part of a search proposed a trial: ``start`` (the depth-spread first batch), ``refine``
    (:mod:`steerdesk.core.search_refine`) or ``search`` (the study's sampler)."""
    if user_attrs.get("start_point"):
        return "start"
    return "refine" if user_attrs.get("refine") is not None else "search"


def retry_attrs(trial: Any) -> dict[str, Any]:
    """User attributes of the retry of an interrupted trial: ``retry_of`` and its phase's attributes."""
    kept = {key: trial.user_attrs[key] for key in ("start_point", "refine") if key in trial.user_attrs}
    return {**kept, "retry_of": trial.number}


def recover_interrupted(study: Any) -> list[int]:
    """Mark trials left RUNNING by a dead process ``FAIL`` (``interrupted``) and enqueue their
    parameters again (``retry_of``). Returns the numbers of the trials marked."""
    from optuna.trial import TrialState

    marked = []
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        study.enqueue_trial(dict(t.params), user_attrs=retry_attrs(t), skip_if_exists=False)
        marked.append(t.number)
    return marked


__all__ = ["DEFAULT_BATCH", "DEFAULT_BUDGET", "FORMAT", "MODEL_KEYS", "SAMPLERS", "STUDY_NAME", "StoredStudy",
           "StudyIdentity", "batch_seed", "close_study", "identity_for", "is_evaluated",
           "make_sampler", "open_for_search", "quiet_optuna", "read_study", "recover_interrupted", "retry_attrs",
           "state_name", "trial_phase", "trial_results"]
