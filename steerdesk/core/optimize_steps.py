"""How a training step of the optimized method scores a batch: through a hook, or on the prefix cache.

:class:`StepScorer` holds what an optimisation scores against (the pairs' unsteered reply
log-probs, the neutral texts' unsteered distributions) and computes, for a layer ``L`` and a vector
``v``, the steered reply log-probs of a batch of pairs and the steered log-probs at the neutral
texts' tokens, differentiable in ``v``, by one of two paths:

* **hooks**: a full forward of the model with :class:`AddVector` on block ``L`` (every step runs
  every block);
* **prefix** (the prefix cache): the model is frozen and ``v`` is added at block ``L``'s output, so
  blocks ``0..L`` compute the same thing at every step for a given text. Block ``L``'s unsteered
  output is recorded once per text (during the reference forwards, or, over
  :data:`CACHE_BUDGET_BYTES`, just before the layer trains, running blocks ``0..L`` only); a step
  then runs blocks ``L+1..end``, the final norm and the LM head -- the head on the scored tokens
  only -- from ``recorded + sign * v`` (:func:`steered`, the hook's own formula). The record is per
  text, not per batch, so the random batches stay as they are: a batch is laid out, filled from
  the record (padding positions zero; attention masks them out as keys), and the arguments the
  model gives its blocks for that layout (attention mask, rotary embeddings, position ids) come from
  a forward cut at block 0 (embeddings only). Where the model's attention takes a custom 4D mask
  (sdpa, eager) the texts that share their prompt tokens and their sign share one row, the replies
  after one copy of the prompt (:class:`~steerdesk.core.optimize_cache.PackedTexts`: the same
  log-probs and the same gradient, fewer tokens): a pair's base and target reply, the neutral texts
  of one sign; otherwise a batch is padded as the hook path pads it (:func:`pair_layout`).
  Reusing block 0's arguments needs every block after ``L`` to receive exactly them, which the first
  reference forward checks (the same objects, not merely equal values; a model with several
  attention layer types, e.g. Gemma-2's alternating sliding window, is refused), and before a layer
  trains on it the direct path must reproduce, within :func:`check_tolerance` per token, the model's
  own unsteered log-probs and the hook path's steered ones (:meth:`StepScorer.prepare`). Where any
  of this fails the layer trains through the hook; nothing is shown to the user (the vector's
  metadata names the path of each layer).

The two paths compute the same function of ``v``; their losses and gradients agree to float
rounding (tests/core/test_optimize.py checks ~1e-5 relative in float32).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .errors import Cancelled
from .evaluate import model_logits
from .extract import Encoded, encode, forward_with_positions
from .layouts import Layout, make_layout, packed_mask_format
from .models import LoadedModel
from .optimize_cache import (
    BlockCache,
    Call,
    DirectPath,
    Key,
    PackedTexts,
    StopForward,
    bytes_per_layer,
    pack_texts,
    shared_prompts,
    uniform_from,
)
from .optimize_settings import OptimizeSettings
from .prefix import Capture, Unsupported
from .steering import block_hidden
from .sweep_engine import CACHE_BUDGET_BYTES, check_tolerance

log = logging.getLogger("steerdesk.core.optimize")  # the optimisation's logger

# ================================================================================ the hook

def steered(h: torch.Tensor, vector: torch.Tensor, signs: torch.Tensor | None) -> torch.Tensor:
    """``h + signs[row] * vector`` at every position: ``h`` ``[B, S, H]`` (any dtype), ``vector`` ``[H]``
    (float32), ``signs`` ``[B]`` or None (+1). The sum is taken in float32 and cast back to ``h``'s
    dtype. The one formula of both training paths (:class:`AddVector` and the prefix cache)."""
    v = vector.to(device=h.device)
    add = v.view(1, 1, -1) if signs is None else signs.to(h.device, v.dtype).view(-1, 1, 1) * v
    return (h.float() + add).to(h.dtype) if h.dtype != torch.float32 else h + add


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
        new = steered(block_hidden(output), self.vector, self.signs)
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

def score_at(at: torch.Tensor, lay: Layout, full: bool, mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (``mean``: per-token mean) reply log-prob per text segment ``[n_segments]`` (float32; one
    per row unless packed) from the logits ``at`` ``[N, V]`` at the scored tokens of ``lay`` and, with
    ``full``, their ``[N, V]`` log-softmax (else an empty tensor)."""
    logp = at.float().log_softmax(-1)
    tok_lp = logp.gather(-1, lay.tok.to(logp.device)[:, None]).squeeze(-1)
    assert lay.seg is not None
    seg = lay.seg.to(tok_lp.device)
    sums = torch.zeros(lay.n_segments, dtype=torch.float32, device=tok_lp.device).index_add(0, seg, tok_lp)
    if mean:
        sums = sums / lay.counts.to(sums.device)
    return sums, (logp if full else torch.empty(0))


def reply_logprobs(lm: LoadedModel, lay: Layout, steer: AddVector | None, full: bool = False,
                    mean: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`score_at` of a full forward of ``lay`` (steered by the hook ``steer``, if any); differentiable."""
    if steer is None:
        logits, lo = model_logits(lm, lay.ids, lay.mask, lay.positions, lay.keep())
    else:
        with steer:
            logits, lo = model_logits(lm, lay.ids, lay.mask, lay.positions, lay.keep())
    rows = lay.src_row.to(logits.device)
    cols = (lay.src_col - lo).to(logits.device)
    return score_at(logits[rows, cols], lay, full, mean)


def pair_layout(lm: LoadedModel, pairs: Sequence[tuple[Encoded, Encoded]]) -> Layout:
    """Rows ``[base_0..base_{P-1}, target_0..target_{P-1}]``, replies aligned."""
    items = [b for b, _ in pairs] + [t for _, t in pairs]
    return make_layout(items, list(range(len(items))), lm.tokenizer.pad_token_id, lm.input_device)


@dataclass
class NeutralRef:
    """The neutral texts' layout and their unsteered distributions at the scored tokens."""

    lay: Layout
    ref: torch.Tensor  # [N, V] unsteered log-probs at the scored tokens
    ref_p: torch.Tensor  # [N, V] ref.exp(), computed once
    texts: list[Encoded]  # the texts of lay's rows


def neutral_kl(neutral: NeutralRef, logp: torch.Tensor) -> torch.Tensor:
    """Mean over texts of the per-token mean KL(unsteered || steered) from the steered log-probs ``logp``
    ``[N, V]`` (scalar on the CPU, differentiable)."""
    lay = neutral.lay
    ref = neutral.ref.to(logp.device)
    kl_tok = (neutral.ref_p.to(logp.device) * (ref - logp)).sum(-1)
    rows = lay.src_row.to(kl_tok.device)
    per_text = torch.zeros(lay.rows, device=kl_tok.device).index_add(0, rows, kl_tok) / lay.counts.to(kl_tok.device)
    return per_text.mean().cpu()


# ================================================================================ scorer

def distribution_error(logp: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest, over tokens, expected absolute log-probability difference (nats) between two
    log-softmax rows ``[N, V]``, the expectation taken under ``ref``'s distribution.

    What the self-check compares on the neutral texts, whose KL penalty weighs each vocabulary entry
    by its reference probability: entries the model gives almost no probability cannot show a
    rounding difference as a fault (a plain maximum over ~50k entries of bf16 logits always would),
    while a difference where the probability is does. An empty input gives 0.
    """
    if logp.numel() == 0:
        return 0.0
    ref = ref.float().to(logp.device)
    return float((ref.exp() * (logp.float() - ref).abs()).sum(-1).max())


def check_cancel(cancel: threading.Event | None) -> None:
    """Raise ``Cancelled`` when ``cancel`` is set."""
    if cancel is not None and cancel.is_set():
        raise Cancelled("Optimisation cancelled.")


class StepScorer:
    """The references of one optimisation and the steered scores of its steps (see the module docstring).

    On construction: the unsteered reply log-probs of every pair (``ref`` ``[P, 2]``: base, target;
    summed or per-token mean per ``settings.reply_logprob``), the neutral texts' layout and unsteered
    distributions (``neutral``; None without neutral texts or with ``kl_weight`` 0), and for
    ``cache_layers`` (empty: hooks only) the block outputs the prefix cache needs. ``paths[layer]``
    is the path a layer's scores take (``"hooks"`` until :meth:`prepare` chose ``"prefix"``).
    Raises ``Cancelled`` when ``cancel`` is set (checked before every forward).
    """

    def __init__(self, lm: LoadedModel, pairs: list[tuple[Encoded, Encoded]], settings: OptimizeSettings,
                 neutral: Sequence[str], system: str | None, cancel: threading.Event | None,
                 cache_layers: Sequence[int] = ()):
        self.lm, self.pairs, self.s, self.cancel = lm, pairs, settings, cancel
        self.ref = torch.zeros(len(pairs), 2)
        self.neutral: NeutralRef | None = None
        self.direct: DirectPath | None = None
        self.caches: dict[int, BlockCache] = {}
        self.paths: dict[int, str] = {}  # layer -> "prefix" | "hooks"
        self.pack: str | None = None  # the prefix path packs texts by shared prompt (mask format), or None
        self._neutral_calls: dict[tuple[float, ...], tuple[PackedTexts | None, Call]] = {}
        texts = [t for t in neutral if t.strip()]
        neutral_lay = None
        neutral_enc: list[Encoded] = []
        if settings.kl_weight > 0 and texts:
            neutral_enc = encode(lm, [("", t) for t in texts], system)
            neutral_lay = make_layout(neutral_enc, list(range(len(neutral_enc))), lm.tokenizer.pad_token_id,
                                      lm.input_device, "neutral")
        record: list[int] = []
        if cache_layers:
            try:
                self.direct = DirectPath(lm)
            except Unsupported as exc:
                log.info("prefix cache off: %s", exc)
            if self.direct is not None:  # recorded in the reference forwards, as many layers as the budget holds
                self.pack = packed_mask_format(lm)
                per = bytes_per_layer(lm, pairs, neutral_lay)
                record = list(cache_layers)[:max(0, CACHE_BUDGET_BYTES // max(1, per))]
                self.caches = {layer: BlockCache(layer) for layer in record}
        bs = settings.batch_size
        with torch.no_grad():
            for start in range(0, len(pairs), bs):
                check_cancel(cancel)
                chunk = list(range(start, min(start + bs, len(pairs))))
                lay = pair_layout(lm, [pairs[i] for i in chunk])
                keys = [(i, 0) for i in chunk] + [(i, 1) for i in chunk]
                with self._recording(record, lay, keys, stop=False):
                    sums = self._reference(lay, first=start == 0)
                self.ref[chunk, 0], self.ref[chunk, 1] = sums[:len(chunk)], sums[len(chunk):]
            if neutral_lay is not None:
                with self._recording(record, neutral_lay, self._neutral_keys(neutral_lay.rows), stop=False):
                    _, ref = reply_logprobs(lm, neutral_lay, None, full=True)
                self.neutral = NeutralRef(neutral_lay, ref, ref.exp(), neutral_enc)
        for cache in self.caches.values():
            cache.finish()

    # -- reference forwards and recording ------------------------------------------------
    def _reference(self, lay: Layout, first: bool) -> torch.Tensor:
        """Unsteered reply log-probs ``[rows]`` (CPU) of ``lay``; the first one also records every block's
        arguments to decide which blocks the direct path may drive with block 0's."""
        mean = self.s.reply_logprob == "mean"
        if first and self.direct is not None:
            cap = Capture(self.lm, [0])
            try:
                with cap:
                    sums, _ = reply_logprobs(self.lm, lay, None, mean=mean)
                self.direct.uniform_from = uniform_from(self.lm, cap.calls)
                return sums.cpu()
            except Unsupported as exc:
                log.info("prefix cache off: %s", exc)
                self.direct = None
        sums, _ = reply_logprobs(self.lm, lay, None, mean=mean)
        return sums.cpu()

    @staticmethod
    def _neutral_keys(n: int) -> list[Key]:
        """Cache keys of the ``n`` neutral texts."""
        return [(-1, i) for i in range(n)]

    @staticmethod
    def _pair_keys(idx: Sequence[int]) -> list[Key]:
        """Cache keys of the texts of pairs ``idx``: bases, then targets."""
        return [(i, 0) for i in idx] + [(i, 1) for i in idx]

    @contextmanager
    def _recording(self, layers: Sequence[int], lay: Layout, keys: Sequence[Key], stop: bool) -> Iterator[None]:
        """Forward hooks keeping block ``L``'s output of ``lay`` (row ``r``: text ``keys[r]``) in
        ``self.caches[L]`` for ``L`` in ``layers``; with ``stop`` the forward ends there (``StopForward``)."""
        def make(layer: int) -> Callable[..., None]:
            def hook(module: Any, args: Any, output: Any) -> None:
                self.caches[layer].take(block_hidden(output), lay, keys)
                if stop:
                    raise StopForward
            return hook

        handles = [self.lm.blocks[layer].register_forward_hook(make(layer)) for layer in layers]
        try:
            yield
        except StopForward:
            pass
        finally:
            for h in handles:
                h.remove()

    def _record(self, layer: int) -> None:
        """Record block ``layer``'s output for every pair text and the neutral layout (blocks 0..layer
        only): for a layer the reference forwards did not record (over the budget)."""
        for other in [k for k in self.caches if k != layer]:
            del self.caches[other]  # one layer at a time
        self.caches[layer] = BlockCache(layer)
        bs = self.s.batch_size
        with torch.no_grad():
            for start in range(0, len(self.pairs), bs):
                check_cancel(self.cancel)
                chunk = list(range(start, min(start + bs, len(self.pairs))))
                lay = pair_layout(self.lm, [self.pairs[i] for i in chunk])
                keys = [(i, 0) for i in chunk] + [(i, 1) for i in chunk]
                with self._recording([layer], lay, keys, stop=True):
                    forward_with_positions(self.lm.model, lay.ids, lay.mask, lay.positions, use_cache=False)
            if self.neutral is not None:
                lay = self.neutral.lay
                with self._recording([layer], lay, self._neutral_keys(lay.rows), stop=True):
                    forward_with_positions(self.lm.model, lay.ids, lay.mask, lay.positions, use_cache=False)
        self.caches[layer].finish()

    def prepare(self, layer: int, seed_vec: torch.Tensor, check_pairs: Sequence[int]) -> str:
        """Choose layer ``layer``'s path: ``"prefix"`` when the direct path can drive its blocks, its block
        outputs are recorded and it passes the self-check with ``seed_vec`` ``[H]`` on pairs ``check_pairs``
        (the first two are used); else ``"hooks"``. Sets ``paths[layer]``; raises ``Cancelled`` when cancelled."""
        path = "hooks"
        if self.direct is not None and layer + 1 >= self.direct.uniform_from:
            try:
                if layer not in self.caches or self.caches[layer].store is None:
                    self._record(layer)
                why = self._self_check(layer, seed_vec, list(check_pairs)[:2])
            except Unsupported as exc:
                why = str(exc)
            except (RuntimeError, TypeError, ValueError, IndexError, KeyError) as exc:
                why = f"the direct block path failed ({type(exc).__name__}: {exc})"
            if why is None:
                path = "prefix"
            else:
                log.info("prefix cache off at layer %d: %s", layer, why)
        elif self.direct is not None:
            log.info("prefix cache off at layer %d: blocks from %d on get their own arguments", layer,
                     self.direct.uniform_from)
        if path == "hooks":
            self.caches.pop(layer, None)
        self.paths[layer] = path
        return path

    def _self_check(self, layer: int, v: torch.Tensor, idx: list[int]) -> str | None:
        """None when the direct path reproduces, on the pairs ``idx`` and on the neutral texts, the model's
        own unsteered log-probs and the hook path's steered ones (``v`` ``[H]``, signs +1 and -1), each
        within :func:`check_tolerance` per token; else what differs."""
        tol = check_tolerance(next(self.lm.model.parameters()).dtype)
        mean = self.s.reply_logprob == "mean"
        lay = pair_layout(self.lm, [self.pairs[i] for i in idx])
        per_token = torch.ones(lay.rows) if mean else lay.counts
        dirs = torch.tensor([1.0, -1.0][:len(idx)])
        signs = torch.cat([dirs, dirs])
        v = v.detach().float().to(next(self.lm.blocks[layer].parameters()).device)
        with torch.no_grad():
            self.paths[layer] = "prefix"
            plain = self.pair_sums(layer, torch.zeros_like(v), idx, signs).cpu()
            direct = self.pair_sums(layer, v, idx, signs).cpu()
            self.paths[layer] = "hooks"
            hooked = self.pair_sums(layer, v, idx, signs).cpu()
            want = torch.cat([self.ref[idx, 0], self.ref[idx, 1]])
            err = max(float(((plain - want).abs() / per_token).max()),
                      float(((direct - hooked).abs() / per_token).max()))
            if not err <= tol:
                return f"the direct block path differs from the model by {err:.3g} nats per token"
            if self.neutral is not None:
                n = self.neutral.lay.rows
                alternating = torch.arange(n) % 2 * -2.0 + 1.0
                self.paths[layer] = "prefix"
                plain_n = self.neutral_logp(layer, torch.zeros_like(v), torch.ones(n))
                direct_n = self.neutral_logp(layer, v, alternating)
                self.paths[layer] = "hooks"
                hooked_n = self.neutral_logp(layer, v, alternating)
                err = max(distribution_error(plain_n, self.neutral.ref), distribution_error(direct_n, hooked_n))
                if not err <= tol:
                    return (f"the direct block path differs from the model on the neutral texts by {err:.3g} "
                            "nats per token (expected under the reference)")
        return None

    # -- scores --------------------------------------------------------------------------
    def pair_sums(self, layer: int, v: torch.Tensor, idx: Sequence[int], signs: torch.Tensor) -> torch.Tensor:
        """Steered reply log-prob (sum or mean per settings) of the texts ``[base_0..base_{P-1}, target_0..]``
        of pairs ``idx`` ``[2P]``, with signs ``[2P]`` per text; differentiable in ``v``."""
        mean = self.s.reply_logprob == "mean"
        items = [b for b, _ in (self.pairs[i] for i in idx)] + [t for _, t in (self.pairs[i] for i in idx)]
        if self.paths.get(layer) == "prefix":
            assert self.direct is not None
            check_cancel(self.cancel)
            cache, keys = self.caches[layer], self._pair_keys(idx)
            packed = self._packed(items, signs)
            if packed is not None:
                lay, h = packed.layout, steered(cache.packed(packed, keys), v, packed.row_label)
            else:
                lay = pair_layout(self.lm, [self.pairs[i] for i in idx])
                h = steered(cache.rows(lay, keys), v, signs.float())
            sums, _ = score_at(self.direct.logits(layer, lay, h, self.direct.call(lay)), lay, False, mean)
            return sums
        lay = pair_layout(self.lm, [self.pairs[i] for i in idx])
        sums, _ = reply_logprobs(self.lm, lay, AddVector(self.lm, layer, v, signs.float()), mean=mean)
        return sums

    def _packed(self, items: Sequence[Encoded], signs: torch.Tensor) -> PackedTexts | None:
        """``items`` packed by shared prompt and sign, or None: packing off (the model's attention takes no
        custom mask), a text without a prompt token, or a row wider than the model's sliding attention
        window (which a packed row would stretch)."""
        if self.pack is None or not shared_prompts(items):
            return None
        dtype = next(self.lm.model.parameters()).dtype
        packed = pack_texts(items, signs.tolist(), self.lm.tokenizer.pad_token_id, self.lm.input_device, self.pack,
                            dtype)
        window = getattr(getattr(self.lm.model, "config", None), "sliding_window", None)
        if isinstance(window, int) and window > 0 and packed.layout.width > window:
            return None
        return packed

    def neutral_logp(self, layer: int, v: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        """Steered log-softmax ``[N, V]`` at the neutral texts' scored tokens (in ``neutral.lay``'s order),
        signs ``[texts]``; differentiable in ``v``."""
        assert self.neutral is not None
        lay = self.neutral.lay
        if self.paths.get(layer) == "prefix":
            assert self.direct is not None
            check_cancel(self.cancel)
            cache, keys = self.caches[layer], self._neutral_keys(lay.rows)
            key = tuple(signs.tolist())
            if key not in self._neutral_calls:  # the same few sign patterns every epoch: laid out once
                packed = self._packed(self.neutral.texts, signs)
                use = packed.layout if packed is not None else lay
                self._neutral_calls[key] = (packed, self.direct.call(use))
            packed, call = self._neutral_calls[key]
            if packed is not None:
                use, h = packed.layout, steered(cache.packed(packed, keys), v, packed.row_label)
            else:
                use, h = lay, steered(cache.rows(lay, keys), v, signs.float())
            _, logp = score_at(self.direct.logits(layer, use, h, call), use, True, False)
            return logp
        _, logp = reply_logprobs(self.lm, lay, AddVector(self.lm, layer, v, signs.float()), full=True)
        return logp


__all__ = ["AddVector", "NeutralRef", "StepScorer", "check_cancel", "frozen", "neutral_kl", "pair_layout",
           "reply_logprobs", "score_at", "steered"]
