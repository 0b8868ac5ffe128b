"""A finished sweep: :class:`SweepResult` (cells, best cell, settings), its JSON file and text table.

Arrays are ``[row][scale]``; rows are the single layers, then the named layer sets. A cell is
``None`` where a score was not finite, and every cell of a row whose layer(s) the vector set has
no direction for is ``None`` too (``no_vector``): nothing was measured there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .defaults import FLUENCY_BUDGET
from .errors import SteerdeskError

FORMAT = "steerdesk.sweep/1"
DEFAULT_SCALES = (0.0, 0.5, 1.0, 2.0)
DEFAULT_BUDGET = FLUENCY_BUDGET


@dataclass
class SetRow:
    """A named multi-layer configuration: one extra heatmap row."""

    name: str
    layers: list[int]
    margin_delta: list[float | None] = field(default_factory=list)
    fluency_delta: list[float | None] = field(default_factory=list)
    kl: list[float | None] | None = None
    no_vector: bool = False  # the vector set lacks a direction for one of the layers: not evaluated


@dataclass
class SweepResult:
    """A finished sweep; arrays are ``[layer][scale]`` (``None`` where a score was not finite, or
    for every cell of a row whose layer the vector set has no direction for: ``no_vector[row]``)."""

    layers: list[int]
    scales: list[float]
    margin_delta: list[list[float | None]]
    fluency_delta: list[list[float | None]]
    kl: list[list[float | None]] | None
    sets: list[SetRow]
    baseline: dict[str, Any]
    fluency_budget: float
    best: dict[str, Any] | None
    settings: dict[str, Any]
    model: dict[str, Any]
    vector: dict[str, Any]
    dataset: dict[str, Any]
    steerdesk_version: str = ""
    created: str = ""
    seconds: float = 0.0
    path: str = "prefix"  # "prefix" (prefix reuse) or "full" (full forward passes)
    packed: bool = False  # steered forwards ran on packed layouts (texts sharing prompt tokens)
    no_vector: list[bool] = field(default_factory=list)  # per layer row: no direction, not evaluated
    gate: dict[str, Any] | None = None  # a condition gate's settings, per-prompt scores and decisions

    # -- cells -----------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        """Rows: single layers, then layer sets."""
        return len(self.layers) + len(self.sets)

    def row_label(self, row: int) -> str:
        """``layer N`` or the set's name."""
        return f"layer {self.layers[row]}" if row < len(self.layers) else self.sets[row - len(self.layers)].name

    def row_layers(self, row: int) -> list[int]:
        """The layers a row steers."""
        return [self.layers[row]] if row < len(self.layers) else list(self.sets[row - len(self.layers)].layers)

    def row_has_vector(self, row: int) -> bool:
        """False for a row whose layer(s) the vector set has no direction for (cells null, never 0)."""
        if row < len(self.layers):
            return not (row < len(self.no_vector) and self.no_vector[row])
        return not self.sets[row - len(self.layers)].no_vector

    def cell(self, row: int, col: int) -> tuple[float | None, float | None]:
        """``(margin_delta, fluency_delta)`` of a cell; rows are layers then sets."""
        if row < len(self.layers):
            return self.margin_delta[row][col], self.fluency_delta[row][col]
        s = self.sets[row - len(self.layers)]
        return s.margin_delta[col], s.fluency_delta[col]

    def within_budget(self, row: int, col: int) -> bool:
        """True when the cell's fluency loss is at most the budget."""
        _, fluency = self.cell(row, col)
        return fluency is not None and -fluency <= self.fluency_budget

    # -- files -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The result as the sweep file's JSON object (format ``steerdesk.sweep/1``)."""
        return {
            "format": FORMAT,
            "layers": self.layers,
            "scales": self.scales,
            "margin_delta": self.margin_delta,
            "fluency_delta": self.fluency_delta,
            "kl": self.kl,
            "no_vector": [not self.row_has_vector(r) for r in range(len(self.layers))],
            "sets": [{"name": s.name, "layers": s.layers, "margin_delta": s.margin_delta,
                      "fluency_delta": s.fluency_delta, "kl": s.kl, "no_vector": s.no_vector} for s in self.sets],
            "baseline": self.baseline,
            "fluency_budget": self.fluency_budget,
            "best": self.best,
            "settings": self.settings,
            "model": self.model,
            "vector": self.vector,
            "dataset": self.dataset,
            "steerdesk_version": self.steerdesk_version,
            "created": self.created,
            "seconds": self.seconds,
            "path": self.path,
            "packed": self.packed,
            **({"gate": self.gate} if self.gate is not None else {}),
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> SweepResult:
        """Read a sweep file's object; ``SteerdeskError`` for another format or a bad field."""
        if obj.get("format") != FORMAT:
            raise SteerdeskError(f"Not a steerdesk sweep (format {obj.get('format')!r}, expected {FORMAT}).")
        try:
            return cls(
                layers=[int(x) for x in obj["layers"]], scales=[float(x) for x in obj["scales"]],
                margin_delta=obj["margin_delta"], fluency_delta=obj["fluency_delta"], kl=obj.get("kl"),
                sets=[SetRow(s["name"], list(s["layers"]), s["margin_delta"], s["fluency_delta"], s.get("kl"),
                             bool(s.get("no_vector", False))) for s in obj.get("sets", [])],
                no_vector=[bool(x) for x in obj.get("no_vector") or []],
                baseline=dict(obj.get("baseline", {})), fluency_budget=float(obj["fluency_budget"]),
                best=obj.get("best"), settings=dict(obj.get("settings", {})), model=dict(obj.get("model", {})),
                vector=dict(obj.get("vector", {})), dataset=dict(obj.get("dataset", {})),
                steerdesk_version=str(obj.get("steerdesk_version", "")), created=str(obj.get("created", "")),
                seconds=float(obj.get("seconds", 0.0)), path=str(obj.get("path", "prefix")),
                packed=bool(obj.get("packed", False)),
                gate=dict(obj["gate"]) if obj.get("gate") is not None else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SteerdeskError(f"A sweep file is missing or has a bad field: {exc}.") from None

    def save(self, path: str | Path) -> None:
        """Write the result as JSON (atomic)."""
        from .fileio import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SweepResult:
        """Read a sweep file; ``SteerdeskError`` naming the file when it cannot be read."""
        try:
            obj = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SteerdeskError(f"Sweep file not found: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SteerdeskError(f"{path}: not a readable sweep file ({exc}).") from None
        return cls.from_dict(obj)


def pick_best(margin: Sequence[Sequence[float | None]], fluency: Sequence[Sequence[float | None]],
              budget: float) -> tuple[int, int] | None:
    """The (row, col) with the largest margin delta whose fluency loss is at most ``budget``."""
    best: tuple[int, int] | None = None
    best_value = -math.inf
    for r, (mrow, frow) in enumerate(zip(margin, fluency)):
        for c, (m, f) in enumerate(zip(mrow, frow)):
            if m is None or f is None or not math.isfinite(m) or not math.isfinite(f):
                continue
            if -f <= budget and m > best_value:
                best, best_value = (r, c), m
    return best


def format_table(result: SweepResult) -> str:
    """The margin deltas as text, one row per layer (set): ``*`` on the best cell, ``~`` beyond the
    fluency budget, ``nan`` for a cell whose score was not finite, and ``no vector`` across a row
    whose layer(s) the vector set has no direction for (never a number: nothing was measured)."""
    lines = ["margin delta (nats/token); '~' = fluency loss beyond the budget, '*' = best",
             f"{'':>10}" + "".join(f"{s:>10g}" for s in result.scales)]
    best = result.best or {}
    for r in range(result.n_rows):
        label = str(result.layers[r]) if r < len(result.layers) else result.sets[r - len(result.layers)].name
        if not result.row_has_vector(r):
            lines.append(f"{label[:10]:>10}" + f"{'no vector':>10}" + " " * (10 * (len(result.scales) - 1)))
            continue
        cells = []
        for c in range(len(result.scales)):
            m, _ = result.cell(r, c)
            mark = "*" if (best.get("row"), best.get("col")) == (r, c) else (
                " " if result.within_budget(r, c) else "~")
            cells.append(f"{'nan' if m is None else format(m, '+.3f'):>9}{mark}")
        lines.append(f"{label[:10]:>10}" + "".join(cells))
    if result.best:
        b = result.best
        where = f"layer {b['layer']}" if b["layer"] is not None else f"set {b['set']} {b['layers']}"
        lines.append(f"best: {where} x{b['scale']:g}: margin {b['margin_delta']:+.3f}, "
                     f"fluency {b['fluency_delta']:+.3f} (budget {result.fluency_budget:g})")
    else:
        lines.append(f"no cell within the fluency budget {result.fluency_budget:g}")
    if result.gate:
        g = result.gate
        lines.append(f"gate at layer {g.get('layer')} ({g.get('side')} {g.get('threshold')}): "
                     f"{g.get('n_open')} of {g.get('n_prompts')} prompts open; closed pairs scored unsteered")
    missing = [result.row_label(r) for r in range(result.n_rows) if not result.row_has_vector(r)]
    if missing:
        lines.append(f"no vector (not evaluated): {', '.join(missing)}")
    return "\n".join(lines)


__all__ = ["DEFAULT_BUDGET", "DEFAULT_SCALES", "FORMAT", "SetRow", "SweepResult", "format_table", "pick_best"]
