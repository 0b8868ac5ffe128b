"""Job: an instruction in the system prompt vs the vector vs both, scored and generated."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.datasets import Dataset
from ..core.generate import SamplingSettings
from ..core.models import LoadedModel
from ..core.versus import Versus
from .context import JobContext
from .steering_spec import SteeringSpec

NAME = "versus"
TITLE = "Comparison failed"


@dataclass(frozen=True)
class VersusSpec:
    heldout: Dataset = field(compare=False)
    steering: SteeringSpec
    instruction: str
    prompt: str
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    max_pairs: int | None = 16


def run(lm: LoadedModel, spec: VersusSpec, ctx: JobContext) -> Versus:
    from ..core.versus import prompt_vs_vector

    return prompt_vs_vector(lm, spec.heldout, spec.steering.steers(lm), spec.instruction, spec.prompt,
                            sampling=spec.sampling, max_pairs=spec.max_pairs, cancel=ctx.cancel)
