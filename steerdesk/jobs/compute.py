"""Job: compute a steering vector set (mean difference, PCA, or preference-optimised) from a contrast dataset."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from ..core.datasets import Dataset
from ..core.errors import SteerdeskError
from ..core.models import LoadedModel
from ..core.optimize import OptimizeSettings
from ..core.records import RunRecord
from ..core.vectors import VectorSet
from .context import JobContext

NAME = "compute"
TITLE = "Could not compute vectors"


@dataclass(frozen=True)
class ComputeSpec:
    """``dataset`` as loaded; with ``heldout > 0`` the vectors use only the training part of
    ``dataset.split(heldout, seed)``. ``name`` is stored in the set's metadata (window lists).

    ``method="optimized"`` (issue 17) trains one vector per layer of ``layers`` (required) with
    ``optimize`` (None: :class:`~steerdesk.core.optimize.OptimizeSettings` defaults); its validation
    split is carved from the pairs used. ``layers`` is refused with the other methods (they compute
    every layer)."""

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
    layers: tuple[int, ...] | None = None  # method "optimized" only
    optimize: OptimizeSettings | None = None  # method "optimized" only


@dataclass
class ComputeResult:
    """The computed set, the pairs used and the wall time (s)."""
    vectors: VectorSet
    examples: int  # pairs used
    seconds: float


def run(lm: LoadedModel, spec: ComputeSpec, ctx: JobContext) -> ComputeResult:
    """Extract hidden states batch by batch (progress per batch, cancellable between batches).

    ``optimized``: progress counts optimiser steps, each epoch's
    :class:`~steerdesk.core.optimize.EpochReport` (loss curves) goes to ``ctx.partial``, and a cancel
    raises ``Cancelled`` before any vector exists (nothing is returned, so nothing can be written).
    Raises ``SteerdeskError`` for ``optimized`` without layers, or layers with another method.
    """
    from ..core.extract import compute_vectors

    if spec.method == "optimized" and not spec.layers:
        raise SteerdeskError("The optimized method trains chosen layers: give the layers (e.g. --layers 12).")
    if spec.method != "optimized" and spec.layers:
        raise SteerdeskError(f"Layers are chosen only for the optimized method; {spec.method} computes every layer.")
    used = spec.dataset.split(spec.heldout, spec.seed)[0] if spec.heldout else spec.dataset
    t0 = time.perf_counter()
    if spec.method == "optimized":
        from ..core.optimize import optimize_vectors

        vs = optimize_vectors(lm, used, list(spec.layers or ()), settings=spec.optimize, read=spec.read,
                              batch_size=spec.batch_size, system=spec.system,
                              progress=ctx.progress_counter("Optimising vectors"), on_epoch=ctx.partial,
                              cancel=ctx.cancel)
    else:
        vs = compute_vectors(lm, used, method=spec.method, read=spec.read, batch_size=spec.batch_size,
                             system=spec.system, progress=ctx.progress_counter("Extracting activations"),
                             cancel=ctx.cancel)
    if spec.name is not None:
        vs.metadata["name"] = spec.name
    return ComputeResult(vs, len(used), time.perf_counter() - t0)


def record(lm: LoadedModel, spec: ComputeSpec, result: ComputeResult) -> RunRecord:
    """The run record (a recipe ``steerdesk run`` re-runs; same vectors when deterministic)."""
    from ..core.record_kinds import record_compute

    optimized = spec.method == "optimized"
    return record_compute(lm, spec.dataset, result.vectors, dataset_spec=spec.dataset_spec, heldout=spec.heldout,
                          seed=spec.seed, batch_size=spec.batch_size, system=spec.system, output=spec.output,
                          model=spec.model, seconds=result.seconds,
                          trained_layers=spec.layers if optimized else None,
                          optimize=asdict(spec.optimize or OptimizeSettings()) if optimized else None)
