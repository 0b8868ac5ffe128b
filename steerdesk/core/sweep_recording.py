"""A sweep engine for a caller that scores list after list of configurations on the same texts.

:class:`Recording` (a :class:`~steerdesk.core.sweep_engine.Sweeper`) runs the unsteered pass, the
recorded block outputs and the self-check once, then only the steered tails for each list: what
the search (:mod:`steerdesk.core.search_eval`) uses for its batches of trials.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import replace

import torch

from .errors import SteerdeskError
from .evaluate import Scores, aggregate
from .layouts import EvalTexts, Layout, make_packed_layouts
from .models import LoadedModel
from .prefix import Capture
from .steering import Steer
from .sweep_engine import CACHE_BUDGET_BYTES, Cell, PackMismatch, Sweeper, is_identity, is_window

log = logging.getLogger("steerdesk.core.sweep")  # the engine's messages keep the sweep's logger


class Recording(Sweeper):
    """The unsteered pass of one set of texts, recorded once and reused by successive lists of
    configurations (a search's batches of trials).

    A :class:`Sweeper` records the block outputs (and, with packing, runs the unpacked reference
    pass and the self-check) inside each run; a caller scoring batch after batch on the same
    texts would pay that per batch. A ``Recording`` does it once, in :meth:`record` (called by the
    first :meth:`score`): the model's own unsteered scores on unpacked layouts (skipped when the
    caller gives them as ``baseline_lp``), the unsteered pass on packed layouts that records the
    block outputs at ``layers`` and the KL reference, and the direct-path self-check (packed
    layouts that fail it fall back to unpacked ones, as in a sweep). Each :meth:`score` call then
    runs the steered tails only: a configuration whose first steered layer is ``L`` steers the
    recorded output of block ``R``, the deepest recorded layer ``<= L``, and runs blocks
    ``R+1..end`` from it (blocks ``R+1..L-1`` are unsteered, so the scores are the same).

    **Memory.** The recorded outputs take ``rows x width x hidden_size x element size`` bytes per
    layer, summed over the layouts; they are held for the life of the object. When all ``layers``
    do not fit ``cache_budget`` bytes, an evenly spread subset that fits is recorded (always the
    lowest layer; :attr:`recorded` lists it): configurations then start at the recorded layer below
    their own, which costs blocks but no accuracy. When not even one layer fits, or the model has
    no usable direct block path (no final norm / LM head found, or the self-check fails), every
    configuration runs full forward passes on unpacked layouts (:attr:`path` ``"full"``; what
    :class:`~steerdesk.core.evaluate.TextScorer` computes).

    ``positions``: the steering positions the configurations will use (they decide the packing:
    ``"all"`` only, other whole-text positions, or token windows, which run unpacked).
    :meth:`supports` tells whether a list of configurations can run on what was recorded.
    ``baseline_lp`` (``[len(texts)]``, nats/token): the model's own unsteered per-text mean
    log-probs on unpacked layouts, e.g. ``TextScorer.baseline_lp``. Raises ``SteerdeskError`` for
    ``layers`` empty or outside the model, or a ``baseline_lp`` of another length. Not
    thread-safe: one caller at a time.
    """

    # A packed row holds several texts (a pair's replies and more), so one row, twice, checks several.
    check_rows = 1

    def __init__(self, lm: LoadedModel, texts: EvalTexts, *, layers: Sequence[int], batch_size: int = 16,
                 max_rows: int = 64, cache_budget: int = CACHE_BUDGET_BYTES, pack: bool = True,
                 pack_tokens: int = 320, positions: Sequence[str] = ("all",),
                 baseline_lp: torch.Tensor | None = None):
        super().__init__(lm, texts, [], batch_size=batch_size, max_rows=max_rows, prefix_reuse=True,
                         cache_budget=cache_budget, cancel=None, on_cell=_no_cell, progress=_no_progress, pack=False)
        n_layers = len(lm.blocks)
        self.layers = sorted({int(x) for x in layers})
        if not self.layers or self.layers[0] < 0 or self.layers[-1] >= n_layers:
            raise SteerdeskError(f"The layers to record must be within 0-{n_layers - 1}.")
        if baseline_lp is not None and tuple(baseline_lp.shape) != (len(texts),):
            raise SteerdeskError(f"The baseline scores must have one value per text ({len(texts)}).")
        self.positions = frozenset(positions) or frozenset({"all"})
        self.given_lp = baseline_lp
        self.recorded: list[int] = []  # layers whose block output is recorded
        self.caps: dict[int, Capture] = {}  # layout index -> its recording
        self.base: Scores | None = None  # the unsteered scores, once recorded
        self._path0 = self.path  # "prefix", or "full" when the model has no tail (see Sweeper)
        self._packed0: list[Layout] | None = None
        if pack and self.path == "prefix" and not any(is_window(p) for p in self.positions):
            self._packed0 = make_packed_layouts(lm, texts, row_tokens=pack_tokens, max_rows=max(1, batch_size),
                                                positions="all" if self.positions == {"all"} else "mixed")

    # -- recording -------------------------------------------------------------------------
    def layer_bytes(self, layouts: Sequence[Layout]) -> int:
        """Bytes one layer's recorded block outputs take over ``layouts``."""
        elem = torch.tensor([], dtype=next(self.lm.model.parameters()).dtype).element_size()
        return sum(lay.rows * lay.width * self.lm.info.hidden_size * elem for lay in layouts)

    def fitting_layers(self, layouts: Sequence[Layout]) -> list[int]:
        """The layers recorded on ``layouts``: all of :attr:`layers` when they fit the cache budget,
        else ``k`` of them spread evenly from the lowest (``k`` = what fits; empty when none does)."""
        k = self.cache_budget // max(1, self.layer_bytes(layouts))
        every = self.layers
        if k >= len(every):
            return list(every)
        return sorted({every[(i * len(every)) // k] for i in range(k)})

    def record(self, cancel: threading.Event | None = None) -> Scores:
        """Run the unsteered pass once (see the class docstring); returns the unsteered scores.

        A later call returns them without running anything. Raises ``Cancelled`` when ``cancel``
        is set (nothing is kept: the next call starts again) and ``SteerdeskError`` when the model
        runs out of memory.
        """
        if self.base is not None:
            return self.base
        self.cancel = cancel
        sc = self.scorer
        n = len(self.texts)
        self.caps.clear()
        sc.refs.clear()
        self._pieces.clear()
        self.layouts, self.verify, self.checked, self.path = sc.layouts, False, False, self._path0
        self.packed = self._packed0
        neutral = torch.tensor([k == "neutral" for k in self.texts.kinds])
        sc.baseline_kl = torch.where(neutral, torch.zeros(n, dtype=torch.float64),
                                     torch.full((n,), float("nan"), dtype=torch.float64))
        sc.baseline_lp = (self.given_lp.to(torch.float64).clone() if self.given_lp is not None
                          else torch.full((n,), float("nan"), dtype=torch.float64))
        if self.packed is not None and not self.fitting_layers(self.packed):
            self.packed = None  # unpacked layouts are larger still: full passes (below)
        if self.packed is not None:
            if self.given_lp is None:
                for li in range(len(sc.layouts)):
                    self.plain_baseline(li)
            self.layouts, self.verify = self.packed, True
            try:
                self._record_layouts()
            except PackMismatch as exc:
                log.info("packing off: %s", exc)
                self.caps.clear()
                sc.refs.clear()
                self.packed = None
                self.layouts, self.verify, self.checked, self.path = sc.layouts, False, False, self._path0
        if self.packed is None:
            self._record_layouts()
        assert sc.baseline_lp is not None
        self.base = aggregate(self.texts, sc.baseline_lp, sc.baseline_kl)
        return self.base

    def _record_layouts(self) -> None:
        """The unsteered pass over :attr:`layouts`, recording the block outputs that fit the budget."""
        self.starts = self.fitting_layers(self.layouts) if self.path == "prefix" else []
        if self.path == "prefix" and not self.starts:
            log.info("prefix reuse off: one layer's block outputs (%d bytes) exceed the cache budget (%d bytes)",
                     self.layer_bytes(self.layouts), self.cache_budget)
            self.path = "full"
        for li in range(len(self.layouts)):
            cap = self.baseline(li)  # records at self.starts while the path is "prefix"
            if cap is None:
                continue
            self.caps[li] = cap
            if not self.checked and self.layouts[li].kind == "heldout":
                self.checked = True
                if not self.self_check(li, cap):
                    if self.verify:  # unpacked layouts first, then (if they fail too) full passes
                        raise PackMismatch("the direct block path differs on packed layouts")
                    self.path = "full"
        if self.path == "full":
            self.caps.clear()  # also frees what was recorded before a failed self-check
            self.starts = []
        self.recorded = list(self.starts)

    def run(self) -> Scores:
        """The unsteered scores (:meth:`record`); a Recording's configurations go to :meth:`score`."""
        return self.record(self.cancel)

    # -- scoring ---------------------------------------------------------------------------
    def supports(self, configs: Sequence[Sequence[Steer]]) -> bool:
        """Whether :meth:`score` can run ``configs`` on what was (or will be) recorded: their
        positions are among those given at construction (or the layouts are unpacked) and, on the
        direct path, none starts below the lowest recorded layer."""
        positions = {s.positions for cfg in configs for s in cfg}
        done = self.base is not None
        if (self.packed if done else self._packed0) is not None and not positions <= self.positions:
            return False
        if (self.path if done else self._path0) == "full":
            return True
        lowest = self.recorded[0] if done else self.layers[0]
        return all(min(s.layer for s in cfg) >= lowest for cfg in configs if not is_identity(cfg))

    def score(self, configs: Sequence[Sequence[Steer]], cancel: threading.Event | None = None) -> list[Scores]:
        """Absolute scores of each configuration (:meth:`record` first, on the first call).

        Deltas are against :attr:`base`; an identity configuration (``add`` / ``project`` at
        scale 0, or no steering) gets :attr:`base` itself. Raises ``SteerdeskError`` for
        configurations :meth:`supports` refuses or when memory runs out, ``Cancelled`` when
        ``cancel`` is set.
        """
        base = self.record(cancel)
        self.cancel = cancel
        if not self.supports(configs):
            raise SteerdeskError("These steering configurations cannot run on the recorded pass "
                                 "(other positions, or a layer below the recorded ones).")
        n = len(self.texts)
        cells = []
        for i, cfg in enumerate(configs):
            first = min((s.layer for s in cfg), default=0)
            start = max((x for x in self.recorded if x <= first), default=0)
            cells.append(Cell(0, i, list(cfg), start=start, identity=is_identity(cfg), index=i))
        # Sweeper's planning reads the cells to run and their start layers from these attributes.
        self.cells = cells
        self.work = [c for c in cells if not c.identity]
        self.starts = sorted({c.start for c in self.work})
        self.lp = torch.full((len(cells), n), float("nan"), dtype=torch.float64)
        self.kl = torch.full((len(cells), n), float("nan"), dtype=torch.float64)
        every = list(range(len(self.layouts)))
        for start, group in self.groups(every):
            for li in every:
                self.run_group(li, self.caps.get(li), start, group)
        return [replace(base) if c.identity else aggregate(self.texts, self.lp[c.index], self.kl[c.index])
                for c in cells]


def _no_cell(cell: Cell, scores: Scores, base: Scores) -> None:
    """A Recording reports nothing per cell (its :meth:`Recording.score` returns the scores)."""


def _no_progress() -> None:
    """A Recording counts no progress."""


__all__ = ["Recording"]
