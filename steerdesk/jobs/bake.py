"""Job: bake a steering (``add``, all positions) into a standalone Hugging Face checkpoint folder.

A panel builds a :class:`BakeSpec` from the steering it already shows (a :class:`SteeringSpec`)
and a folder; :func:`plan` says beforehand, cheaply, whether and how that steering can be baked
(or raises the one-line reason), :func:`run` writes the folder. What is baked and what is refused,
and why: :mod:`steerdesk.core.bake`.

What the bake records is written into the checkpoint itself (``steerdesk_bake.json`` and the
``steerdesk_bake`` entry of ``config.json``: source model, vector identity, layers, scale, mode,
limits) and returned as ``BakeResult.metadata``; there is no recipe (``RunRecord``) kind for a bake.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.bake import BakePlan, BakeResult
from ..core.models import LoadedModel
from .context import JobContext
from .steering_spec import SteeringSpec

NAME = "bake"
TITLE = "Could not bake the checkpoint"


@dataclass(frozen=True)
class BakeSpec:
    """Bake ``steering`` (vector set, layers, scale, mode, normalize, positions) into ``out_dir``.

    ``force`` replaces an existing ``out_dir`` (whole, and only once the new folder is complete).
    """

    steering: SteeringSpec
    out_dir: str
    force: bool = False


def plan(lm: LoadedModel, spec: BakeSpec) -> BakePlan:
    """How ``spec`` would be baked into ``lm`` (no weights copied, nothing written).

    Raises ``SteerdeskError`` with the reason when it cannot be baked exactly (vectors for another
    model, a layer without a direction, project / clamp, positions other than ``all``, a family
    with no bias slot and no exact Llama form).
    """
    from ..core.bake import plan_bake

    return plan_bake(lm, spec.steering.steers(lm))


def run(lm: LoadedModel, spec: BakeSpec, ctx: JobContext) -> BakeResult:
    """Bake and write the folder (progress per step; cancellable until the folder is renamed into place).

    Raises ``SteerdeskError`` (see :func:`steerdesk.core.bake.bake`) or ``Cancelled``.
    """
    from ..core.bake import bake

    st = spec.steering
    steers = st.steers(lm)  # refuses vectors made for another model and layers without a direction
    return bake(lm, steers, spec.out_dir, force=spec.force, vectors=st.vectors, vector_path=st.vector_path,
                progress=ctx.progress, cancel=ctx.cancel)
