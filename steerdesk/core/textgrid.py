"""Generation sweep: layers x scales x prompts of generated text, batched per row."""

from __future__ import annotations

import csv
import io
import json
import re
import threading
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

from .errors import Cancelled, SteerdeskError
from .generate import SamplingSettings, generate
from .steering import Steer


@dataclass
class GridRow:
    """One generated text of the grid."""

    layer: int | None  # None: the unsteered reference
    scale: float
    prompt: str
    text: str
    matches: int | None = None


def compile_pattern(pattern: str | None, regex: bool = False) -> re.Pattern[str] | None:
    """A keyword list (comma-separated, whole words, case-insensitive) or a regular expression."""
    if not pattern or not pattern.strip():
        return None
    try:
        if regex:
            return re.compile(pattern, re.IGNORECASE)
        words = [re.escape(w.strip()) for w in pattern.split(",") if w.strip()]
        return re.compile(r"\b(?:" + "|".join(words) + r")\b", re.IGNORECASE)
    except re.error as exc:
        raise SteerdeskError(f"Bad regular expression {pattern!r}: {exc}.") from None


def generation_grid(
    lm: Any,
    directions: torch.Tensor,
    layers: Sequence[int],
    scales: Sequence[float],
    prompts: Sequence[str],
    *,
    mode: str = "add",
    normalize: bool = False,
    sampling: SamplingSettings | None = None,
    pattern: re.Pattern[str] | None = None,
    batch_rows: int = 16,
    include_unsteered: bool = True,
    on_row: Callable[[GridRow], None] | None = None,
    cancel: threading.Event | None = None,
) -> list[GridRow]:
    """Generate every (layer, scale, prompt) combination, ``batch_rows`` rows per batched pass.

    Each batch row carries its own steering, so a batch mixes layers and scales. Rows come
    back in grid order (unsteered references first).
    """
    if not prompts:
        raise SteerdeskError("Give at least one prompt.")
    cells: list[tuple[int | None, float, str]] = []
    if include_unsteered:
        cells += [(None, 0.0, p) for p in prompts]
    cells += [(layer, float(scale), p) for layer in layers for scale in scales for p in prompts]
    out: list[GridRow] = []
    for start in range(0, len(cells), batch_rows):
        if cancel is not None and cancel.is_set():
            raise Cancelled("Generation sweep cancelled.")
        chunk = cells[start:start + batch_rows]
        rows = [[] if layer is None else [Steer(layer, directions[layer], scale, mode, normalize)]
                for layer, scale, _ in chunk]
        results = generate(lm, [p for _, _, p in chunk], rows, sampling=sampling, stop=cancel)
        for (layer, scale, prompt), res in zip(chunk, results):
            row = GridRow(layer, scale, prompt, res.text,
                          len(pattern.findall(res.text)) if pattern is not None else None)
            out.append(row)
            if on_row is not None:
                on_row(row)
    return out


def grid_to_csv(rows: Sequence[GridRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["layer", "scale", "prompt", "text", "matches"])
    for r in rows:
        w.writerow(["" if r.layer is None else r.layer, r.scale, r.prompt, r.text,
                    "" if r.matches is None else r.matches])
    return buf.getvalue()


def grid_to_json(rows: Sequence[GridRow]) -> str:
    return json.dumps([asdict(r) for r in rows], ensure_ascii=False, indent=1)
