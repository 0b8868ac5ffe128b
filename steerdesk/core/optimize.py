"""Preference-optimised steering vectors (issue 17): start from the mean difference, train the vector.

For each chosen layer ``L`` (block output, as everywhere in steerdesk) one vector ``v`` is trained on
the contrast pairs, the model frozen:

* **preference loss** (BiPO, Cao et al. 2024, in the DPO form of Rafailov et al. 2023): for a pair
  with base reply ``yB``, target reply ``yT`` and direction ``d`` in {+1, -1}::

      z = beta * d * [(log p_dv(yT) - log p_0(yT)) - (log p_dv(yB) - log p_0(yB))]
      loss = -log sigmoid(z)

  ``log p_dv(y)`` is the summed log-probability of the reply tokens given the prompt with ``d * v``
  added at every position of block ``L``'s output (steerdesk's ``add`` at scale 1); ``p_0`` is the
  unsteered model (the reference, computed once). ``d = +1`` asks ``+v`` to favour the target reply,
  ``d = -1`` asks ``-v`` to favour the base reply. During training ``d`` is drawn per pair and epoch
  (as BiPO does); the validation and reported losses average both directions (deterministic).
* **KL penalty**: ``kl_weight`` times the mean over the reply tokens of the neutral texts
  (:data:`~steerdesk.core.evaluate.NEUTRAL_TEXTS`) of KL(unsteered || steered), with ``+v`` and ``-v``
  alternating over the texts (both signs over the validation computation);
* **norm bound**: after every step ``v`` is projected back into ``|v| <= max_norm * |v_meandiff|``;
* **early stopping**: a validation split carved from the training pairs (``val_fraction``, at least
  one pair; at least two pairs train) is scored before training and after every epoch; the vector
  with the lowest validation loss is kept (the mean difference itself if no epoch beats it) and
  training stops after ``patience`` epochs without improvement.

Only the vector is trained: the model is put in eval mode and every parameter's ``requires_grad`` is
False during training (both restored afterwards); the optimiser (Adam) only holds ``v``, so the
weights are bit-identical afterwards. Shuffling and directions come from a ``torch.Generator``
seeded with ``seed``: the same seed gives the same vector (on the same machine and thread count).

Steering hook: :class:`~steerdesk.core.steering.Steering` detaches its vectors (``_make_op``) and the
scorers run it under ``torch.inference_mode``, so no gradient could reach ``v`` through it;
:class:`AddVector` is a minimal differentiable ``add`` hook used here instead (same convention: the
output of block ``L``, every position, ``h + sign_row * v``).

Speed (issue 17's 3-minute target): by default a layer trains on the **prefix cache**
(:mod:`steerdesk.core.optimize_steps`): block ``L``'s unsteered output is recorded once per text, and
every step and validation pass runs only blocks ``L+1..end`` and the LM head at the scored tokens,
from ``recorded + sign * v``. Same loss and gradient as the hook path up to float rounding; checked
against the model before a layer uses it, with the hook path as the fallback.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .datasets import Dataset
from .errors import SteerdeskError
from .evaluate import NEUTRAL_TEXTS
from .extract import Encoded, compute_vectors, encode
from .memory import oom_guard
from .models import LoadedModel
from .optimize_settings import MIN_PAIRS, EpochReport, OptimizeSettings
from .optimize_steps import AddVector, StepScorer, check_cancel, frozen, neutral_kl, steered
from .vectors import VectorSet

Progress = Callable[[int, int], None]


@dataclass
class LayerCurve:
    """Training curve and outcome of one layer."""

    train: list[float] = field(default_factory=list)  # per epoch (1..n)
    val: list[float] = field(default_factory=list)  # per epoch (0..n), 0 = mean difference
    best_epoch: int = 0  # 0: no epoch beat the mean difference, it was kept
    stopped: str = "max_epochs"  # or "early"
    seed_norm: float = 0.0
    final_norm: float = 0.0
    path: str = "hooks"  # "prefix": trained on the prefix cache (blocks L+1..end only), "hooks": full forwards


# ================================================================================ training

def _split(n: int, settings: OptimizeSettings) -> tuple[list[int], list[int]]:
    """(train, validation) pair indices, seeded; refuses sets too small to hold out."""
    if n < MIN_PAIRS:
        raise SteerdeskError(
            f"Optimising a vector needs at least {MIN_PAIRS} pairs, this set has {n}: at least one pair is "
            f"held out for validation (early stopping) and two train the vector. Add pairs, or use mean-diff.")
    n_val = min(max(1, int(round(n * settings.val_fraction))), n - 2)
    g = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(n, generator=g).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


class _Trainer:
    """One optimisation: the split, the settings and the :class:`~steerdesk.core.optimize_steps.StepScorer`
    (references, and the prefix caches of ``cache_layers``; empty: every layer trains through the hook)."""

    def __init__(self, lm: LoadedModel, pairs: list[tuple[Encoded, Encoded]], train: list[int], val: list[int],
                 settings: OptimizeSettings, neutral: Sequence[str], system: str | None,
                 cancel: threading.Event | None, cache_layers: Sequence[int] = ()):
        self.lm, self.pairs, self.train, self.val, self.s, self.cancel = lm, pairs, train, val, settings, cancel
        self.scorer = StepScorer(lm, pairs, settings, neutral, system, cancel, cache_layers)
        self.ref = self.scorer.ref
        self.neutral = self.scorer.neutral

    def loss(self, layer: int, v: torch.Tensor, idx: Sequence[int], dirs: torch.Tensor,
             kl_signs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean preference loss, KL term) over pairs ``idx`` with directions ``dirs`` ``[P]`` of +-1 and
        neutral signs ``kl_signs`` ``[texts]`` (None: no KL term); scalars on the CPU, differentiable in
        ``v``. The path is ``self.scorer.paths[layer]`` (hooks unless ``prepare`` chose the prefix cache)."""
        p = len(idx)
        sums = self.scorer.pair_sums(layer, v, idx, torch.cat([dirs, dirs])).cpu()
        ref = self.ref[list(idx)]
        gain = (sums[p:] - ref[:, 1]) - (sums[:p] - ref[:, 0])
        pref = -F.logsigmoid(self.s.beta * dirs.float() * gain).mean()
        kl = torch.zeros(())
        if self.neutral is not None and kl_signs is not None:
            kl = neutral_kl(self.neutral, self.scorer.neutral_logp(layer, v, kl_signs))
        return pref, kl

    def full_loss(self, layer: int, v: torch.Tensor, idx: Sequence[int]) -> float:
        """Deterministic loss over ``idx``: preference averaged over both directions + weighted KL of both
        signs (no gradient)."""
        bs = self.s.batch_size
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(idx), bs):
                check_cancel(self.cancel)
                chunk = list(idx[start:start + bs])
                for d in (1.0, -1.0):
                    dirs = torch.full((len(chunk),), d)
                    pref, _ = self.loss(layer, v, chunk, dirs, None)
                    total += float(pref) * len(chunk) / 2
            kl = 0.0
            if self.neutral is not None:
                n = self.neutral.lay.rows
                for d in (1.0, -1.0):
                    check_cancel(self.cancel)
                    kl += float(neutral_kl(self.neutral, self.scorer.neutral_logp(layer, v, torch.full((n,), d)))) / 2
        return total / max(1, len(idx)) + self.s.kl_weight * kl

    def steps_per_epoch(self) -> int:
        return -(-len(self.train) // self.s.batch_size)

    def train_layer(self, layer: int, seed_vec: torch.Tensor, tick: Callable[[], None],
                    on_epoch: Callable[[EpochReport], None] | None) -> tuple[torch.Tensor, LayerCurve]:
        """Train one layer's vector from ``seed_vec`` ``[H]``; returns (best vector on the CPU, curve)."""
        s = self.s
        device = next(self.lm.blocks[layer].parameters()).device
        seed_vec = seed_vec.detach().float()
        bound = s.max_norm * float(seed_vec.norm())
        if not bound > 0:
            raise SteerdeskError(f"The mean difference at layer {layer} is zero: there is nothing to start from.")
        rms = float(seed_vec.norm()) / math.sqrt(seed_vec.numel())
        curve = LayerCurve(seed_norm=float(seed_vec.norm()))
        curve.path = self.scorer.prepare(layer, seed_vec, self.train)
        v = seed_vec.to(device).clone().requires_grad_(True)
        opt = torch.optim.Adam([v], lr=s.lr * rms)
        g = torch.Generator().manual_seed(s.seed * 1000003 + layer)
        best_val = self.full_loss(layer, v.detach(), self.val)
        best = v.detach().cpu().clone()
        curve.val.append(best_val)
        if on_epoch:
            on_epoch(EpochReport(layer, 0, None, best_val))
        bad = 0
        n_neutral = self.neutral.lay.rows if self.neutral is not None else 0
        step = 0
        for epoch in range(1, s.epochs + 1):
            perm = torch.randperm(len(self.train), generator=g).tolist()
            dirs_all = torch.randint(0, 2, (len(self.train),), generator=g).float() * 2 - 1
            epoch_loss = 0.0
            for start in range(0, len(perm), s.batch_size):
                check_cancel(self.cancel)
                sel = perm[start:start + s.batch_size]
                idx = [self.train[i] for i in sel]
                kl_signs = (torch.arange(n_neutral) + step) % 2 * -2.0 + 1.0 if n_neutral else None
                opt.zero_grad(set_to_none=True)
                with oom_guard("optimising a vector", f"try a batch size below {s.batch_size}."):
                    pref, kl = self.loss(layer, v, idx, dirs_all[sel], kl_signs)
                    loss = pref + s.kl_weight * kl
                    loss.backward()
                opt.step()
                with torch.no_grad():
                    norm = float(v.norm())
                    if norm > bound:
                        v.mul_(bound / norm)
                epoch_loss += float(loss.detach()) * len(idx)
                step += 1
                tick()
            val_loss = self.full_loss(layer, v.detach(), self.val)
            curve.train.append(epoch_loss / len(self.train))
            curve.val.append(val_loss)
            if on_epoch:
                on_epoch(EpochReport(layer, epoch, curve.train[-1], val_loss))
            if val_loss < best_val:
                best_val, best, bad = val_loss, v.detach().cpu().clone(), 0
                curve.best_epoch = epoch
            else:
                bad += 1
                if bad >= s.patience:
                    curve.stopped = "early"
                    break
        self.scorer.caches.pop(layer, None)
        curve.final_norm = float(best.norm())
        return best, curve


def pair_encodings(lm: LoadedModel, dataset: Dataset, system: str | None = None) -> list[tuple[Encoded, Encoded]]:
    """(base, target) encodings of every pair of a paired dataset (chat template applied)."""
    enc = encode(lm, [(e.prompt, e.base) for e in dataset.examples] +
                 [(e.prompt, e.target) for e in dataset.examples], system)
    n = len(dataset.examples)
    return list(zip(enc[:n], enc[n:]))


def preference_loss(lm: LoadedModel, dataset: Dataset, layer: int, vector: torch.Tensor, *,
                    settings: OptimizeSettings | None = None, system: str | None = None,
                    neutral: Sequence[str] = NEUTRAL_TEXTS) -> float:
    """The deterministic objective of :func:`optimize_vectors` for ``vector`` ``[H]`` at block ``layer``
    over all pairs of ``dataset``: the preference loss averaged over both directions plus
    ``kl_weight`` times the neutral-text KL (nats). For tests and reports; no gradient."""
    s = settings or OptimizeSettings()
    pairs = pair_encodings(lm, dataset, system)
    idx = list(range(len(pairs)))
    with frozen(lm.model):
        trainer = _Trainer(lm, pairs, idx, idx, s, neutral, system, None)
        device = next(lm.blocks[layer].parameters()).device
        return trainer.full_loss(layer, vector.detach().float().to(device), idx)


def optimize_vectors(
    lm: LoadedModel,
    dataset: Dataset,
    layers: Sequence[int],
    *,
    settings: OptimizeSettings | None = None,
    read: str = "last",
    batch_size: int = 8,
    system: str | None = None,
    neutral: Sequence[str] = NEUTRAL_TEXTS,
    progress: Progress | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    cancel: threading.Event | None = None,
    prefix_cache: bool = True,
) -> VectorSet:
    """A :class:`~steerdesk.core.vectors.VectorSet` of preference-optimised vectors for ``layers``.

    Each layer is trained on its own (the set is used one layer at a time), starting from the mean
    difference of the training pairs (``read`` position, ``batch_size`` for that extraction). The set
    has directions ``[num_layers, H]`` (float32) only at ``layers``; the other layers are absent.
    ``metadata["method"]`` is ``"optimized"``, ``metadata["optimize"]`` a JSON object with the
    settings, the split and each layer's loss curves (nats). ``progress(done, total)`` counts
    optimiser steps (``total`` assumes no early stop); ``on_epoch`` receives each curve point.
    ``prefix_cache``: train on recorded block outputs (blocks ``L+1..end`` per step, checked against
    the model first; see the module docstring), False: full forwards through the hook every step (the
    same vector up to float rounding, slower). Each layer's ``path`` in the curves says which ran.

    Raises ``SteerdeskError`` for an unpaired dataset, fewer than :data:`MIN_PAIRS` pairs, a layer out
    of range, an int8-quantised model (its product has no gradient) or bad settings; ``Cancelled``
    when ``cancel`` is set (checked before every forward pass; nothing is returned).
    """
    from .parsing import check_layers
    from .quantize import Int8Linear

    s = settings or OptimizeSettings()
    s.check()
    dataset.validate()
    if not dataset.paired:
        raise SteerdeskError("Optimising a vector needs paired examples (a base and a target reply per row).")
    layers = sorted({int(x) for x in layers})
    if not layers:
        raise SteerdeskError("Choose at least one layer to optimise (e.g. --layers 12).")
    check_layers(layers, lm.info.num_layers)
    if any(isinstance(m, Int8Linear) for m in lm.model.modules()):
        raise SteerdeskError("Optimising a vector needs gradients, which the int8 mode does not have: "
                             "load the model without --quantize int8.")
    train, val = _split(len(dataset), s)
    train_ds = Dataset([dataset.examples[i] for i in train], name=dataset.name, paired=True)
    check_cancel(cancel)
    seed_set: VectorSet = compute_vectors(lm, train_ds, method="mean-diff", read=read, batch_size=batch_size,
                                          system=system, cancel=cancel, keep_reads=True)
    pairs = pair_encodings(lm, dataset, system)
    curves: dict[int, LayerCurve] = {}
    directions = torch.zeros_like(seed_set.directions)
    with frozen(lm.model):
        trainer = _Trainer(lm, pairs, train, val, s, neutral, system, cancel,
                           cache_layers=layers if prefix_cache else ())
        total = trainer.steps_per_epoch() * s.epochs * len(layers)
        done = [0]

        def tick() -> None:
            done[0] += 1
            if progress:
                progress(done[0], total)

        for i, layer in enumerate(layers):
            vec, curves[layer] = trainer.train_layer(layer, seed_set.directions[layer], tick, on_epoch)
            directions[layer] = vec
            done[0] = trainer.steps_per_epoch() * s.epochs * (i + 1)
            if progress:
                progress(done[0], total)
    present = torch.zeros(directions.shape[0], dtype=torch.bool)
    present[layers] = True
    unit = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    ext = seed_set.extraction
    metadata = dict(seed_set.metadata)
    metadata.update({
        "method": "optimized",
        "dataset_sha256": dataset.sha256(),
        "dataset_name": dataset.name,
        "num_examples": str(len(dataset)),
        "optimize": json.dumps({
            "loss": "BiPO preference (DPO form, unsteered reference) + kl_weight * KL on neutral texts",
            "settings": asdict(s),
            "seed_method": "mean-diff",
            "layers": layers,
            "train_pairs": len(train),
            "validation_pairs": len(val),
            "neutral_texts": trainer.neutral.lay.rows if trainer.neutral is not None else 0,
            "curves": {str(k): {"train": [round(x, 6) for x in c.train], "val": [round(x, 6) for x in c.val],
                                "best_epoch": c.best_epoch, "stopped": c.stopped,
                                "seed_norm": round(c.seed_norm, 6), "final_norm": round(c.final_norm, 6),
                                "path": c.path}
                       for k, c in curves.items()},
        }),
    })
    return VectorSet(directions=directions.contiguous(), norms=seed_set.norms.contiguous(), metadata=metadata,
                     proj_base=torch.einsum("nlh,lh->ln", ext.base, unit).contiguous(),
                     proj_target=torch.einsum("nlh,lh->ln", ext.target, unit).contiguous(), present=present)


__all__ = ["MIN_PAIRS", "OptimizeSettings", "EpochReport", "LayerCurve", "AddVector", "frozen", "steered",
           "optimize_vectors", "preference_loss", "pair_encodings"]
