"""The sweep engine: runs a sweep's cells with per-row steering, prefix reuse and packing.

:func:`steerdesk.core.sweep.sweep` builds the :class:`Cell` list and the texts and turns the
scores into a :class:`~steerdesk.core.sweep_result.SweepResult`; :class:`Sweeper` does the forward
passes (the module docstring of :mod:`steerdesk.core.sweep` describes the tricks and their checks).
:class:`~steerdesk.core.sweep_recording.Recording` is the same engine for a caller that scores
list after list of configurations on the same texts (the search's batches of trials).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .errors import Cancelled
from .evaluate import Scores, TextScorer, aggregate, logits_picker, model_logits, reference_logprobs, score_tokens
from .layouts import EvalTexts, Layout, make_packed_layouts
from .memory import oom_guard
from .models import LoadedModel
from .parsing import parse_positions
from .prefix import Capture, Tail, Unsupported, run_blocks
from .steering import Steer, Steering

log = logging.getLogger("steerdesk.core.sweep")  # the engine's messages keep the sweep's logger

CACHE_BUDGET_BYTES = 2 << 30
OOM_HINT = "try a smaller batch size or fewer rows per forward pass (--batch-size, --max-rows)."

# On a CPU whose linear layers run on oneDNN, a steered forward of the direct path carries at most
# this many token rows (when one configuration of a batch allows): core/kernels.py runs a product of
# up to 1024 rows as one oneDNN call, a larger one in blocks whose outputs are then concatenated (a
# copy of every product's output). aten's products take any row count in one call: no cap there.
CPU_FORWARD_TOKENS = 1024


def forward_token_cap(lm: LoadedModel) -> int | None:
    """Most token rows per steered forward of the direct path: :data:`CPU_FORWARD_TOKENS` on a CPU
    model with oneDNN linear layers (:class:`~steerdesk.core.kernels.OneDNNLinear`), else None."""
    from .kernels import OneDNNLinear

    if lm.input_device.type != "cpu":
        return None
    return CPU_FORWARD_TOKENS if any(isinstance(m, OneDNNLinear) for m in lm.model.modules()) else None


# ========================================================================== configurations

@dataclass
class Cell:
    """One sweep cell: a row (layer or set) x a scale, its steering, and where its steering starts."""

    row: int
    col: int
    steers: list[Steer]
    start: int  # first steered layer
    identity: bool
    index: int = 0


def is_identity(steers: Sequence[Steer]) -> bool:
    """True when the steering changes nothing (``add`` / ``project`` at scale 0): the delta is exactly 0."""
    return all(s.mode in ("add", "project") and s.scale == 0 for s in steers)


def is_window(positions: str) -> bool:
    """True for a token window (``first:N``, ``gen:A-B``, ``prompt:A-B``), False for all / prompt /
    generated. Raises ``SteerdeskError`` for text that is neither (:func:`~steerdesk.core.parsing.parse_positions`)."""
    return parse_positions(positions).kind in ("gen", "prompt_window")


# ================================================================================= sweep

def check_tolerance(dtype: torch.dtype) -> float:
    """Per-token log-prob tolerance (nats) of a direct block path's self-check against the model's own
    forward (the sweep's, and the optimized method's prefix cache's)."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2


def _pack_tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2


class PackMismatch(Exception):
    """Packed layouts did not reproduce the model's own unpacked scores (a fallback, never shown)."""


class Sweeper:
    """Runs the cells of a sweep: the unsteered pass, then steered forwards grouped by first steered layer
    (prefix reuse and packing where the self-checks allow), reporting each finished cell to ``on_cell``.

    Token windows run on unpacked layouts only (one text per row, replies aligned at ``reply_col``,
    so a ``gen`` window's columns are the same reply tokens in every row and a ``prompt`` window
    counts from each row's first real token). ``open_texts`` (``[len(texts)]`` bool, a condition
    gate decided per pair): a text it marks False is scored unsteered in every cell (its steered
    scores are replaced by the baseline's before aggregation, so its delta is exactly 0).
    """

    check_rows = 2  # rows of the first held-out batch the self-check runs (each twice)

    def __init__(self, lm: LoadedModel, texts: EvalTexts, cells: list[Cell], *, batch_size: int, max_rows: int,
                 prefix_reuse: bool, cache_budget: int, cancel: threading.Event | None,
                 on_cell: Callable[[Cell, Scores, Scores], None], progress: Callable[[], None],
                 pack: bool = True, pack_tokens: int = 320, open_texts: torch.Tensor | None = None):
        self.lm = lm
        self.open_texts = open_texts
        self.texts = texts
        self.cells = cells
        self.scorer = TextScorer(lm, texts, batch_size=batch_size, max_rows=max_rows)
        self.cancel = cancel
        self.on_cell = on_cell
        self._progress = progress
        self._ticks = 0
        self.path = "prefix" if prefix_reuse else "full"
        self.cache_budget = cache_budget
        self.checked = False
        self.tail: Tail | None = None
        if prefix_reuse:
            try:
                self.tail = Tail(lm)
            except Unsupported as exc:
                log.info("prefix reuse off: %s", exc)
                self.path = "full"
        n = len(texts)
        self.lp = torch.full((len(cells), n), float("nan"), dtype=torch.float64)
        self.kl = torch.full((len(cells), n), float("nan"), dtype=torch.float64)
        self.work = [c for c in cells if not c.identity]
        self.starts = sorted({c.start for c in self.work})
        self.layouts: list[Layout] = self.scorer.layouts  # what the steered forwards run on
        self._pieces: dict[tuple[int, int], list[Layout]] = {}
        self.token_cap = forward_token_cap(lm)
        self.packed: list[Layout] | None = None
        self.verify = False  # check each packed baseline against the model's own unpacked scores
        positions = {s.positions for c in self.work for s in c.steers}
        self.windowed = any(is_window(p) for p in positions)
        if pack and self.path == "prefix" and self.starts and not self.windowed:
            self.packed = make_packed_layouts(lm, texts, row_tokens=pack_tokens, max_rows=max(1, batch_size),
                                              positions="all" if positions == {"all"} else "mixed")
        if self.packed is not None:  # the unpacked reference pass, then everything on packed layouts
            self.layouts = self.packed
            self.total = len(self.scorer.layouts) + self.total_steps()
            self.layouts = self.scorer.layouts
        else:
            self.total = self.total_steps()

    def _check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("Sweep cancelled.")

    # -- planning ----------------------------------------------------------------------
    def chunks(self) -> list[list[int]]:
        """Groups of layouts whose recorded block outputs fit the cache budget together."""
        layouts = self.layouts
        if self.path == "full" or not self.starts:
            return [list(range(len(layouts)))]
        hidden = self.lm.info.hidden_size
        elem = torch.tensor([], dtype=next(self.lm.model.parameters()).dtype).element_size()
        groups: list[list[int]] = [[]]
        used = 0
        for li, lay in enumerate(layouts):
            need = lay.rows * lay.width * hidden * elem * len(self.starts)
            if groups[-1] and used + need > self.cache_budget:
                groups.append([])
                used = 0
            groups[-1].append(li)
            used += need
        return groups

    def groups(self, chunk: Sequence[int]) -> list[tuple[int, list[Cell]]]:
        """``(start layer, cells)`` per forward group: every layout of ``chunk`` runs each group once."""
        sc = self.scorer
        if self.path == "prefix":  # the LM head runs on the scored tokens only, in chunks
            # max_rows counts texts (a packed row holds several); on a CPU a forward also stays within
            # CPU_FORWARD_TOKENS tokens where a whole batch of one configuration does.
            step = max(1, min(sc.max_rows // max(self.layouts[li].rows, self.layouts[li].n_segments) for li in chunk))
            if self.token_cap is not None:
                step = min(step, max(1, min(self.token_cap // max(1, self.layouts[li].rows * self.layouts[li].width)
                                            for li in chunk)))
        else:
            step = min(sc.copies_per_forward(self.layouts[li]) for li in chunk)
        out: list[tuple[int, list[Cell]]] = []
        for start in self.starts:
            at_start = [c for c in self.work if c.start == start]
            out.extend((start, at_start[g:g + step]) for g in range(0, len(at_start), step))
        return out

    def total_steps(self) -> int:
        """Forward passes the steered cells need (for progress)."""
        return sum(len(chunk) * (1 + len(self.groups(chunk))) for chunk in self.chunks())

    # -- baseline ------------------------------------------------------------------------
    def baseline(self, li: int) -> Capture | None:
        """Unsteered forward of one layout: baseline scores, KL reference, recorded block outputs."""
        self._check()
        sc, lay = self.scorer, self.layouts[li]
        cap = Capture(self.lm, self.starts) if (self.path == "prefix" and self.starts) else None
        with torch.inference_mode(), oom_guard("sweeping", OOM_HINT):
            if cap is not None:
                with cap:
                    logits, lo = model_logits(self.lm, lay.ids, lay.model_mask, lay.positions, lay.keep())
            else:
                logits, lo = model_logits(self.lm, lay.ids, lay.model_mask, lay.positions, lay.keep())
        at = logits_picker(logits, lo)
        if lay.kind == "neutral":
            sc.refs[li] = reference_logprobs(lay, at, sc.vocab)
        row_lp, _ = score_tokens(lay, 1, at, sc.vocab)
        assert sc.baseline_lp is not None
        if self.verify:  # a packed layout: the baseline stays the model's own unpacked scores
            want = sc.baseline_lp[lay.texts]
            err = float((row_lp - want).abs().max())
            if not err <= _pack_tolerance(next(self.lm.model.parameters()).dtype):
                raise PackMismatch(f"packed scores differ from the model's by {err:.3g}")
        else:
            sc.baseline_lp[lay.texts] = row_lp
        self.tick()
        return cap

    def plain_baseline(self, li: int) -> None:
        """The model's own unsteered scores of unpacked layout ``li`` (the reference for packing)."""
        self._check()
        sc, lay = self.scorer, self.scorer.layouts[li]
        with torch.inference_mode(), oom_guard("sweeping", OOM_HINT):
            logits, lo = model_logits(self.lm, lay.ids, lay.mask, lay.positions, lay.keep())
        at = logits_picker(logits, lo)
        row_lp, _ = score_tokens(lay, 1, at, sc.vocab)
        assert sc.baseline_lp is not None
        sc.baseline_lp[lay.texts] = row_lp
        self.tick()

    def self_check(self, li: int, cap: Capture) -> bool:
        """The direct block path must reproduce the model's own unsteered scores.

        Checked on (at most) ``check_rows`` rows (two texts, unpacked) of the first batch, each
        twice, from the lowest start layer: cheap, and it exercises the row selection, every
        block's arguments and the tail. A packed layout's first row alone (twice) already holds
        several texts: one row is checked there (a 306-token row of the issue-4 workload holds 8 pairs).
        """
        lay = self.layouts[li]
        assert self.scorer.baseline_lp is not None
        k = min(1 if lay.n_segments > lay.rows else self.check_rows, lay.rows)
        sub = lay.subset(list(range(k)) * 2)
        try:
            with torch.inference_mode():
                row_lp, _ = self._direct(sub, cap, min(self.starts), [[]], None, lay.rows)
        except Unsupported as exc:
            log.info("prefix reuse off: %s", exc)
            return False
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            log.info("prefix reuse off: the direct block path failed (%s: %s)", type(exc).__name__, exc)
            return False
        want = self.scorer.baseline_lp[sub.texts]
        err = float((row_lp - want).abs().max())
        tol = check_tolerance(next(self.lm.model.parameters()).dtype)
        if not err <= tol:
            log.info("prefix reuse off: the direct block path differs from the model by %.3g", err)
            return False
        return True

    # -- steered forwards ----------------------------------------------------------------
    def _direct(self, lay: Layout, cap: Capture, start: int, configs: Sequence[Sequence[Steer]],
                ref: torch.Tensor | None, recorded_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``configs x rows of lay`` from the recorded output of block ``start`` (steered, then blocks
        ``start+1..end``).

        ``lay.source_rows`` are the rows of the recorded batch (``recorded_rows`` of them) that
        ``lay`` holds; normally all of them.
        """
        assert self.tail is not None
        c = len(configs)
        src = torch.as_tensor(lay.source_rows, dtype=torch.long)
        idx = src.repeat(c)
        rows = [list(cfg) for cfg in configs for _ in range(lay.rows)]
        with Steering(self.lm, rows, prompt_length=lay.prompt_length, prompt_starts=lay.prompt_starts.repeat(c)) as st:
            h = run_blocks(self.lm, cap, start, recorded_rows or lay.rows, idx, st)
        tail = self.tail
        assert tail is not None  # the direct path runs only with a tail

        ws = self.scorer.workspace
        weight = tail.head.weight

        def at(r: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
            sel = h[r.to(h.device), col.to(h.device)]
            return tail.logits(tail.norm(sel), ws.take("logits", (sel.shape[0], weight.shape[0]), weight.dtype,
                                                         weight.device))
        return score_tokens(lay, c, at, self.scorer.vocab, ref, ws)

    def run_group(self, li: int, cap: Capture | None, start: int, group: list[Cell]) -> None:
        """Score the cells of ``group`` (first steered layer ``start``) on layout ``li``."""
        self._check()
        configs = [c.steers for c in group]
        lay = self.layouts[li]
        if cap is None:
            with oom_guard("sweeping", OOM_HINT):
                parts = [(lay, *self._full(li, configs))]
        else:
            parts = []
            for piece in self.pieces(li):
                with oom_guard("sweeping", OOM_HINT), torch.inference_mode():
                    parts.append((piece, *self._direct(piece, cap, start, configs,
                                                       self.scorer.refs.get(li) if piece is lay else None, lay.rows)))
        for piece, row_lp, row_kl in parts:
            for k, cell in enumerate(group):
                sl = slice(k * piece.n_segments, (k + 1) * piece.n_segments)
                self.lp[cell.index, piece.texts] = row_lp[sl]
                if row_kl is not None:
                    self.kl[cell.index, piece.texts] = row_kl[sl]
        self.tick()

    def _full(self, li: int, configs: Sequence[Sequence[Steer]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``configs x rows`` of layout ``li`` in one full forward pass: :meth:`TextScorer.forward`'s
        computation, with each row's prompt start given to the steering (``prompt:A-B`` windows)."""
        lay = self.layouts[li]
        c = len(configs)
        ids, mask, positions = lay.tiled(c)
        rows = [list(cfg) for cfg in configs for _ in range(lay.rows)]
        with Steering(self.lm, rows, prompt_length=lay.prompt_length, prompt_starts=lay.prompt_starts.repeat(c)), \
                torch.inference_mode():
            logits, lo = model_logits(self.lm, ids, mask, positions, lay.keep())
        return score_tokens(lay, c, logits_picker(logits, lo, self.scorer.workspace), self.scorer.vocab,
                            self.scorer.refs.get(li), self.scorer.workspace)

    def gated(self, index: int) -> None:
        """Replace cell ``index``'s scores of the texts the gate keeps closed by the baseline's."""
        if self.open_texts is None:
            return
        base = self.scorer.baseline_lp
        assert base is not None
        self.lp[index] = torch.where(self.open_texts, self.lp[index], base)

    def pieces(self, li: int) -> list[Layout]:
        """Layout ``li`` cut into row groups of at most :attr:`token_cap` tokens (oneDNN on a CPU, no KL
        reference to cut along); the whole layout otherwise."""
        lay = self.layouts[li]
        key = (id(lay), li)
        hit = self._pieces.get(key)
        if hit is not None:
            return hit
        cap = self.token_cap
        per = max(1, (cap or 0) // max(1, lay.width))
        if cap is None or lay.kind == "neutral" or li in self.scorer.refs or per >= lay.rows:
            out = [lay]
        else:
            n = -(-lay.rows // per)
            per = -(-lay.rows // n)  # even pieces
            out = [lay.subset(range(i, min(i + per, lay.rows))) for i in range(0, lay.rows, per)]
        self._pieces[key] = out
        return out

    # -- driver --------------------------------------------------------------------------
    def run(self) -> Scores:
        """Run every cell; returns the unsteered scores. Cells are reported when complete."""
        sc = self.scorer
        n = len(self.texts)
        sc.baseline_lp = torch.full((n,), float("nan"), dtype=torch.float64)
        neutral = torch.tensor([k == "neutral" for k in self.texts.kinds])
        sc.baseline_kl = torch.where(neutral, torch.zeros(n, dtype=torch.float64),
                                     torch.full((n,), float("nan"), dtype=torch.float64))
        if self.packed is not None:
            for li in range(len(sc.layouts)):
                self.plain_baseline(li)
            self.layouts, self.verify = self.packed, True
            try:
                return self._run_layouts()
            except PackMismatch as exc:
                log.info("packing off: %s", exc)
            self.layouts, self.verify, self.checked = sc.layouts, False, False
            sc.refs.clear()
            self.total = self.tick_count() + self.total_steps()
        return self._run_layouts()

    def tick(self) -> None:
        """Count one forward pass and report progress."""
        self._ticks += 1
        self._progress()

    def tick_count(self) -> int:
        """Forward passes counted so far."""
        return self._ticks

    def _run_layouts(self) -> Scores:
        sc = self.scorer
        chunks = self.chunks()
        base: Scores | None = None
        for ci, chunk in enumerate(chunks):
            last_chunk = ci == len(chunks) - 1
            caps: dict[int, Capture | None] = {}
            for li in chunk:
                caps[li] = self.baseline(li)
                cap = caps[li]
                if self.path == "prefix" and not self.checked and cap is not None \
                        and self.layouts[li].kind == "heldout":
                    self.checked = True
                    if not self.self_check(li, cap):
                        if self.verify:  # unpacked layouts first, then (if they fail too) full passes
                            raise PackMismatch("the direct block path differs on packed layouts")
                        self.path = "full"
                        self.total = self.total_steps()  # full passes carry fewer configurations
            if self.path == "full":
                caps.clear()  # also frees what was recorded before a failed self-check
            if last_chunk:
                assert sc.baseline_lp is not None and sc.baseline_kl is not None  # the baseline ran first
                base = aggregate(self.texts, sc.baseline_lp, sc.baseline_kl)
                for cell in self.cells:  # identity cells are the baseline itself
                    if cell.identity:
                        self.lp[cell.index] = sc.baseline_lp
                        self.kl[cell.index] = sc.baseline_kl
                        self.on_cell(cell, base, base)
            for start, group in self.groups(chunk):
                for li in chunk:
                    self.run_group(li, caps.get(li), start, group)
                if last_chunk:
                    assert base is not None
                    for cell in group:
                        self.gated(cell.index)
                        self.on_cell(cell, aggregate(self.texts, self.lp[cell.index], self.kl[cell.index]), base)
            caps.clear()
        assert base is not None
        return base


__all__ = ["CACHE_BUDGET_BYTES", "CPU_FORWARD_TOKENS", "OOM_HINT", "Cell", "PackMismatch", "Sweeper", "check_tolerance",
           "forward_token_cap", "is_identity", "is_window"]
