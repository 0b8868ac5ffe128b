"""Multi-objective search for steering settings, with Optuna, in a SQLite study (issue 16).

A **trial** is one steering configuration: a contiguous layer range ``start .. start + span - 1``
(clipped to the space's last layer), one scale, a mode (``add`` / ``clamp`` / ``project``) and
``normalize``. Its two **objectives**, from :mod:`steerdesk.core.evaluate` on held-out pairs and
neutral texts, are the behaviour **margin delta** (nats/token, maximised) and the **KL** to the
unsteered model on neutral text (nats/token, minimised). The fluency delta is kept with every
trial: the "best" trial is the largest margin delta whose fluency loss is within the budget (as
in :func:`steerdesk.core.sweep.pick_best`), and the budget is given to the sampler as an Optuna
constraint (``constraints_func``), so it steers toward feasible settings.

Optuna does the optimising (``TPESampler`` by default, ``NSGAIISampler`` on request, both
seeded); steerdesk does not write its own optimiser. Trials are proposed in batches with
``study.ask()`` (TPE with ``constant_liar``, so a batch spreads out) and a whole batch is scored by
**one** :meth:`steerdesk.core.evaluate.TextScorer.score` call: several configurations share every
forward pass (one batch row per configuration and text, per-row steering), and the tokenised texts
and the unsteered baseline (the KL reference) are computed once per run.

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
import hashlib
import io
import json
import logging
import math
import os
import socket
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .datasets import Dataset
from .errors import Cancelled, SteerdeskError
from .evaluate import NEUTRAL_TEXTS, Scores, TextScorer
from .identity import model_identity, vector_identity
from .layouts import prepare_texts
from .steering import MODES, POSITIONS, Steer

log = logging.getLogger(__name__)

FORMAT = "steerdesk.search/1"
STUDY_NAME = "steerdesk-search"
SAMPLERS = ("tpe", "nsga2")
DEFAULT_TRIALS = 25
DEFAULT_BATCH = 5
DEFAULT_MAX_SPAN = 4
DEFAULT_SCALE = (0.0, 2.0)
DEFAULT_BUDGET = 0.5
#: The model identity keys a stored study must match (device may differ).
MODEL_KEYS = ("name", "architecture", "revision", "num_layers", "hidden_size", "dtype", "chat_template_sha256")
_SQLITE_MAGIC = b"SQLite format 3\x00"

TrialCallback = Callable[["TrialResult"], None]


# ================================================================================== space

@dataclass(frozen=True)
class SearchSpace:
    """What a search may choose. Layers are 0-based block outputs (``core/steering.py``).

    ``first_layer .. last_layer`` (inclusive) bound every range; a range starts anywhere in
    them and spans ``1 .. max_span`` layers (clipped at ``last_layer``). ``scale`` is the
    continuous interval ``[scale_min, scale_max]`` (see "Scale units" in the module docstring);
    ``modes`` and ``normalize`` are the categorical choices. A dimension with one value is not
    searched (no Optuna parameter).
    """

    first_layer: int
    last_layer: int
    max_span: int = DEFAULT_MAX_SPAN
    scale_min: float = DEFAULT_SCALE[0]
    scale_max: float = DEFAULT_SCALE[1]
    modes: tuple[str, ...] = ("add", "clamp", "project")
    normalize: tuple[bool, ...] = (False, True)
    positions: str = "all"

    @classmethod
    def default(cls, vectors: Any, num_layers: int) -> SearchSpace:
        """The longest run of consecutive layers the vector set has a direction for, spans up to
        :data:`DEFAULT_MAX_SPAN`, scales 0..2, every mode, with and without normalisation."""
        have = [layer for layer in range(min(num_layers, _num_vector_layers(vectors)))
                if _has_direction(vectors, layer)]
        if not have:
            raise SteerdeskError("The vector set has no direction for any layer: nothing to search.")
        runs: list[list[int]] = [[have[0]]]
        for layer in have[1:]:
            if layer == runs[-1][-1] + 1:
                runs[-1].append(layer)
            else:
                runs.append([layer])
        run = max(runs, key=len)
        return cls(first_layer=run[0], last_layer=run[-1], max_span=min(DEFAULT_MAX_SPAN, len(run)))

    @classmethod
    def parse(cls, text: str, base: SearchSpace) -> SearchSpace:
        """Override fields of ``base`` from ``"layers=4-25;span=3;scale=0..2;modes=add,clamp;normalize=no"``.

        Keys: ``layers`` (``A-B``), ``span`` (maximum span), ``scale`` (``LO..HI`` or one value),
        ``modes`` (comma list), ``normalize`` (``no``, ``yes`` or ``both``), ``positions``.
        Raises ``SteerdeskError`` for anything unreadable.
        """
        out = base
        for part in str(text).split(";"):
            if not part.strip():
                continue
            if "=" not in part:
                raise SteerdeskError(f"Cannot read search space part {part.strip()!r}: use KEY=VALUE, "
                                     "e.g. layers=4-20;span=3;scale=0..2;modes=add,clamp;normalize=both.")
            key, value = (s.strip() for s in part.split("=", 1))
            try:
                if key == "layers":
                    a, b = value.split("-", 1) if "-" in value else (value, value)
                    out = replace(out, first_layer=int(a), last_layer=int(b))
                elif key == "span":
                    out = replace(out, max_span=int(value))
                elif key == "scale":
                    lo, hi = value.split("..", 1) if ".." in value else (value, value)
                    out = replace(out, scale_min=float(lo), scale_max=float(hi))
                elif key == "modes":
                    out = replace(out, modes=tuple(m.strip() for m in value.split(",") if m.strip()))
                elif key == "normalize":
                    choice = {"no": (False,), "false": (False,), "yes": (True,), "true": (True,),
                              "both": (False, True)}.get(value.lower())
                    if choice is None:
                        raise ValueError(value)
                    out = replace(out, normalize=choice)
                elif key == "positions":
                    out = replace(out, positions=value)
                else:
                    raise SteerdeskError(f"Unknown search space key {key!r}; use layers, span, scale, modes, "
                                         "normalize or positions.")
            except ValueError:
                raise SteerdeskError(f"Cannot read search space value {key}={value!r}.") from None
        return out

    def check(self, vectors: Any, num_layers: int) -> None:
        """Raise a one-line ``SteerdeskError`` for an empty or impossible space."""
        if self.last_layer < self.first_layer:
            raise SteerdeskError(f"The search space is empty: layers {self.first_layer}-{self.last_layer} "
                                 "is backwards.")
        if not (0 <= self.first_layer and self.last_layer < num_layers):
            raise SteerdeskError(f"Search layers {self.first_layer}-{self.last_layer} are out of range: "
                                 f"the model has layers 0-{num_layers - 1}.")
        if self.max_span < 1:
            raise SteerdeskError("The search space is empty: the span must be at least 1 layer.")
        if not (math.isfinite(self.scale_min) and math.isfinite(self.scale_max)):
            raise SteerdeskError("The search scales must be finite numbers.")
        if self.scale_max < self.scale_min:
            raise SteerdeskError(f"The search space is empty: scale {self.scale_min:g}..{self.scale_max:g} "
                                 "is backwards.")
        if not self.modes:
            raise SteerdeskError("The search space is empty: no steering mode.")
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise SteerdeskError(f"Unknown steering mode {bad[0]!r}; use {', '.join(MODES)}.")
        if not self.normalize:
            raise SteerdeskError("The search space is empty: no normalize choice.")
        if self.positions not in POSITIONS:
            raise SteerdeskError(f"Unknown positions {self.positions!r}; use one of {', '.join(POSITIONS)}.")
        if self.scale_min == self.scale_max == 0 and set(self.modes) <= {"add", "project"}:
            raise SteerdeskError("The search space is empty: scale 0 in add/project mode changes nothing.")
        missing = [layer for layer in range(self.first_layer, self.last_layer + 1)
                   if not _has_direction(vectors, layer)]
        if missing:
            raise SteerdeskError(f"The vector set has no direction for layer{'s' if len(missing) > 1 else ''} "
                                 f"{', '.join(map(str, missing[:8]))}: choose search layers it covers.")

    def distributions(self) -> dict[str, Any]:
        """Optuna distributions of the searched dimensions (name -> distribution)."""
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        out: dict[str, Any] = {}
        if self.last_layer > self.first_layer:
            out["start"] = IntDistribution(self.first_layer, self.last_layer)
        if self.max_span > 1:
            out["span"] = IntDistribution(1, self.max_span)
        if self.scale_max > self.scale_min:
            out["scale"] = FloatDistribution(self.scale_min, self.scale_max)
        if len(self.modes) > 1:
            out["mode"] = CategoricalDistribution(list(self.modes))
        if len(self.normalize) > 1:
            out["normalize"] = CategoricalDistribution(list(self.normalize))
        return out

    def size_text(self) -> str:
        """A short description, e.g. ``layers 0-29, span 1-4, scale 0..2, add/clamp/project, normalize no/yes``."""
        norm = "/".join("yes" if n else "no" for n in self.normalize)
        return (f"layers {self.first_layer}-{self.last_layer}, span 1-{self.max_span}, "
                f"scale {self.scale_min:g}..{self.scale_max:g}, {'/'.join(self.modes)}, normalize {norm}"
                + (f", positions {self.positions}" if self.positions != "all" else ""))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["modes"] = list(self.modes)
        d["normalize"] = list(self.normalize)
        return d

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> SearchSpace:
        try:
            return cls(first_layer=int(obj["first_layer"]), last_layer=int(obj["last_layer"]),
                       max_span=int(obj["max_span"]), scale_min=float(obj["scale_min"]),
                       scale_max=float(obj["scale_max"]), modes=tuple(str(m) for m in obj["modes"]),
                       normalize=tuple(bool(n) for n in obj["normalize"]), positions=str(obj.get("positions", "all")))
        except (KeyError, TypeError, ValueError) as exc:
            raise SteerdeskError(f"The study's search space is unreadable ({exc}).") from None


def _num_vector_layers(vectors: Any) -> int:
    d = getattr(vectors, "directions", vectors)
    return int(d.shape[0])


def _has_direction(vectors: Any, layer: int) -> bool:
    ask = getattr(vectors, "has_direction", None)
    if callable(ask):
        return bool(ask(layer))
    d = getattr(vectors, "directions", vectors)
    return 0 <= layer < d.shape[0] and bool(d[layer].ne(0).any())


# ================================================================================ trials

@dataclass(frozen=True)
class TrialSettings:
    """The steering a trial applies: the same settings at each layer of ``layers``.

    ``scale`` is the scale applied (what :class:`~steerdesk.core.steering.Steer` gets);
    ``searched_scale`` is the sampled value (equal unless ``normalize``, see the module docstring).
    """

    layers: tuple[int, ...]
    scale: float
    mode: str
    normalize: bool
    positions: str = "all"
    searched_scale: float = 0.0

    def steers(self, vectors: Any) -> list[Steer]:
        """One :class:`Steer` per layer (directions from a VectorSet or a ``[layers, hidden]`` tensor)."""
        d = getattr(vectors, "directions", vectors)
        return [Steer(layer=layer, vector=d[layer], scale=self.scale, mode=self.mode, normalize=self.normalize,
                      positions=self.positions) for layer in self.layers]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (what the window's generation pane and a recipe need)."""
        return {"layers": list(self.layers), "scale": self.scale, "mode": self.mode, "normalize": self.normalize,
                "positions": self.positions, "searched_scale": self.searched_scale}

    def label(self) -> str:
        lo, hi = self.layers[0], self.layers[-1]
        where = f"L{lo}" if lo == hi else f"L{lo}-{hi}"
        return f"{where} x{self.scale:.3g} {self.mode}{' norm' if self.normalize else ''}"


def settings_for(params: Mapping[str, Any], space: SearchSpace, vectors: Any) -> TrialSettings:
    """Turn a trial's Optuna parameters into steering settings (unsearched dimensions from ``space``)."""
    start = int(params.get("start", space.first_layer))
    span = int(params.get("span", space.max_span))  # not searched only when max_span is 1
    end = min(start + span - 1, space.last_layer)
    layers = tuple(range(start, end + 1))
    searched = float(params.get("scale", space.scale_min))
    mode = str(params.get("mode", space.modes[0]))
    normalize = bool(params.get("normalize", space.normalize[0]))
    scale = searched
    if normalize and mode != "project":
        d = getattr(vectors, "directions", vectors)
        scale = searched * float(torch.stack([d[layer].float().norm() for layer in layers]).mean())
    return TrialSettings(layers=layers, scale=scale, mode=mode, normalize=normalize, positions=space.positions,
                         searched_scale=searched)


@dataclass
class TrialResult:
    """One evaluated (or failed) trial of a study. Scores are deltas versus unsteered (nats/token)."""

    number: int
    state: str  # "complete", "failed" (non-finite score), "interrupted", "running", "waiting"
    params: dict[str, Any]
    settings: TrialSettings | None
    margin_delta: float | None = None
    kl: float | None = None
    fluency_delta: float | None = None
    on_front: bool = False
    within_budget: bool = False
    retry_of: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "state": self.state, "params": self.params,
                "settings": self.settings.to_dict() if self.settings else None,
                "margin_delta": _finite(self.margin_delta), "kl": _finite(self.kl),
                "fluency_delta": _finite(self.fluency_delta), "pareto": self.on_front,
                "within_budget": self.within_budget, "retry_of": self.retry_of}


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def pareto_mask(margins: Sequence[float], kls: Sequence[float]) -> list[bool]:
    """Which points are not dominated (margin maximised, KL minimised).

    A point dominates another when its margin is >= and its KL <= with one of them strict.
    Non-finite points are never on the front. O(n^2); a study holds at most a few thousand trials.
    """
    pts = [(m, k) for m, k in zip(margins, kls)]
    ok = [math.isfinite(m) and math.isfinite(k) for m, k in pts]
    out = []
    for i, (m, k) in enumerate(pts):
        if not ok[i]:
            out.append(False)
            continue
        dominated = any(ok[j] and m2 >= m and k2 <= k and (m2 > m or k2 < k)
                        for j, (m2, k2) in enumerate(pts) if j != i)
        out.append(not dominated)
    return out


def best_within_budget(trials: Sequence[TrialResult], budget: float) -> TrialResult | None:
    """The complete trial with the largest margin delta whose fluency loss is at most ``budget``
    (ties: the lower KL), as :func:`steerdesk.core.sweep.pick_best` picks a sweep cell."""
    best: TrialResult | None = None
    for t in trials:
        if t.state != "complete" or t.margin_delta is None or t.fluency_delta is None:
            continue
        if not (math.isfinite(t.margin_delta) and math.isfinite(t.fluency_delta)) or -t.fluency_delta > budget:
            continue
        if best is None or t.margin_delta > best.margin_delta or (  # type: ignore[operator]
                t.margin_delta == best.margin_delta and (t.kl or 0.0) < (best.kl or 0.0)):
            best = t
    return best


# ============================================================================ the study

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


def _url(path: Path, readonly: bool = False) -> str:
    if readonly:  # SQLite URI: no write can happen, whatever the library tries
        return f"sqlite:///file:{path.resolve()}?mode=ro&uri=true"
    return f"sqlite:///{path.resolve()}"


def _quiet_optuna() -> None:
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
    _quiet_optuna()
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


def _state_name(trial: Any) -> str:
    from optuna.trial import TrialState

    attrs = trial.user_attrs
    if trial.state == TrialState.COMPLETE:
        return "complete"
    if trial.state == TrialState.FAIL:
        return "failed" if attrs.get("failed") else "interrupted"
    if trial.state == TrialState.WAITING:
        return "waiting"
    return "running" if trial.state == TrialState.RUNNING else str(trial.state.name).lower()


def _evaluated(trial: Any) -> bool:
    """A trial the budget counts: scored (complete, or failed with a non-finite score)."""
    return _state_name(trial) in ("complete", "failed")


def trial_results(stored_trials: Sequence[Any], space: SearchSpace, vectors: Any | None,
                  fluency_budget: float) -> list[TrialResult]:
    """:class:`TrialResult` of every stored trial (by number), with the Pareto front marked."""
    out = []
    for t in sorted(stored_trials, key=lambda t: t.number):
        state = _state_name(t)
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
                        retry_of=t.user_attrs.get("retry_of"))
        r.within_budget = (r.state == "complete" and r.fluency_delta is not None
                           and -r.fluency_delta <= fluency_budget)
        out.append(r)
    done = [r for r in out if r.state == "complete" and r.margin_delta is not None and r.kl is not None]
    for r, on in zip(done, pareto_mask([r.margin_delta for r in done], [r.kl for r in done])):  # type: ignore[misc]
        r.on_front = on
    return out


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
                "stopped": self.stopped, "created": self.created,
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
                 f"space: {self.space.size_text()}; sampler {self.sampler}, seed {self.seed}"]
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
                        created=str(a.get("created", "")))


# ================================================================================ engine

def make_sampler(name: str, seed: int, fluency_budget: float, startup: int = DEFAULT_BATCH) -> Any:
    """A seeded Optuna multi-objective sampler that treats the fluency budget as a constraint.

    ``tpe``: ``TPESampler(multivariate=True, constant_liar=True, n_startup_trials=startup)`` (batch asks
    spread out; the search passes its batch size (at least 4), so only the first batch is random: with a budget
    of 25 Optuna's default of 10 random trials left too few guided ones);
    ``nsga2``: ``NSGAIISampler`` (population 50: random until then, so meant for long searches).
    The constraint ``fluency loss - budget <= 0`` is set on each trial with
    ``Trial.set_constraint`` (Optuna 5); Optuna 4 gets it through ``constraints_func``.
    """
    import optuna

    kwargs: dict[str, Any] = {}
    if not _HAS_SET_CONSTRAINT():
        def constraints(trial: Any) -> list[float]:
            f = trial.user_attrs.get("fluency_delta")
            return [(-float(f) - fluency_budget) if isinstance(f, (int, float)) and math.isfinite(f) else 1.0]
        kwargs["constraints_func"] = constraints
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                          n_startup_trials=startup, **kwargs)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, **kwargs)
    raise SteerdeskError(f"Unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}.")


def _HAS_SET_CONSTRAINT() -> bool:
    import optuna

    return hasattr(optuna.trial.Trial, "set_constraint")


def batch_seed(seed: int, n_stored: int) -> int:
    """The sampler seed of a batch: a function of the study seed and how many trials are stored."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{n_stored}".encode()).digest()[:4], "little")


@dataclass
class Evaluator:
    """Scores batches of trial settings on one set of texts (the unsteered baseline computed once)."""

    lm: Any
    vectors: Any
    scorer: TextScorer
    base: Scores

    @classmethod
    def prepare(cls, lm: Any, vectors: Any, heldout: Dataset, *, neutral: Sequence[str], system: str | None = None,
                max_pairs: int | None = None, batch_size: int = 16, max_rows: int = 64,
                cancel: threading.Event | None = None) -> Evaluator:
        """Tokenise ``heldout`` + ``neutral`` and score the unsteered model (the KL reference)."""
        if not neutral:
            raise SteerdeskError("A search needs neutral texts for its KL objective.")
        texts = prepare_texts(lm, heldout, neutral=neutral, system=system, max_pairs=max_pairs)
        scorer = TextScorer(lm, texts, batch_size=batch_size, max_rows=max_rows)
        base = scorer.baseline(cancel)
        return cls(lm, vectors, scorer, base)

    def score(self, batch: Sequence[TrialSettings], cancel: threading.Event | None = None
              ) -> list[tuple[float, float, float]]:
        """``(margin delta, KL, fluency delta)`` per settings, from **one** ``TextScorer.score`` call."""
        configs = [s.steers(self.vectors) for s in batch]
        info = self.lm.info
        for cfg in configs:
            for st in cfg:
                st.check(info.num_layers, info.hidden_size)
        scores = self.scorer.score(configs, cancel=cancel)
        return [(s.margin - self.base.margin, s.kl if s.kl is not None else math.nan, s.fluency - self.base.fluency)
                for s in scores]


def open_for_search(path: str | Path, identity: StudyIdentity, *, space: SearchSpace | None, seed: int | None,
                    sampler: str | None, fluency_budget: float | None, default_space: SearchSpace
                    ) -> tuple[Any, StoredStudy | None, SearchSpace, int, str, float]:
    """Validate (read-only), then open or create the study.

    Returns ``(study, stored or None, space, seed, sampler, budget)``; the settings are the stored
    ones for an existing study (an explicitly given different value is an error), else the given
    ones or the defaults. Nothing is written before every check passed.
    """
    stored = read_study(path)
    if stored is not None:
        why = identity.mismatch(stored.attrs)
        if why:
            raise SteerdeskError(f"{path}: {why}; use another study file.")
        for name, given, have in (("search space", space, stored.space), ("seed", seed, stored.seed),
                                  ("sampler", sampler, stored.sampler),
                                  ("fluency budget", fluency_budget, stored.fluency_budget)):
            if given is not None and given != have:
                shown = have.size_text() if isinstance(have, SearchSpace) else have
                raise SteerdeskError(f"{path}: the study was made with {name} {shown}; leave it out to resume, "
                                     "or use another study file.")
        space, seed, sampler, fluency_budget = stored.space, stored.seed, stored.sampler, stored.fluency_budget
    else:
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
            if _state_name(t) == "running":
                pid = t.user_attrs.get("pid")
                if (isinstance(pid, int) and pid != os.getpid() and t.user_attrs.get("host") == host
                        and _pid_alive(pid)):
                    raise SteerdeskError(f"{path}: another search (process {pid}) is running on this study.")
    _quiet_optuna()
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
        study.set_user_attr("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return study, stored, space, seed, sampler, fluency_budget


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


def recover_interrupted(study: Any) -> list[int]:
    """Mark trials left RUNNING by a dead process ``FAIL`` (``interrupted``) and enqueue their
    parameters again (``retry_of``). Returns the numbers of the trials marked."""
    from optuna.trial import TrialState

    marked = []
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number}, skip_if_exists=False)
        marked.append(t.number)
    return marked


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
    Raises a one-line ``SteerdeskError`` for bad input, before the study file is touched.
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
    study, _stored, space, seed, sampler, fluency_budget = open_for_search(
        study_path, identity, space=space, seed=seed, sampler=sampler, fluency_budget=fluency_budget,
        default_space=default_space)
    assert space is not None and seed is not None and sampler is not None and fluency_budget is not None
    try:
        space.check(vectors, info.num_layers)
        recovered = recover_interrupted(study)
        if recovered:
            log.info("trials %s were interrupted; retrying them", recovered)
        dists = space.distributions()

        def n_evaluated() -> int:
            return sum(1 for t in study.get_trials(deepcopy=False) if _evaluated(t))

        before = n_evaluated()
        done_now = 0
        batches = 0
        stopped = False
        evaluator: Evaluator | None = None
        host, pid = socket.gethostname(), os.getpid()
        if progress:
            progress(min(before, trials), trials)
        while n_evaluated() < trials:
            if cancel is not None and cancel.is_set():
                stopped = True
                break
            if evaluator is None:
                evaluator = Evaluator.prepare(lm, vectors, heldout, neutral=neutral, system=system, max_pairs=max_pairs,
                                              batch_size=batch_size, max_rows=max_rows, cancel=cancel)
                study.set_user_attr("baseline", {"margin": evaluator.base.margin, "fluency": evaluator.base.fluency})
            k = min(batch, trials - n_evaluated())
            n_stored = len(study.get_trials(deepcopy=False))
            study.sampler = make_sampler(sampler, batch_seed(seed, n_stored), fluency_budget, startup=max(batch, 4))
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
                    study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number}, skip_if_exists=False)
                stopped = True
                break
            batches += 1
            from optuna.trial import TrialState

            for t, s, (m, kl, f) in zip(asked, settings, scored):
                t.set_user_attr("fluency_delta", f if math.isfinite(f) else None)
                t.set_user_attr("settings", s.to_dict())
                if math.isfinite(m) and math.isfinite(kl) and math.isfinite(f):
                    if _HAS_SET_CONSTRAINT():
                        t.set_constraint("fluency", -f - fluency_budget)
                    study.tell(t, [m, kl])
                else:
                    t.set_user_attr("failed", "non-finite score (the steering blew the model up)")
                    study.tell(t, state=TrialState.FAIL)
                done_now += 1
                if on_trial is not None:
                    r = TrialResult(number=t.number, state="complete" if math.isfinite(m + kl + f) else "failed",
                                    params=dict(t.params), settings=s, margin_delta=m, kl=kl, fluency_delta=f,
                                    retry_of=t.user_attrs.get("retry_of"))
                    r.within_budget = r.state == "complete" and -f <= fluency_budget
                    on_trial(r)
            if progress:
                progress(min(n_evaluated(), trials), trials)
        all_trials = trial_results(study.get_trials(deepcopy=False), space, vectors, fluency_budget)
        attrs = study.user_attrs
    finally:
        close_study(study)
    return SearchResult(study=str(study_path), trials=all_trials, space=space, seed=seed, sampler=sampler,
                        fluency_budget=fluency_budget, model=identity.model, vector=identity.vector,
                        evaluation=identity.evaluation, baseline=dict(attrs.get("baseline") or {}),
                        evaluated_before=before, evaluated_now=done_now, batches=batches,
                        seconds=round(time.perf_counter() - t0, 3), stopped=stopped,
                        created=str(attrs.get("created", "")))


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
    meta["steering_settings"] = json.dumps({**trial.settings.to_dict(), "margin_delta": _finite(trial.margin_delta),
                                            "kl": _finite(trial.kl), "fluency_delta": _finite(trial.fluency_delta),
                                            "source": "search", "study": study, "trial": trial.number})
    out = replace(vectors, metadata=meta)
    if str(path).lower().endswith(".gguf"):
        export_gguf(out, path)
    else:
        save_vectors(out, path)


__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_BUDGET",
    "DEFAULT_TRIALS",
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
    "close_study",
    "best_within_budget",
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
    "trial_results",
]
