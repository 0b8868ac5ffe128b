"""Job: per-layer diagnostics of a vector set on a contrast dataset (AUC, d', consistency, cosines)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.datasets import Dataset
from ..core.diagnostics import Diagnostics
from ..core.models import LoadedModel
from ..core.vectors import VectorSet
from .context import JobContext

NAME = "diagnose"
TITLE = "Diagnostics failed"


@dataclass(frozen=True)
class DiagnoseSpec:
    vectors: VectorSet = field(compare=False)
    dataset: Dataset = field(compare=False)  # held-out pairs recommended
    read: str | None = None  # default: the set's read position
    system: str | None = None
    batch_size: int = 8


def run(lm: LoadedModel, spec: DiagnoseSpec, ctx: JobContext) -> Diagnostics:
    from ..core.diagnostics import diagnose

    return diagnose(lm, spec.vectors, spec.dataset, read=spec.read, system=spec.system, batch_size=spec.batch_size,
                    progress=ctx.progress_counter("Reading hidden states"), cancel=ctx.cancel)
