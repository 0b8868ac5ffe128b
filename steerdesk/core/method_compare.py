"""Which method steers best on this data: mean-diff vs PCA vs optimized vs prompting (issue 17, item 3).

One honest comparison: every vector method is computed from the same training pairs, swept
(:func:`steerdesk.core.sweep.sweep`, ``add`` at all positions) over the **same** layers x scales on
the **same** held-out pairs, and reduced to its best margin delta whose fluency delta is within the
same budget (:func:`steerdesk.core.sweep_result.pick_best`). The prompt baseline is the unsteered
model with ``instruction`` as its system message, scored on the same held-out pairs, as a delta
versus the plain model (as in the prompt-vs-vector view, :mod:`steerdesk.core.versus`); it is shown
beside the methods with whether its own fluency delta is within the budget.

Deltas are nats per reply token (per-token mean log-probs, :mod:`steerdesk.core.evaluate`).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .datasets import Dataset
from .errors import SteerdeskError
from .evaluate import TextScorer, prepare_texts
from .models import LoadedModel
from .optimize import EpochReport, OptimizeSettings
from .sweep_result import DEFAULT_BUDGET, pick_best
from .vectors import VectorSet

#: The vector methods compared, in display order.
METHODS = ("mean-diff", "pca", "optimized")

Progress = Callable[[int, int], None]


@dataclass
class MethodResult:
    """One vector method's sweep: ``margin_delta`` / ``fluency_delta`` are ``[layers][scales]`` (nats
    per token, None where not computed); ``best`` is its best cell within the budget (None: none is)."""

    method: str
    margin_delta: list[list[float | None]]
    fluency_delta: list[list[float | None]]
    best_layer: int | None = None
    best_scale: float | None = None
    best_margin: float | None = None
    best_fluency: float | None = None
    seconds: float = 0.0  # computing the vectors and sweeping them


@dataclass
class PromptBaseline:
    """The instruction as system message, no vector: deltas versus the plain model (nats per token)."""

    instruction: str
    margin_delta: float
    fluency_delta: float
    within_budget: bool


@dataclass
class MethodComparison:
    """Every method's best held-out margin delta within ``budget`` over ``layers`` x ``scales``."""

    layers: list[int]
    scales: list[float]
    budget: float
    train_pairs: int
    heldout_pairs: int
    methods: list[MethodResult] = field(default_factory=list)
    prompt: PromptBaseline | None = None

    def result(self, method: str) -> MethodResult:
        """The row of ``method`` (``KeyError`` if it was not compared)."""
        for m in self.methods:
            if m.method == method:
                return m
        raise KeyError(method)

    def ratio(self, method: str, to: str = "mean-diff") -> float | None:
        """``best_margin(method) / best_margin(to)``, or None where either is missing or ``to``'s is <= 0."""
        a, b = self.result(method).best_margin, self.result(to).best_margin
        return None if a is None or b is None or b <= 0 else a / b

    def winner(self) -> str | None:
        """The method (or ``"prompt"``) with the largest margin delta within the budget, or None."""
        best: tuple[float, str] | None = None
        for m in self.methods:
            if m.best_margin is not None and (best is None or m.best_margin > best[0]):
                best = (m.best_margin, m.method)
        p = self.prompt
        if p is not None and p.within_budget and (best is None or p.margin_delta > best[0]):
            best = (p.margin_delta, "prompt")
        return None if best is None else best[1]

    def to_dict(self) -> dict[str, Any]:
        """Every number, JSON-ready (NaN as null)."""
        out = asdict(self)
        out["winner"] = self.winner()
        out["ratios_to_mean_diff"] = {m.method: self.ratio(m.method) for m in self.methods
                                      if any(x.method == "mean-diff" for x in self.methods)}
        return out

    def format_table(self) -> str:
        """A plain-text table: one line per method and the prompt baseline."""
        lines = [f"Best held-out margin delta with fluency delta >= -{self.budget:g} nats/token "
                 f"(layers {','.join(map(str, self.layers))} x scales {','.join(f'{s:g}' for s in self.scales)}; "
                 f"{self.train_pairs} training / {self.heldout_pairs} held-out pairs)",
                 f"{'method':<12} {'margin':>8} {'fluency':>8} {'layer':>6} {'scale':>6}"]
        for m in self.methods:
            if m.best_margin is None:
                lines.append(f"{m.method:<12} {'none within the budget':>31}")
            else:
                lines.append(f"{m.method:<12} {m.best_margin:>+8.3f} {m.best_fluency or 0.0:>+8.3f} "
                             f"{m.best_layer:>6} {m.best_scale:>6g}")
        if self.prompt is not None:
            p = self.prompt
            note = "" if p.within_budget else "  (outside the budget)"
            lines.append(f"{'prompt':<12} {p.margin_delta:>+8.3f} {p.fluency_delta:>+8.3f} {'-':>6} {'-':>6}{note}")
        win = self.winner()
        lines.append(f"Best within the budget: {win}" if win else "No method stays within the budget.")
        return "\n".join(lines)


def prompt_baseline(lm: LoadedModel, heldout: Dataset, instruction: str, budget: float, *,
                    max_pairs: int | None = None, batch_size: int = 16,
                    cancel: threading.Event | None = None) -> PromptBaseline:
    """Score the held-out pairs without and with ``instruction`` as the system message (no vector).

    Returns the margin and fluency deltas (nats per token) of the instructed model versus the plain one.
    Raises ``SteerdeskError`` for an empty instruction; ``Cancelled`` when ``cancel`` is set.
    """
    if not instruction.strip():
        raise SteerdeskError("Write the instruction for the prompt baseline (e.g. 'Reply rudely.').")
    scores = []
    for system in (None, instruction):
        texts = prepare_texts(lm, heldout, system=system, max_pairs=max_pairs)
        scores.append(TextScorer(lm, texts, batch_size=batch_size).baseline(cancel))
    margin, fluency = scores[1].margin - scores[0].margin, scores[1].fluency - scores[0].fluency
    return PromptBaseline(instruction, margin, fluency, -fluency <= budget)


def compare_methods(
    lm: LoadedModel,
    train: Dataset,
    heldout: Dataset,
    *,
    layers: Sequence[int],
    scales: Sequence[float],
    budget: float = DEFAULT_BUDGET,
    instruction: str | None = None,
    methods: Sequence[str] = METHODS,
    extra: Mapping[str, VectorSet] | None = None,
    optimize: OptimizeSettings | None = None,
    read: str = "last",
    batch_size: int = 8,
    max_pairs: int | None = None,
    progress: Progress | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    cancel: threading.Event | None = None,
) -> MethodComparison:
    """Compute each of ``methods`` from ``train``, sweep it on ``heldout`` over ``layers`` x ``scales``.

    ``extra`` adds ready vector sets (e.g. the file being inspected) as further rows under their
    names, swept the same way. ``optimized`` trains one vector per layer of ``layers`` with
    ``optimize`` (its validation split is carved from ``train``). ``instruction`` adds the prompt
    baseline. ``progress(done, total)`` counts stages (one per method, one for the prompt).
    Raises ``SteerdeskError`` for an unknown method, no layers or scales, or a negative budget
    (and whatever computing or sweeping raises: too few pairs, layers out of range);
    ``Cancelled`` when ``cancel`` is set.
    """
    from .extract import compute_vectors
    from .sweep import sweep

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SteerdeskError(f"Unknown method {unknown[0]!r}; compare {', '.join(METHODS)}.")
    layer_list = list(dict.fromkeys(int(x) for x in layers))
    scale_list = [float(s) for s in scales]
    if not layer_list or not scale_list:
        raise SteerdeskError("Give the layers and scales to compare the methods over.")
    if not (math.isfinite(budget) and budget >= 0):
        raise SteerdeskError("The fluency budget must be a number >= 0.")
    rows: list[tuple[str, VectorSet | None]] = [(m, None) for m in methods] + list((extra or {}).items())
    total = len(rows) + (1 if instruction else 0)
    out = MethodComparison(layer_list, scale_list, float(budget), len(train), len(heldout))
    for i, (name, given) in enumerate(rows):
        t0 = time.perf_counter()
        if given is not None:
            vs = given
        elif name == "optimized":
            from .optimize import optimize_vectors

            vs = optimize_vectors(lm, train, layer_list, settings=optimize, read=read, batch_size=batch_size,
                                  on_epoch=on_epoch, cancel=cancel)
        else:
            vs = compute_vectors(lm, train, method=name, read=read, batch_size=batch_size, cancel=cancel)
        res = sweep(lm, vs, heldout, layers=layer_list, scales=scale_list, fluency_budget=budget,
                    max_pairs=max_pairs, cancel=cancel)
        row = MethodResult(name, res.margin_delta, res.fluency_delta)
        best = pick_best(res.margin_delta, res.fluency_delta, budget)
        if best is not None:
            r, c = best
            row.best_layer, row.best_scale = layer_list[r], scale_list[c]
            row.best_margin, row.best_fluency = res.margin_delta[r][c], res.fluency_delta[r][c]
        row.seconds = time.perf_counter() - t0
        out.methods.append(row)
        if progress:
            progress(i + 1, total)
    if instruction:
        out.prompt = prompt_baseline(lm, heldout, instruction, budget, max_pairs=max_pairs, cancel=cancel)
        if progress:
            progress(total, total)
    return out


__all__ = ["METHODS", "MethodResult", "PromptBaseline", "MethodComparison", "prompt_baseline", "compare_methods"]
