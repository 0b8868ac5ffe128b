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
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .datasets import Dataset
from .errors import Cancelled, SteerdeskError
from .evaluate import NEUTRAL_TEXTS, model_logits
from .extract import Encoded, compute_vectors, encode
from .layouts import Layout, make_layout
from .memory import oom_guard
from .models import LoadedModel
from .optimize_settings import MIN_PAIRS, EpochReport, OptimizeSettings
from .steering import block_hidden
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


# ================================================================================ the hook

class AddVector:
    """Differentiable steering hook: adds ``signs[row] * vector`` to block ``layer``'s output.

    ``vector`` ``[H]`` (float32, may require grad); ``signs`` ``[B]`` per batch row, or None for +1
    on every row. Added at every position (steerdesk's ``add`` mode at scale 1, positions ``all``),
    in the block's dtype. Used as a context manager; the hook is removed on exit, even on error.
    """

    def __init__(self, lm: LoadedModel, layer: int, vector: torch.Tensor, signs: torch.Tensor | None = None):
        self.block = lm.blocks[layer]
        self.vector = vector
        self.signs = signs
        self._handle: Any = None

    def _hook(self, module: Any, args: Any, output: Any) -> Any:
        h = block_hidden(output)
        v = self.vector.to(device=h.device)
        add = v.view(1, 1, -1) if self.signs is None else self.signs.to(h.device, v.dtype).view(-1, 1, 1) * v
        new = (h.float() + add).to(h.dtype) if h.dtype != torch.float32 else h + add
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    def __enter__(self) -> AddVector:
        self._handle = self.block.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and ``requires_grad=False`` on every parameter inside; both restored on exit."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


# ============================================================================ log-probs

def _reply_logprobs(lm: LoadedModel, lay: Layout, steer: AddVector | None, full: bool = False,
                    mean: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (``mean``: per-token mean) reply log-prob per row ``[rows]`` (float32, differentiable)
    and, with ``full``, the ``[N, V]`` log-softmax at the scored tokens (else an empty tensor)."""
    if steer is None:
        logits, lo = model_logits(lm, lay.ids, lay.mask, lay.positions, lay.keep())
    else:
        with steer:
            logits, lo = model_logits(lm, lay.ids, lay.mask, lay.positions, lay.keep())
    rows = lay.src_row.to(logits.device)
    cols = (lay.src_col - lo).to(logits.device)
    logp = logits[rows, cols].float().log_softmax(-1)
    tok_lp = logp.gather(-1, lay.tok.to(logp.device)[:, None]).squeeze(-1)
    sums = torch.zeros(lay.rows, dtype=torch.float32, device=tok_lp.device).index_add(0, rows, tok_lp)
    if mean:
        sums = sums / lay.counts.to(sums.device)
    return sums, (logp if full else torch.empty(0))


def _pair_layout(lm: LoadedModel, pairs: Sequence[tuple[Encoded, Encoded]]) -> Layout:
    """Rows ``[base_0..base_{P-1}, target_0..target_{P-1}]``, replies aligned."""
    items = [b for b, _ in pairs] + [t for _, t in pairs]
    return make_layout(items, list(range(len(items))), lm.tokenizer.pad_token_id, lm.input_device)


def _pair_losses(lm: LoadedModel, layer: int, v: torch.Tensor, pairs: Sequence[tuple[Encoded, Encoded]],
                 ref: torch.Tensor, dirs: torch.Tensor, beta: float, mean: bool = False) -> torch.Tensor:
    """Per-pair preference loss ``[P]`` (differentiable in ``v``); ``ref`` ``[P, 2]`` (base, target)
    unsteered summed (``mean``: per-token mean) log-probs, ``dirs`` ``[P]`` of +-1."""
    lay = _pair_layout(lm, pairs)
    p = len(pairs)
    signs = torch.cat([dirs, dirs]).float()
    sums, _ = _reply_logprobs(lm, lay, AddVector(lm, layer, v, signs), mean=mean)
    sums = sums.cpu()
    gain = (sums[p:] - ref[:, 1]) - (sums[:p] - ref[:, 0])
    return -F.logsigmoid(beta * dirs.float() * gain)


@dataclass
class _Neutral:
    lay: Layout
    ref: torch.Tensor  # [N, V] unsteered log-probs at the scored tokens


def _neutral_kl(lm: LoadedModel, layer: int, v: torch.Tensor, neutral: _Neutral,
                signs: torch.Tensor) -> torch.Tensor:
    """Mean over texts of the per-token mean KL(unsteered || steered) (scalar, differentiable)."""
    lay = neutral.lay
    _, logp = _reply_logprobs(lm, lay, AddVector(lm, layer, v, signs.float()), full=True)
    ref = neutral.ref.to(logp.device)
    kl_tok = (ref.exp() * (ref - logp)).sum(-1)
    rows = lay.src_row.to(kl_tok.device)
    per_text = torch.zeros(lay.rows, device=kl_tok.device).index_add(0, rows, kl_tok) / lay.counts.to(kl_tok.device)
    return per_text.mean().cpu()


# ================================================================================ training

def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("Optimisation cancelled.")


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
    """Shared state of one optimisation: encoded pairs, unsteered references, neutral layout."""

    def __init__(self, lm: LoadedModel, pairs: list[tuple[Encoded, Encoded]], train: list[int], val: list[int],
                 settings: OptimizeSettings, neutral: Sequence[str], system: str | None,
                 cancel: threading.Event | None):
        self.lm, self.pairs, self.train, self.val, self.s, self.cancel = lm, pairs, train, val, settings, cancel
        self.ref = torch.zeros(len(pairs), 2)
        bs = settings.batch_size
        with torch.no_grad():
            for start in range(0, len(pairs), bs):
                _check(cancel)
                chunk = list(range(start, min(start + bs, len(pairs))))
                sums, _ = _reply_logprobs(lm, _pair_layout(lm, [pairs[i] for i in chunk]), None,
                                          mean=settings.reply_logprob == "mean")
                sums = sums.cpu()
                self.ref[chunk, 0], self.ref[chunk, 1] = sums[:len(chunk)], sums[len(chunk):]
        self.neutral: _Neutral | None = None
        texts = [t for t in neutral if t.strip()]
        if settings.kl_weight > 0 and texts:
            enc = encode(lm, [("", t) for t in texts], system)
            lay = make_layout(enc, list(range(len(enc))), lm.tokenizer.pad_token_id, lm.input_device, "neutral")
            with torch.no_grad():
                _, ref = _reply_logprobs(lm, lay, None, full=True)
            self.neutral = _Neutral(lay, ref)

    def loss(self, layer: int, v: torch.Tensor, idx: Sequence[int], dirs: torch.Tensor,
             kl_signs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean preference loss, KL term) over pairs ``idx`` with directions ``dirs``."""
        pref = _pair_losses(self.lm, layer, v, [self.pairs[i] for i in idx], self.ref[list(idx)], dirs,
                            self.s.beta, self.s.reply_logprob == "mean").mean()
        kl = torch.zeros(())
        if self.neutral is not None and kl_signs is not None:
            kl = _neutral_kl(self.lm, layer, v, self.neutral, kl_signs)
        return pref, kl

    def full_loss(self, layer: int, v: torch.Tensor, idx: Sequence[int]) -> float:
        """Deterministic loss over ``idx``: preference averaged over both directions + weighted KL of both
        signs (no gradient)."""
        bs = self.s.batch_size
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(idx), bs):
                _check(self.cancel)
                chunk = list(idx[start:start + bs])
                for d in (1.0, -1.0):
                    dirs = torch.full((len(chunk),), d)
                    pref, _ = self.loss(layer, v, chunk, dirs, None)
                    total += float(pref) * len(chunk) / 2
            kl = 0.0
            if self.neutral is not None:
                n = self.neutral.lay.rows
                for d in (1.0, -1.0):
                    kl += float(_neutral_kl(self.lm, layer, v, self.neutral, torch.full((n,), d))) / 2
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
        v = seed_vec.to(device).clone().requires_grad_(True)
        opt = torch.optim.Adam([v], lr=s.lr * rms)
        g = torch.Generator().manual_seed(s.seed * 1000003 + layer)
        curve = LayerCurve(seed_norm=float(seed_vec.norm()))
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
                _check(self.cancel)
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
) -> VectorSet:
    """A :class:`~steerdesk.core.vectors.VectorSet` of preference-optimised vectors for ``layers``.

    Each layer is trained on its own (the set is used one layer at a time), starting from the mean
    difference of the training pairs (``read`` position, ``batch_size`` for that extraction). The set
    has directions ``[num_layers, H]`` (float32) only at ``layers``; the other layers are absent.
    ``metadata["method"]`` is ``"optimized"``, ``metadata["optimize"]`` a JSON object with the
    settings, the split and each layer's loss curves (nats). ``progress(done, total)`` counts
    optimiser steps (``total`` assumes no early stop); ``on_epoch`` receives each curve point.

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
    _check(cancel)
    seed_set: VectorSet = compute_vectors(lm, train_ds, method="mean-diff", read=read, batch_size=batch_size,
                                          system=system, cancel=cancel, keep_reads=True)
    pairs = pair_encodings(lm, dataset, system)
    curves: dict[int, LayerCurve] = {}
    directions = torch.zeros_like(seed_set.directions)
    with frozen(lm.model):
        trainer = _Trainer(lm, pairs, train, val, s, neutral, system, cancel)
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
                                "seed_norm": round(c.seed_norm, 6), "final_norm": round(c.final_norm, 6)}
                       for k, c in curves.items()},
        }),
    })
    return VectorSet(directions=directions.contiguous(), norms=seed_set.norms.contiguous(), metadata=metadata,
                     proj_base=torch.einsum("nlh,lh->ln", ext.base, unit).contiguous(),
                     proj_target=torch.einsum("nlh,lh->ln", ext.target, unit).contiguous(), present=present)


__all__ = ["MIN_PAIRS", "OptimizeSettings", "EpochReport", "LayerCurve", "AddVector", "frozen",
           "optimize_vectors", "preference_loss", "pair_encodings"]
