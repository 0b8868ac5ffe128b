"""Job: score steering over layers (and named layer sets) x scales on held-out pairs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..core.datasets import Dataset
from ..core.models import LoadedModel
from ..core.records import RunRecord
from ..core.sweep import DEFAULT_BUDGET, DEFAULT_SCALES, SweepResult
from ..core.vectors import VectorSet
from .context import JobContext

if TYPE_CHECKING:
    from ..core.condition import ConditionGate

NAME = "sweep"
TITLE = "Sweep failed"


@dataclass(frozen=True)
class SweepCell:
    """A finished cell, handed to ``ctx.partial`` as it is done (rows: layers, then sets)."""

    row: int
    col: int
    margin_delta: float | None
    fluency_delta: float | None


@dataclass(frozen=True)
class SweepSpec:
    """Arguments of :func:`steerdesk.core.sweep.sweep`, plus how a record names its inputs.

    ``heldout`` is the pairs scored; ``dataset`` (as loaded) and ``heldout_fraction`` let a
    record name where they came from (``dataset.split(heldout_fraction)[1]``). ``positions`` is a
    named position or a token window (``first:N``, ``gen:A-B``, ``prompt:A-B``); ``gate`` steers only
    the pairs whose prompt opens it (:func:`steerdesk.core.sweep.sweep`).
    """

    vectors: VectorSet = field(compare=False)
    heldout: Dataset = field(compare=False)
    layers: tuple[int, ...] | None = None
    scales: tuple[float, ...] = tuple(DEFAULT_SCALES)
    sets: Mapping[str, tuple[int, ...]] | None = field(default=None, compare=False)
    mode: str = "add"
    normalize: bool = False
    positions: str = "all"
    fluency_budget: float = DEFAULT_BUDGET
    neutral: tuple[str, ...] | None = None
    system: str | None = None
    max_pairs: int | None = None
    batch_size: int = 16
    max_rows: int = 64
    prefix_reuse: bool = True
    vector_path: str | None = None
    dataset: Dataset | None = field(default=None, compare=False)
    dataset_spec: str | None = None
    heldout_fraction: float = 0.0
    model: str | None = None
    gate: ConditionGate | None = field(default=None, compare=False)


def run(lm: LoadedModel, spec: SweepSpec, ctx: JobContext) -> SweepResult:
    """Run the sweep; ``ctx.partial(SweepCell)`` per finished cell, progress per step.

    Cells are only streamed when the context wants them: the engine then finishes cells in
    display order, which changes float summation order (results agree to ~1e-6, not bitwise).
    """
    from ..core.sweep import sweep

    return sweep(lm, spec.vectors, spec.heldout, layers=list(spec.layers) if spec.layers is not None else None,
                 scales=list(spec.scales), sets={k: list(v) for k, v in spec.sets.items()} if spec.sets else None,
                 mode=spec.mode, normalize=spec.normalize, positions=spec.positions,
                 fluency_budget=spec.fluency_budget, neutral=list(spec.neutral) if spec.neutral else None,
                 system=spec.system, max_pairs=spec.max_pairs, batch_size=spec.batch_size, max_rows=spec.max_rows,
                 prefix_reuse=spec.prefix_reuse, vector_path=spec.vector_path,
                 on_cell=(lambda r, c, m, f: ctx.partial(SweepCell(r, c, m, f))) if ctx.on_partial else None,
                 progress=ctx.progress_counter("Sweeping"), cancel=ctx.cancel, gate=spec.gate)


def record(lm: LoadedModel, spec: SweepSpec, result: SweepResult) -> RunRecord:
    """The run record (``dataset`` as loaded; the held-out part was swept)."""
    from ..core.record_kinds import record_sweep

    return record_sweep(lm, result, spec.dataset if spec.dataset is not None else spec.heldout, spec.vectors,
                        dataset_spec=spec.dataset_spec, heldout=spec.heldout_fraction,
                        vector_path=spec.vector_path, model=spec.model, gate=spec.gate)
