"""Job: an instruction in the system prompt vs the vector vs both, scored and generated."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.datasets import Dataset
from ..core.generate import SamplingSettings
from ..core.models import LoadedModel
from ..core.records import RunRecord
from ..core.versus import Versus
from .context import JobContext
from .steering_spec import SteeringSpec

NAME = "versus"
TITLE = "Comparison failed"


@dataclass(frozen=True)
class VersusSpec:
    """Score ``heldout`` and generate for ``prompt`` under four conditions: neither, the
    ``instruction`` in the system prompt, the ``steering``, both.

    For the record: ``source`` is the dataset as loaded, ``heldout_fraction`` the split that gave
    ``heldout``, ``dataset_spec`` its file (None: rows embedded), ``model`` how to load it.
    """

    heldout: Dataset = field(compare=False)
    steering: SteeringSpec
    instruction: str
    prompt: str
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    max_pairs: int | None = 16
    source: Dataset | None = field(default=None, compare=False)
    dataset_spec: str | None = None
    heldout_fraction: float = 0.0
    model: str | None = None


def run(lm: LoadedModel, spec: VersusSpec, ctx: JobContext) -> Versus:
    """Score and generate the four conditions (cancellable between forward passes)."""
    from ..core.versus import prompt_vs_vector

    return prompt_vs_vector(lm, spec.heldout, spec.steering.steers(lm), spec.instruction, spec.prompt,
                            sampling=spec.sampling, max_pairs=spec.max_pairs, cancel=ctx.cancel)


def record(lm: LoadedModel, spec: VersusSpec, result: Versus, seconds: float = 0.0) -> RunRecord:
    """The run record (``seconds``: the wall time the caller measured)."""
    from ..core.record_kinds import record_versus

    st = spec.steering
    return record_versus(lm, result, spec.source if spec.source is not None else spec.heldout, st.steers(lm),
                         vectors=st.vectors if st.identify else None, dataset_spec=spec.dataset_spec,
                         heldout=spec.heldout_fraction if spec.source else 0.0, sampling=spec.sampling,
                         max_pairs=spec.max_pairs, vector_path=st.vector_path, model=spec.model, seconds=seconds)
