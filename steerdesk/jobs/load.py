"""Job: load a model (Hugging Face id, local folder, ``.gguf`` file, or ``default``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.models import LoadedModel
from .context import JobContext

NAME = "load"
TITLE = "Could not load the model"


@dataclass(frozen=True)
class LoadSpec:
    """What :func:`steerdesk.core.models.load_model` takes."""

    spec: str = "default"
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    trust_remote_code: bool = False
    quantize: str = "none"  # "int8" / "int4": weight-only quantised linears, lossy CPU decode speed modes


def run(lm: LoadedModel | None, spec: LoadSpec, ctx: JobContext) -> LoadedModel:
    """Load ``spec.spec``; ``lm`` (the model loaded so far) is not used. Progress: the phases
    (a first-load conversion, tokenizer, weights) as ``done/total`` with what is happening."""
    from ..core.models import load_model

    return load_model(spec.spec, device=spec.device, dtype=spec.dtype, device_map=spec.device_map,
                      trust_remote_code=spec.trust_remote_code, progress=lambda msg: ctx.progress(0, 0, msg),
                      steps=ctx.progress, quantize=spec.quantize)
