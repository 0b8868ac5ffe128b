"""Job: condition vectors (optional) and the calibration of a CAST gate on labelled prompts."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..core.condition import Calibration, ConditionSet
from ..core.errors import SteerdeskError
from ..core.models import LoadedModel
from ..core.vectors import VectorSet
from .context import JobContext

NAME = "calibrate"
TITLE = "Calibration failed"


@dataclass(frozen=True)
class CalibrateSpec:
    """Calibrate the gate of ``conditions`` on ``dataset``'s held-out prompts (all its prompts if it
    has no held-out split).

    ``conditions`` None: compute condition vectors first from the dataset's ``train`` split with
    ``read`` (``"mean"`` over prompt tokens or the ``"last"`` one). ``layers`` None: every layer
    with a direction; ``num_thresholds`` thresholds per layer (``core.condition.calibrate``).
    """

    dataset: ConditionSet = field(compare=False)
    conditions: VectorSet | None = field(default=None, compare=False)
    read: str = "mean"
    layers: tuple[int, ...] | None = None
    num_thresholds: int = 50
    system: str | None = None
    batch_size: int = 16


@dataclass
class CalibrateResult:
    """The calibration, the condition vectors used (computed or given), whether they were computed,
    the number of prompts calibrated on, and the wall time (s)."""

    calibration: Calibration
    conditions: VectorSet
    computed: bool
    num_prompts: int
    seconds: float


def run(lm: LoadedModel, spec: CalibrateSpec, ctx: JobContext) -> CalibrateResult:
    """Compute condition vectors when none are given, then calibrate (progress per batch; cancellable
    between batches). Raises ``SteerdeskError`` for a dataset without both kinds of prompts."""
    from ..core.condition import calibrate, compute_condition_vectors

    def counter(message: str) -> Callable[[int, int], None]:
        report = ctx.progress_counter(message)

        def progress(done: int, total: int) -> None:
            ctx.check()
            report(done, total)
        return progress

    t0 = time.perf_counter()
    conditions, computed = spec.conditions, False
    if conditions is None:
        train = spec.dataset.part("train")
        if not train.positives() or not train.negatives():
            raise SteerdeskError("Computing condition vectors needs on- and off-condition prompts in the train split.")
        conditions = compute_condition_vectors(lm, train.positives(), train.negatives(), read=spec.read,
                                               system=spec.system, name=spec.dataset.name,
                                               batch_size=spec.batch_size, progress=counter("Condition vectors"))
        computed = True
    held = spec.dataset.part("heldout")
    if not held.prompts:
        held = spec.dataset
    cal = calibrate(lm, conditions, held.prompts, held.labels,
                    layers=list(spec.layers) if spec.layers is not None else None,
                    num_thresholds=spec.num_thresholds, system=spec.system, batch_size=spec.batch_size,
                    progress=counter("Scoring prompts"))
    return CalibrateResult(cal, conditions, computed, len(held.prompts), time.perf_counter() - t0)
