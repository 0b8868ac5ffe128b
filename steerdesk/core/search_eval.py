"""How a search scores its trials: :class:`Evaluator` (texts and unsteered baseline once, batches of
trial settings scored by one of :data:`ENGINES`). Used by :func:`steerdesk.core.search.search`."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .datasets import Dataset
from .errors import SteerdeskError
from .evaluate import Scores, TextScorer
from .layouts import prepare_texts
from .search_space import TrialSettings
from .sweep_engine import CACHE_BUDGET_BYTES, Cell, Sweeper, is_identity
from .sweep_recording import Recording

log = logging.getLogger("steerdesk.core.search")


#: Scoring engines of :meth:`Evaluator.score`; the first is the default (docs/decisions.md, "Search").
ENGINES = ("recorded", "scorer", "sweep")
DEFAULT_ENGINE = ENGINES[0]


@dataclass
class Evaluator:
    """Scores batches of trial settings on one set of texts (the unsteered baseline computed once).

    ``engine`` is the default of :meth:`score`; ``layers`` are the layers a trial can start at
    (the ``recorded`` engine records their block outputs; empty: every layer of the model);
    ``cache_budget`` bounds those recordings in bytes (None:
    :data:`~steerdesk.core.sweep_engine.CACHE_BUDGET_BYTES`).
    """

    lm: Any
    vectors: Any
    scorer: TextScorer
    base: Scores
    engine: str = DEFAULT_ENGINE
    layers: tuple[int, ...] = ()
    cache_budget: int | None = None
    recording: Recording | None = field(default=None, repr=False)

    @classmethod
    def prepare(cls, lm: Any, vectors: Any, heldout: Dataset, *, neutral: Sequence[str], system: str | None = None,
                max_pairs: int | None = None, batch_size: int = 16, max_rows: int = 64,
                cancel: threading.Event | None = None, engine: str = DEFAULT_ENGINE,
                layers: Sequence[int] | None = None, cache_budget: int | None = None) -> Evaluator:
        """Tokenise ``heldout`` + ``neutral`` and score the unsteered model (the KL reference).

        Raises ``SteerdeskError`` for no neutral text, an unknown ``engine`` or unusable texts,
        ``Cancelled`` when ``cancel`` is set.
        """
        if not neutral:
            raise SteerdeskError("A search needs neutral texts for its KL objective.")
        check_engine(engine)
        texts = prepare_texts(lm, heldout, neutral=neutral, system=system, max_pairs=max_pairs)
        scorer = TextScorer(lm, texts, batch_size=batch_size, max_rows=max_rows)
        base = scorer.baseline(cancel)
        return cls(lm, vectors, scorer, base, engine=engine, layers=tuple(layers or ()), cache_budget=cache_budget)

    def score(self, batch: Sequence[TrialSettings], cancel: threading.Event | None = None,
              engine: str | None = None) -> list[tuple[float, float, float]]:
        """``(margin delta, KL, fluency delta)`` per settings (nats/token, versus unsteered).

        ``engine`` (default: :attr:`engine`):

        * ``"recorded"`` (the default): the sweep engine's prefix reuse and packing with the
          unsteered pass recorded **once per evaluator** (:class:`~steerdesk.core.sweep_recording.Recording`,
          made on the first call: block outputs at every layer of :attr:`layers` that fits the
          cache budget, the KL reference, the self-check); each batch then runs only its trials'
          steered tails (a trial whose range starts at layer L runs blocks L+1..end from block L's
          recorded output). Deltas are against the recorded unsteered scores (the same numbers as
          :attr:`base`); a batch the recording cannot run (other steering positions than the first
          batch's, a layer below :attr:`layers`) is scored as with ``"sweep"``.
        * ``"scorer"``: **one** ``TextScorer.score`` call, full forwards with one batch row per
          configuration and text, deltas against the baseline computed once in :meth:`prepare`.
        * ``"sweep"``: the batch as the cells of one :class:`~steerdesk.core.sweep_engine.Sweeper`
          run (prefix reuse and packing, the block outputs recorded again for every batch); its deltas
          are against that run's own unsteered pass, as a sweep's are.

        All three agree with per-trial :func:`~steerdesk.core.evaluate.evaluate` to the engine's
        self-check tolerance (1e-4 in float32). Raises ``SteerdeskError`` for an unknown engine
        and ``Cancelled`` when ``cancel`` is set.
        """
        engine = self.engine if engine is None else engine
        check_engine(engine)
        configs = [s.steers(self.vectors) for s in batch]
        info = self.lm.info
        for cfg in configs:
            for st in cfg:
                st.check(info.num_layers, info.hidden_size)
        if engine == "recorded":
            return self._score_recorded(configs, cancel)
        if engine == "sweep":
            return self._score_sweep(configs, cancel)
        scores = self.scorer.score(configs, cancel=cancel)
        return [(s.margin - self.base.margin, s.kl if s.kl is not None else math.nan, s.fluency - self.base.fluency)
                for s in scores]

    def _score_recorded(self, configs: list[list[Any]], cancel: threading.Event | None
                        ) -> list[tuple[float, float, float]]:
        rec = self.recording
        if rec is None:
            positions = {st.positions for cfg in configs for st in cfg} or {"all"}
            rec = Recording(self.lm, self.scorer.texts, layers=self.layers or range(self.lm.info.num_layers),
                            batch_size=self.scorer.batch_size, max_rows=self.scorer.max_rows,
                            cache_budget=CACHE_BUDGET_BYTES if self.cache_budget is None else self.cache_budget,
                            positions=sorted(positions), baseline_lp=self.scorer.baseline_lp)
            rec.record(cancel)
            self.recording = rec
            log.info("recorded the unsteered pass: path %s, packed %s, block outputs at layers %s",
                     rec.path, rec.packed is not None, rec.recorded)
        if not rec.supports(configs):
            log.info("a batch the recorded pass cannot run: scored by its own sweep-engine run")
            return self._score_sweep(configs, cancel)
        base = rec.record()
        return [(s.margin - base.margin, s.kl if s.kl is not None else math.nan, s.fluency - base.fluency)
                for s in rec.score(configs, cancel)]

    def _score_sweep(self, configs: list[list[Any]], cancel: threading.Event | None
                     ) -> list[tuple[float, float, float]]:
        cells = [Cell(0, i, cfg, start=min((st.layer for st in cfg), default=0), identity=is_identity(cfg), index=i)
                 for i, cfg in enumerate(configs)]
        got: dict[int, tuple[float, float, float]] = {}

        def done(cell: Cell, scores: Scores, base: Scores) -> None:
            got[cell.index] = (scores.margin - base.margin, scores.kl if scores.kl is not None else math.nan,
                               scores.fluency - base.fluency)

        budget = CACHE_BUDGET_BYTES if self.cache_budget is None else self.cache_budget
        Sweeper(self.lm, self.scorer.texts, cells, batch_size=self.scorer.batch_size,
                max_rows=self.scorer.max_rows, prefix_reuse=True, cache_budget=budget, cancel=cancel,
                on_cell=done, progress=lambda: None).run()
        return [got[i] for i in range(len(configs))]  # every cell, identity ones too, is reported


def check_engine(engine: str) -> None:
    """Raise ``SteerdeskError`` for a scoring engine not in :data:`ENGINES`."""
    if engine not in ENGINES:
        raise SteerdeskError(f"Unknown scoring engine {engine!r}; use {', '.join(ENGINES)}.")


__all__ = ["DEFAULT_ENGINE", "ENGINES", "Evaluator", "check_engine"]
