"""Settings and curve points of the optimized method (issue 17), without torch (the window imports them
at start; :mod:`steerdesk.core.optimize` trains)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import SteerdeskError

#: Fewest pairs accepted: one held out for validation (early stopping), two to train on.
MIN_PAIRS = 3


@dataclass(frozen=True)
class OptimizeSettings:
    """Hyper-parameters of :func:`optimize_vectors` (defaults and their sources: docs/decisions.md).

    ``beta``: DPO/BiPO inverse temperature on summed reply log-probs (nats). ``lr``: Adam step size
    *relative* to the root-mean-square component of the layer's mean-difference vector (so the same
    value suits any model's activation scale). ``kl_weight``: weight of the neutral-text KL (nats per
    token). ``max_norm``: bound on ``|v| / |v_meandiff|``. ``epochs``: most passes over the training
    pairs; ``patience``: epochs without a better validation loss before stopping. ``batch_size``:
    pairs per step (each pair is two rows). ``val_fraction``: share of the pairs held out for
    validation. ``seed``: shuffling, directions and the validation split. ``reply_logprob``: ``"sum"``
    (BiPO/DPO: summed reply log-probs) or ``"mean"`` (per-token mean, as the held-out margin is
    scored; length-normalised as in SimPO, Meng et al. 2024, whose beta is then about 2).
    """

    beta: float = 0.1
    lr: float = 0.05
    kl_weight: float = 0.1
    max_norm: float = 2.0
    epochs: int = 10
    patience: int = 2
    batch_size: int = 8
    val_fraction: float = 0.2
    seed: int = 0
    reply_logprob: str = "sum"

    def check(self) -> None:
        """Raise ``SteerdeskError`` (one line) for a value that cannot train."""
        finite = {"beta": self.beta, "lr": self.lr, "kl_weight": self.kl_weight, "max_norm": self.max_norm}
        for name, value in finite.items():
            if not math.isfinite(value) or value < 0 or (value == 0 and name != "kl_weight"):
                raise SteerdeskError(f"Optimisation setting {name} must be a positive number, got {value}.")
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise SteerdeskError("Epochs, patience and batch size must each be at least 1.")
        if not 0.0 < self.val_fraction < 1.0:
            raise SteerdeskError(f"The validation fraction must be in (0, 1), got {self.val_fraction}.")
        if self.reply_logprob not in ("sum", "mean"):
            raise SteerdeskError(f"reply_logprob must be 'sum' or 'mean', got {self.reply_logprob!r}.")


@dataclass
class EpochReport:
    """One point of a layer's loss curves: ``epoch`` 0 is the mean-difference start (no train loss)."""

    layer: int
    epoch: int
    train_loss: float | None  # mean loss of the epoch's steps (random directions), nats
    val_loss: float  # validation loss (both directions), nats


__all__ = ["MIN_PAIRS", "OptimizeSettings", "EpochReport"]
