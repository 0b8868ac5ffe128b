"""How a job names its steering: a vector set, layers and settings (one home for that check)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.models import LoadedModel
from ..core.steering import Steer
from ..core.vectors import VectorSet


@dataclass(frozen=True)
class LayerSteer:
    """Settings of one layer when they differ between layers (a hand-written or older recipe)."""

    scale: float = 1.0
    mode: str = "add"
    normalize: bool = False
    positions: str = "all"


@dataclass(frozen=True)
class SteeringSpec:
    """Steer ``layers`` of a model with ``vectors`` at ``scale`` (same settings at each layer).

    ``per_layer`` (one :class:`LayerSteer` per entry of ``layers``) overrides the shared
    settings layer by layer. ``vector_path`` only names the file in records; ``identify=False``
    keeps the set's identity out of records (vectors rebuilt from a recipe's embedded values).
    Conventions: ``steerdesk.core.steering``.
    """

    vectors: VectorSet = field(compare=False)
    layers: tuple[int, ...]
    scale: float = 1.0
    mode: str = "add"
    normalize: bool = False
    positions: str = "all"
    vector_path: str | None = None
    per_layer: tuple[LayerSteer, ...] | None = None
    identify: bool = True

    def steers(self, lm: LoadedModel) -> list[Steer]:
        """The :class:`Steer` list for ``lm``, in the order of ``layers``.

        Raises ``SteerdeskError`` when the vectors were made for another model, a layer is out
        of range or has no direction (no silent no-op). Settings that cannot be applied (mode, scale,
        positions) are refused when the steering is installed (``core.steering.Steering``).
        """
        self.vectors.check_compatible(lm.info)
        if self.per_layer is None:
            return self.vectors.steers(list(self.layers), scale=self.scale, mode=self.mode, normalize=self.normalize,
                                       positions=self.positions)  # each Steer is checked once, by ``Steering``
        from ..core.errors import SteerdeskError

        if len(self.per_layer) != len(self.layers):
            raise SteerdeskError(f"Got settings for {len(self.per_layer)} layers, but {len(self.layers)} layers.")
        self.vectors.require_layers(sorted(set(self.layers)))
        return [Steer(layer=layer, vector=self.vectors.directions[layer], scale=s.scale, mode=s.mode,
                      normalize=s.normalize, positions=s.positions) for layer, s in zip(self.layers, self.per_layer)]
