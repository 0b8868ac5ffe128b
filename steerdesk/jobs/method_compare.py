"""Job: mean-diff vs PCA vs optimized vs prompting on held-out pairs (issue 17, item 3)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..core.datasets import Dataset
from ..core.errors import SteerdeskError
from ..core.method_compare import METHODS, MethodComparison
from ..core.models import LoadedModel
from ..core.optimize import OptimizeSettings
from ..core.records import RunRecord
from ..core.sweep_result import DEFAULT_BUDGET
from ..core.vectors import VectorSet
from .context import JobContext

NAME = "compare"
TITLE = "Method comparison failed"


@dataclass(frozen=True)
class CompareSpec:
    """Split ``dataset`` (``heldout`` fraction, ``seed``: :meth:`Dataset.split`), compute ``methods`` from
    the training part, sweep each on the held-out part over ``layers`` x ``scales`` and keep its best
    margin delta within ``budget`` (nats/token); ``instruction`` adds the prompt baseline. ``extra``
    adds ready vector sets (name, set) as rows swept alike (e.g. the vector file being inspected).
    ``optimize``: settings of the optimized method (None: defaults). For the record: ``dataset_spec``
    names the dataset file (None: its rows are embedded), ``model`` how to load the model again."""

    dataset: Dataset = field(compare=False)
    layers: tuple[int, ...]
    scales: tuple[float, ...]
    heldout: float = 0.25
    seed: int = 0
    budget: float = DEFAULT_BUDGET
    instruction: str | None = None
    methods: tuple[str, ...] = METHODS
    extra: tuple[tuple[str, VectorSet], ...] = field(default=(), compare=False)
    optimize: OptimizeSettings | None = None
    read: str = "last"
    batch_size: int = 8
    max_pairs: int | None = None
    dataset_spec: str | None = None
    model: str | None = None


def run(lm: LoadedModel, spec: CompareSpec, ctx: JobContext) -> MethodComparison:
    """Compute, sweep and reduce (progress per stage; each optimisation epoch's
    :class:`~steerdesk.core.optimize.EpochReport` goes to ``ctx.partial``; cancellable).
    Raises ``SteerdeskError`` for a held-out fraction outside (0, 1) and whatever
    :func:`~steerdesk.core.method_compare.compare_methods` raises."""
    from ..core.method_compare import compare_methods

    if not 0.0 < spec.heldout < 1.0:
        raise SteerdeskError("Comparing methods needs held-out pairs: choose a held-out fraction in (0, 1).")
    train, held = spec.dataset.split(spec.heldout, spec.seed)
    return compare_methods(lm, train, held, layers=spec.layers, scales=spec.scales, budget=spec.budget,
                           instruction=spec.instruction, methods=spec.methods, extra=dict(spec.extra),
                           optimize=spec.optimize, read=spec.read, batch_size=spec.batch_size,
                           max_pairs=spec.max_pairs, progress=ctx.progress_counter("Comparing methods"),
                           on_epoch=ctx.partial, cancel=ctx.cancel)


def record(lm: LoadedModel, spec: CompareSpec, result: MethodComparison, seconds: float = 0.0) -> RunRecord:
    """The run record (a recipe ``steerdesk run`` re-runs; ``seconds``: the wall time the caller
    measured). The optimized method's settings are recorded as used (defaults filled in)."""
    from ..core.record_kinds import record_compare

    optimize = asdict(spec.optimize or OptimizeSettings()) if "optimized" in spec.methods else None
    return record_compare(lm, result, spec.dataset, dataset_spec=spec.dataset_spec, heldout=spec.heldout,
                          seed=spec.seed, methods=spec.methods, instruction=spec.instruction, optimize=optimize,
                          read=spec.read, batch_size=spec.batch_size, max_pairs=spec.max_pairs,
                          extra=spec.extra, model=spec.model, seconds=seconds)
