"""Job: generate for one or more prompts, each row steered or not (side-by-side comparisons)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..core.condition import ConditionGate
from ..core.errors import SteerdeskError
from ..core.generate import GenerationResult, SamplingSettings
from ..core.models import LoadedModel
from ..core.records import RunRecord
from ..core.steering import Steer
from .context import JobContext
from .steering_spec import SteeringSpec

NAME = "generate"
TITLE = "Generation failed"


@dataclass(frozen=True)
class GenerateSpec:
    """Prompts (one batch row each) and the steering of the rows flagged in ``steered_rows``.

    ``steered_rows`` defaults to every row when ``steering`` is given. ``watch`` reports, per
    generated token, the projection on each layer's direction of ``steering.vectors``. ``gate``
    (``core.condition.ConditionGate``) keeps the steering of a steered row only when the row's
    prompt opens it (decided once per row, before generation).
    """

    prompts: tuple[str, ...]
    steering: SteeringSpec | None = None
    steered_rows: tuple[bool, ...] | None = None
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    system: str | None = None
    watch: bool = False
    model: str | None = None  # how a record names the model (default: what was loaded)
    gate: ConditionGate | None = field(default=None, compare=False)  # steer a row only when its prompt opens it

    @classmethod
    def single(cls, prompt: str, steering: SteeringSpec | None = None, *, compare: bool = False,
               **kwargs: object) -> GenerateSpec:
        """One prompt, steered; with ``compare`` an unsteered row 0 goes first in the same batch."""
        if compare and steering is None:
            raise SteerdeskError("Comparing needs a vector to steer with.")
        rows = (False, True) if compare else (steering is not None,)
        return cls(prompts=(prompt,) * len(rows), steering=steering, steered_rows=rows, **kwargs)  # type: ignore[arg-type]

    def flags(self) -> list[bool]:
        """Per prompt row: steered or not (``steered_rows``, default every row when steering)."""
        if self.steered_rows is None:
            return [self.steering is not None] * len(self.prompts)
        if len(self.steered_rows) != len(self.prompts):
            raise SteerdeskError(f"Got {len(self.steered_rows)} steered flags for {len(self.prompts)} prompts.")
        return list(self.steered_rows)


@dataclass
class GenerateResult:
    """One :class:`GenerationResult` per prompt row, the steering applied and the wall time (s)."""

    rows: list[GenerationResult]
    steers: list[Steer]
    steered_rows: list[bool]
    seconds: float
    stopped: bool = False


def run(lm: LoadedModel, spec: GenerateSpec, ctx: JobContext) -> GenerateResult:
    """Generate (streams ``ctx.text`` per row and ``ctx.step`` per token); stop within one token."""
    from ..core.generate import generate

    spec.sampling.check()
    flags = spec.flags()
    steers = spec.steering.steers(lm) if spec.steering is not None else []
    if any(flags) and not steers:
        raise SteerdeskError("A steered row needs a vector and layers.")
    rows = [list(steers) if flag else [] for flag in flags]
    watch = spec.steering.vectors.directions if (spec.watch and spec.steering is not None) else None
    t0 = time.perf_counter()
    results = generate(lm, list(spec.prompts), rows, sampling=spec.sampling, system=spec.system,
                       on_text=ctx.on_text, on_step=ctx.on_step, stop=ctx.cancel, watch=watch, gate=spec.gate)
    return GenerateResult(results, steers, flags, time.perf_counter() - t0, stopped=ctx.cancel.is_set())


def record(lm: LoadedModel, spec: GenerateSpec, result: GenerateResult) -> RunRecord:
    """The run record (a recipe ``steerdesk run`` re-runs token for token when greedy; a gate is
    recorded with its condition direction and re-applied)."""
    from ..core.record_kinds import record_generation

    st = spec.steering
    return record_generation(lm, list(spec.prompts), result.rows, steers=result.steers,
                             steered_rows=result.steered_rows, sampling=spec.sampling, system=spec.system,
                             vector_path=st.vector_path if st else None,
                             vectors=st.vectors if st and st.identify else None,
                             model=spec.model, seconds=result.seconds, gate=spec.gate)
