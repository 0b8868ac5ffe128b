"""Job: a generation grid, layers x scales x prompts of steered text with keyword/regex counts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..core.generate import SamplingSettings
from ..core.models import LoadedModel
from ..core.records import RunRecord
from ..core.textgrid import GridRow
from ..core.vectors import VectorSet
from .context import JobContext

if TYPE_CHECKING:
    from ..core.condition import ConditionGate

NAME = "grid"
TITLE = "Generation grid failed"


@dataclass(frozen=True)
class GridSpec:
    """Generate every (layer, scale, prompt) with ``vectors`` (unsteered references first).

    ``vector_path`` names the file in records (None: the used layers' vectors are embedded);
    ``model`` how a record names the model. ``positions`` (a named position or a token window) and
    ``gate`` (steer only the prompts that open it) are given to generation as they are.
    """

    vectors: VectorSet = field(compare=False)
    layers: tuple[int, ...]
    scales: tuple[float, ...]
    prompts: tuple[str, ...]
    mode: str = "add"
    normalize: bool = False
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    pattern: str | None = None  # keywords (comma-separated) or a regular expression with ``regex``
    regex: bool = False
    batch_rows: int = 16
    vector_path: str | None = None
    model: str | None = None
    positions: str = "all"
    gate: ConditionGate | None = field(default=None, compare=False)


def run(lm: LoadedModel, spec: GridSpec, ctx: JobContext) -> list[GridRow]:
    """Rows in grid order, each also handed to ``ctx.partial`` as it is done."""
    from ..core.textgrid import compile_pattern, generation_grid

    spec.vectors.check_compatible(lm.info)
    return generation_grid(lm, spec.vectors, list(spec.layers), list(spec.scales), list(spec.prompts),
                           mode=spec.mode, normalize=spec.normalize, sampling=spec.sampling,
                           pattern=compile_pattern(spec.pattern, spec.regex), batch_rows=spec.batch_rows,
                           on_row=ctx.partial, cancel=ctx.cancel, positions=spec.positions, gate=spec.gate)


def record(lm: LoadedModel, spec: GridSpec, result: list[GridRow], seconds: float = 0.0) -> RunRecord:
    """The run record (``seconds``: the wall time the caller measured)."""
    from ..core.record_kinds import record_grid

    return record_grid(lm, result, spec.vectors, spec.layers, spec.scales, spec.prompts, mode=spec.mode,
                       normalize=spec.normalize, sampling=spec.sampling, pattern=spec.pattern, regex=spec.regex,
                       batch_rows=spec.batch_rows, vector_path=spec.vector_path, model=spec.model, seconds=seconds,
                       positions=spec.positions, gate=spec.gate)
