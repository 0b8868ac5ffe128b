"""Job: compute a steering vector set (mean difference or PCA) from a contrast dataset."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..core.datasets import Dataset
from ..core.models import LoadedModel
from ..core.records import RunRecord
from ..core.vectors import VectorSet
from .context import JobContext

NAME = "compute"
TITLE = "Could not compute vectors"


@dataclass(frozen=True)
class ComputeSpec:
    """``dataset`` as loaded; with ``heldout > 0`` the vectors use only the training part of
    ``dataset.split(heldout, seed)``. ``name`` is stored in the set's metadata (window lists)."""

    dataset: Dataset = field(compare=False)
    method: str = "mean-diff"
    read: str = "last"
    batch_size: int = 8
    system: str | None = None
    heldout: float = 0.0
    seed: int = 0
    name: str | None = None
    dataset_spec: str | None = None  # how a record names the dataset again (None: embed its rows)
    output: str | None = None  # where the caller writes the set (recorded only)
    model: str | None = None


@dataclass
class ComputeResult:
    """The computed set, the pairs used and the wall time (s)."""
    vectors: VectorSet
    examples: int  # pairs used
    seconds: float


def run(lm: LoadedModel, spec: ComputeSpec, ctx: JobContext) -> ComputeResult:
    """Extract hidden states batch by batch (progress per batch, cancellable between batches)."""
    from ..core.extract import compute_vectors

    used = spec.dataset.split(spec.heldout, spec.seed)[0] if spec.heldout else spec.dataset
    t0 = time.perf_counter()
    vs = compute_vectors(lm, used, method=spec.method, read=spec.read, batch_size=spec.batch_size,
                         system=spec.system, progress=ctx.progress_counter("Extracting activations"),
                         cancel=ctx.cancel)
    if spec.name is not None:
        vs.metadata["name"] = spec.name
    return ComputeResult(vs, len(used), time.perf_counter() - t0)


def record(lm: LoadedModel, spec: ComputeSpec, result: ComputeResult) -> RunRecord:
    """The run record (a recipe ``steerdesk run`` re-runs; same vectors when deterministic)."""
    from ..core.record_kinds import record_compute

    return record_compute(lm, spec.dataset, result.vectors, dataset_spec=spec.dataset_spec, heldout=spec.heldout,
                          seed=spec.seed, batch_size=spec.batch_size, system=spec.system, output=spec.output,
                          model=spec.model, seconds=result.seconds)
