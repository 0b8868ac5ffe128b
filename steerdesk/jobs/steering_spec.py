"""How a job names its steering: a vector set, layers and settings (one home for that check)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.models import LoadedModel
from ..core.steering import Steer
from ..core.vectors import VectorSet


@dataclass(frozen=True)
class SteeringSpec:
    """Steer ``layers`` of a model with ``vectors`` at ``scale`` (same settings at each layer).

    ``vector_path`` only names the file in records. Conventions: ``steerdesk.core.steering``.
    """

    vectors: VectorSet = field(compare=False)
    layers: tuple[int, ...]
    scale: float = 1.0
    mode: str = "add"
    normalize: bool = False
    positions: str = "all"
    vector_path: str | None = None

    def steers(self, lm: LoadedModel) -> list[Steer]:
        """The :class:`Steer` list for ``lm``.

        Raises ``SteerdeskError`` when the vectors were made for another model, a layer is out
        of range or has no direction (no silent no-op). Settings that cannot be applied (mode, scale,
        positions) are refused when the steering is installed (``core.steering.Steering``).
        """
        self.vectors.check_compatible(lm.info)
        return self.vectors.steers(list(self.layers), scale=self.scale, mode=self.mode, normalize=self.normalize,
                                   positions=self.positions)  # each Steer is checked once, by ``Steering``
