"""Job: per-layer diagnostics of a vector set on a contrast dataset (AUC, d', consistency, cosines)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.datasets import Dataset
from ..core.diagnostics import Diagnostics
from ..core.models import LoadedModel
from ..core.records import RunRecord
from ..core.vectors import VectorSet
from .context import JobContext

NAME = "diagnose"
TITLE = "Diagnostics failed"


@dataclass(frozen=True)
class DiagnoseSpec:
    """Read ``dataset`` (held-out pairs recommended) and score each layer's direction of ``vectors``.

    For the record: ``source`` is the dataset as loaded and ``heldout_fraction`` the split that
    gave ``dataset`` (its held-out part); ``dataset_spec`` names the file (None: rows embedded);
    ``vector_path`` the vector file (None: the directions are embedded); ``model`` how to load it.
    """

    vectors: VectorSet = field(compare=False)
    dataset: Dataset = field(compare=False)  # held-out pairs recommended
    read: str | None = None  # default: the set's read position
    system: str | None = None
    batch_size: int = 8
    source: Dataset | None = field(default=None, compare=False)
    dataset_spec: str | None = None
    heldout_fraction: float = 0.0
    vector_path: str | None = None
    model: str | None = None


def run(lm: LoadedModel, spec: DiagnoseSpec, ctx: JobContext) -> Diagnostics:
    """Diagnose (progress per batch, cancellable between batches)."""
    from ..core.diagnostics import diagnose

    return diagnose(lm, spec.vectors, spec.dataset, read=spec.read, system=spec.system, batch_size=spec.batch_size,
                    progress=ctx.progress_counter("Reading hidden states"), cancel=ctx.cancel)


def record(lm: LoadedModel, spec: DiagnoseSpec, result: Diagnostics, seconds: float = 0.0) -> RunRecord:
    """The run record (``seconds``: the wall time the caller measured)."""
    from ..core.record_kinds import record_diagnose

    return record_diagnose(lm, result, spec.source if spec.source is not None else spec.dataset, spec.vectors,
                           dataset_spec=spec.dataset_spec, heldout=spec.heldout_fraction if spec.source else 0.0,
                           read=spec.read, system=spec.system, batch_size=spec.batch_size,
                           vector_path=spec.vector_path, model=spec.model, seconds=seconds)
