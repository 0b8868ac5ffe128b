"""Generation sweep: layers x scales x prompts of generated text, batched per row."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from .errors import Cancelled, SteerdeskError
from .generate import SamplingSettings, generate
from .models import LoadedModel
from .parsing import check_layers, parse_positions
from .steering import Steer
from .vectors import VectorSet

if TYPE_CHECKING:
    from .condition import ConditionGate


@dataclass
class GridRow:
    """One generated text of the grid."""

    layer: int | None  # None: the unsteered reference
    scale: float
    prompt: str
    text: str | None  # None: not generated, the vector set has no direction for ``layer``
    matches: int | None = None
    no_vector: bool = False
    gate_open: bool | None = None  # with a condition gate: did the prompt open it (None: no gate, or unsteered)
    token_ids: list[int] | None = None  # the generated tokens (None: not generated)


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
    lm: LoadedModel,
    vectors: VectorSet | torch.Tensor,
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
    positions: str = "all",
    gate: ConditionGate | None = None,
) -> list[GridRow]:
    """Generate every (layer, scale, prompt) combination, ``batch_rows`` rows per batched pass.

    Each batch row carries its own steering, so a batch mixes layers and scales. Rows come
    back in grid order (unsteered references first). ``vectors`` is a :class:`VectorSet` or a
    ``[num_layers, hidden]`` tensor (all-zero rows = no direction). Cells at a layer the set
    has no direction for are not generated: ``text`` is ``None`` and ``no_vector`` is True
    (never an unsteered text passed off as a steered one).

    ``positions`` (a named position or a token window, :func:`~steerdesk.core.parsing.parse_positions`)
    and ``gate`` (:class:`~steerdesk.core.condition.ConditionGate`) are passed to
    :func:`~steerdesk.core.generate.generate` as they are: a steered row is what ``generate`` gives
    for its prompt with that steering, window and gate (``gate_open`` records the decision; a closed
    row is the unsteered text). Raises ``SteerdeskError`` for unreadable positions, a gate that does
    not fit the model, or no prompt.
    """
    positions = str(positions).replace(" ", "")
    parse_positions(positions)
    if gate is not None:
        gate.check(lm)
    vs = vectors if isinstance(vectors, VectorSet) else VectorSet(vectors, torch.full((vectors.shape[0],), math.nan))
    check_layers(layers, vs.num_layers, of="vectors")
    absent = set(vs.layers_without_direction(layers))
    if not prompts:
        raise SteerdeskError("Give at least one prompt.")
    cells: list[tuple[int | None, float, str]] = []
    if include_unsteered:
        cells += [(None, 0.0, p) for p in prompts]
    cells += [(layer, float(scale), p) for layer in layers for scale in scales for p in prompts]
    todo = [i for i, c in enumerate(cells) if c[0] not in absent]
    done: dict[int, GridRow] = {}  # index in ``cells`` -> row
    for i, (layer, scale, prompt) in enumerate(cells):
        if layer in absent:
            done[i] = GridRow(layer, scale, prompt, None, None, no_vector=True)
    emitted = 0

    def flush() -> None:
        nonlocal emitted
        while emitted in done:
            if on_row is not None:
                on_row(done[emitted])
            emitted += 1

    flush()
    for start in range(0, len(todo), batch_rows):
        if cancel is not None and cancel.is_set():
            raise Cancelled("Generation sweep cancelled.")
        chunk = todo[start:start + batch_rows]
        rows = [[] if layer is None else [Steer(layer, vs.directions[layer], scale, mode, normalize, positions)]
                for layer, scale, _ in (cells[i] for i in chunk)]
        results = generate(lm, [cells[i][2] for i in chunk], rows, sampling=sampling, stop=cancel, gate=gate)
        for i, res in zip(chunk, results):
            layer, scale, prompt = cells[i]
            done[i] = GridRow(layer, scale, prompt, res.text,
                              len(pattern.findall(res.text)) if pattern is not None else None,
                              gate_open=res.gate_open if layer is not None else None, token_ids=list(res.token_ids))
        flush()
    return [done[i] for i in range(len(cells))]


def grid_to_csv(rows: Sequence[GridRow]) -> str:
    """Grid rows as CSV text (layer, scale, prompt, matches, text)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["layer", "scale", "prompt", "text", "matches", "note"])
    for r in rows:
        w.writerow(["" if r.layer is None else r.layer, r.scale, r.prompt, "" if r.text is None else r.text,
                    "" if r.matches is None else r.matches, "no vector" if r.no_vector else ""])
    return buf.getvalue()


def grid_to_json(rows: Sequence[GridRow]) -> str:
    """Grid rows as a JSON array."""
    return json.dumps([asdict(r) for r in rows], ensure_ascii=False, indent=1)
