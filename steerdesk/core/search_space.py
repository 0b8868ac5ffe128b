"""The search space of a steering search and what a trial is (issue 16; engine: :mod:`steerdesk.core.search`).

:class:`SearchSpace` (what may be chosen, parsed from ``layers=4-25;span=3;scale=0..2;...``),
:class:`TrialSettings` (the steering a trial applies) and :func:`settings_for` (Optuna parameters ->
settings, with the scale units of the module docstring of :mod:`steerdesk.core.search`),
:class:`TrialResult` and the Pareto helpers :func:`pareto_mask` and :func:`best_within_budget`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from .errors import SteerdeskError
from .steering import MODES, POSITIONS, Steer

DEFAULT_MAX_SPAN = 4
DEFAULT_SCALE = (0.0, 2.0)


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
        have = [layer for layer in range(min(num_layers, num_vector_layers(vectors)))
                if has_direction(vectors, layer)]
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
                   if not has_direction(vectors, layer)]
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


def num_vector_layers(vectors: Any) -> int:
    d = getattr(vectors, "directions", vectors)
    return int(d.shape[0])


def has_direction(vectors: Any, layer: int) -> bool:
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


def start_points(space: SearchSpace, k: int) -> list[dict[str, Any]]:
    """The default first batch of a fresh study: ``k`` single layers spread evenly over the space's
    depth, at the middle of the scale range, ``add`` without normalisation (where the space allows).

    Layer ``i`` of ``k`` is ``first_layer + floor((i + 0.5) * n / k)`` for ``n`` layers in the space
    (30 layers, ``k = 5``: layers 3, 9, 15, 21, 27), duplicates dropped. Returns Optuna parameter
    dicts holding only the searched dimensions (:meth:`SearchSpace.distributions`), ready for
    ``study.enqueue_trial``. Reason (docs/decisions.md, "Search (issue 16)"): one-layer ``add`` at a
    middle scale is what the grid enumerates, and a spread over depth gives TPE a scored point in each
    part of the network before it models where margin and fluency trade; an empty list for ``k < 1``.
    """
    dists = space.distributions()
    n = space.last_layer - space.first_layer + 1
    mid = (space.scale_min + space.scale_max) / 2
    mode = "add" if "add" in space.modes else space.modes[0]
    normalize = False if False in space.normalize else space.normalize[0]
    out: list[dict[str, Any]] = []
    seen: set[int] = set()
    for i in range(max(k, 0)):
        layer = space.first_layer + int((i + 0.5) * n / k)
        if layer in seen:
            continue
        seen.add(layer)
        params = {"start": layer, "span": 1, "scale": mid, "mode": mode, "normalize": normalize}
        out.append({key: value for key, value in params.items() if key in dists})
    return out


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
    phase: str = "search"  # "start" (the depth-spread first batch), "search" (the sampler), "refine"

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "state": self.state, "phase": self.phase, "params": self.params,
                "settings": self.settings.to_dict() if self.settings else None,
                "margin_delta": finite_or_none(self.margin_delta), "kl": finite_or_none(self.kl),
                "fluency_delta": finite_or_none(self.fluency_delta), "pareto": self.on_front,
                "within_budget": self.within_budget, "retry_of": self.retry_of}


def finite_or_none(x: float | None) -> float | None:
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


__all__ = ["DEFAULT_MAX_SPAN", "DEFAULT_SCALE", "SearchSpace", "TrialResult", "TrialSettings", "best_within_budget",
           "finite_or_none", "has_direction", "num_vector_layers", "pareto_mask", "settings_for", "start_points"]
