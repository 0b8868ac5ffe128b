"""The prefix cache of the optimized method: recorded block outputs and the blocks after them.

Mechanics only (:mod:`steerdesk.core.optimize_steps` decides when they are used and checks them):
:class:`BlockCache` keeps block ``L``'s unsteered output per pair text and rebuilds a padded batch
from it; :class:`DirectPath` gets the arguments the model passes its blocks for a batch (a forward
cut at block 0) and runs blocks ``L+1..end``, the final norm and the LM head on the scored tokens
only (with :mod:`steerdesk.core.prefix`'s ``Capture``, ``run_blocks`` and ``Tail``);
:func:`uniform_from` says from which block on every block receives block 0's arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .extract import Encoded, forward_with_positions
from .layouts import Layout
from .models import LoadedModel
from .prefix import Capture, Tail, Unsupported, run_blocks

#: Most bytes of recorded block outputs kept at once (as the sweep engine's budget).
CACHE_BUDGET_BYTES = 2 << 30

Call = tuple[tuple[Any, ...], dict[str, Any], bool]  # (positional args after the hidden state, kwargs, hidden as kwarg)


class StopForward(Exception):
    """Raised by a hook to end a forward once what it needed was recorded (the caller catches it)."""


def plain_argument(x: Any) -> bool:
    """True for a block argument the direct path can pass on as recorded (tensors, numbers, None)."""
    if x is None or isinstance(x, (torch.Tensor, bool, int, float, str)):
        return True
    if isinstance(x, (tuple, list)):
        return all(plain_argument(y) for y in x)
    return False


def same_argument(a: Any, b: Any) -> bool:
    """The same block argument: tensors by identity (equal values on one batch prove nothing about
    another), other values by type and equality."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same_argument(x, y) for x, y in zip(a, b))
    return a is b or (isinstance(a, (bool, int, float, str)) and type(a) is type(b) and a == b)


def same_call(a: Call, b: Call) -> bool:
    """Two recorded block calls pass the same arguments (:func:`same_argument`, keyword names alike)."""
    return (a[2] == b[2] and same_argument(a[0], b[0]) and a[1].keys() == b[1].keys()
            and all(same_argument(a[1][k], b[1][k]) for k in a[1]))


def uniform_from(lm: LoadedModel, calls: dict[int, Call]) -> int:
    """First block from which every block received block 0's arguments (``len(blocks)`` if none),
    from the calls a :class:`~steerdesk.core.prefix.Capture` recorded during one forward. A model
    whose config lists more than one attention layer type (alternating sliding and full attention)
    builds one mask per type: ``len(blocks)``."""
    n = len(lm.blocks)
    types = getattr(getattr(lm.model, "config", None), "layer_types", None)
    if 0 not in calls or (isinstance(types, (list, tuple)) and len(set(types)) > 1):
        return n
    first = calls[0]
    if not plain_argument(first[0]) or not all(plain_argument(v) for v in first[1].values()):
        return n
    k = n
    while k - 1 >= 1 and (k - 1) in calls and same_call(calls[k - 1], first):
        k -= 1
    return k


class BlockCache:
    """Block ``layer``'s unsteered output for every pair text (real tokens only) and on the neutral layout."""

    def __init__(self, layer: int):
        self.layer = layer
        self.pieces: dict[tuple[int, int], torch.Tensor] = {}
        self.neutral: torch.Tensor | None = None  # [rows, S, H] of the neutral layout
        self.store: torch.Tensor | None = None  # [T + 1, H]: every pair text's tokens, then a zero row
        self.start: torch.Tensor | None = None  # [P, 2] first row in store of (base, target) of pair p

    def take(self, h: torch.Tensor, lay: Layout, keys: Sequence[tuple[int, int]]) -> None:
        """Keep the real tokens of each row of ``h`` ``[rows, S, H]`` under its key (pair, 0 base / 1 target)."""
        real = lay.mask.to(h.device).bool()
        for r, key in enumerate(keys):
            self.pieces[key] = h[r][real[r]].detach()  # boolean indexing copies

    def finish(self, n_pairs: int) -> None:
        """Concatenate the pieces (all ``n_pairs`` pairs must have been taken)."""
        parts = [self.pieces[(p, side)] for p in range(n_pairs) for side in (0, 1)]
        self.store = torch.cat(parts + [parts[0].new_zeros(1, parts[0].shape[-1])])
        lengths = torch.tensor([0] + [x.shape[0] for x in parts[:-1]], dtype=torch.long)
        self.start = lengths.cumsum(0).view(n_pairs, 2)
        self.pieces.clear()

    def assemble(self, lay: Layout, idx: Sequence[int]) -> torch.Tensor:
        """Block output ``[2P, S, H]`` for :func:`~steerdesk.core.optimize_steps.pair_layout` of pairs ``idx``
        (rows: bases, then targets; padding positions zero)."""
        assert self.store is not None and self.start is not None
        store = self.store
        i = torch.as_tensor(list(idx), dtype=torch.long)
        first = torch.cat([self.start[i, 0], self.start[i, 1]]).to(store.device)
        mask = lay.mask.to(store.device)
        index = torch.where(mask.bool(), first[:, None] + mask.cumsum(-1) - 1, store.shape[0] - 1)
        return store[index]

    def gather(self, pair: torch.Tensor, side: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Block output ``[rows, S, H]`` of a :class:`PackedPairs` layout: position ``(r, c)`` holds token
        ``offset[r, c]`` of text ``side[r, c]`` (0 base, 1 target; -1: padding, zero) of pair ``pair[r]``."""
        assert self.store is not None and self.start is not None
        store = self.store
        start = self.start[pair[:, None].expand_as(side), side.clamp_min(0)]
        index = torch.where(side >= 0, start + offset, store.shape[0] - 1)
        return store[index.to(store.device)]


@dataclass
class PackedPairs:
    """A batch of pairs packed one pair per row: ``[pad | prompt | base reply | target reply | pad]``.

    Base and target share their prompt tokens (the same tokens, so the same block outputs); a 4D
    attention mask lets each reply see the prompt and itself only (causally), and position ids
    continue from the prompt in both replies, so every scored log-prob is the one of the reply's
    own unpacked row up to float rounding, and the gradient in ``v`` is the same sum (the shared
    prompt positions receive both replies' gradients, as the two copies did). Saves the prompt's
    second copy and most padding. ``layout`` has segments ``[base_0..base_{P-1}, target_0..]`` (as
    :func:`~steerdesk.core.optimize_steps.pair_layout`'s rows); ``pair``/``side``/``offset`` say
    where each position's recorded block output is (:meth:`BlockCache.gather`).
    """

    layout: Layout
    pair: torch.Tensor  # [rows] pair index of each row
    side: torch.Tensor  # [rows, S] 0 base, 1 target, -1 padding
    offset: torch.Tensor  # [rows, S] token index within that text


def shared_prompts(pairs: Sequence[tuple[Encoded, Encoded]]) -> bool:
    """True when every pair's base and target have the same prompt tokens (at least one): packable."""
    return all(b.reply_start == t.reply_start >= 1 and b.ids[:b.reply_start] == t.ids[:t.reply_start]
               for b, t in pairs)


def pack_pairs(pairs: Sequence[tuple[Encoded, Encoded]], idx: Sequence[int], pad_id: int, device: torch.device,
               fmt: str, dtype: torch.dtype) -> PackedPairs:
    """Pack pairs ``idx`` (see :class:`PackedPairs`; :func:`shared_prompts` must hold). ``fmt``: the
    mask format the model takes (:func:`~steerdesk.core.layouts.packed_mask_format`: ``"bool"`` or
    ``"additive"``), ``dtype`` the model's (additive masks)."""
    items = [pairs[i] for i in idx]
    p_max = max(b.reply_start for b, _ in items)
    r_max = max(len(b.ids) + len(t.ids) - 2 * b.reply_start for b, t in items)
    n, width = len(items), p_max + r_max
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    tag = torch.full((n, width), -1, dtype=torch.long)  # 0 prompt, 1 base reply, 2 target reply, -1 padding
    side = torch.full((n, width), -1, dtype=torch.long)
    offset = torch.zeros((n, width), dtype=torch.long)
    src_row: list[int] = []
    src_col: list[int] = []
    tok: list[int] = []
    seg: list[int] = []
    counts = [0.0] * (2 * n)
    for r, (b, t) in enumerate(items):
        p = b.reply_start
        col = p_max - p
        ids[r, col:p_max] = torch.tensor(b.ids[:p])
        positions[r, col:p_max] = torch.arange(p)
        tag[r, col:p_max] = 0
        side[r, col:p_max] = 0
        offset[r, col:p_max] = torch.arange(p)
        col = p_max
        for k, e in enumerate((b, t)):
            m = len(e.ids) - p
            ids[r, col:col + m] = torch.tensor(e.ids[p:])
            positions[r, col:col + m] = torch.arange(p, p + m)
            tag[r, col:col + m] = k + 1
            side[r, col:col + m] = k
            offset[r, col:col + m] = torch.arange(p, p + m)
            for u in range(m):  # token p + u of e, predicted at the prompt's last column or the previous one
                src_row.append(r)
                src_col.append(p_max - 1 if u == 0 else col + u - 1)
                tok.append(e.ids[p + u])
                seg.append(k * n + r)
            counts[k * n + r] = float(m)
            col += m
    real = tag >= 0
    tq, tk = tag[:, :, None], tag[:, None, :]
    allowed = torch.ones(width, width, dtype=torch.bool).tril() & real[:, None, :] & real[:, :, None] \
        & ((tk == 0) | (tk == tq))
    allowed |= torch.eye(width, dtype=torch.bool)  # a padding query sees itself (no empty softmax row)
    allowed = allowed[:, None]
    attn = allowed if fmt == "bool" else \
        torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)
    lay = Layout(ids=ids.to(device), mask=real.long().to(device), positions=positions.to(device), reply_col=p_max,
                 src_row=as_long(src_row), src_col=as_long(src_col), tok=as_long(tok),
                 counts=torch.tensor(counts, dtype=torch.float32), texts=list(range(2 * n)), kind="heldout",
                 seg=as_long(seg), seg_row=list(range(n)) * 2, attn=attn.to(device))
    return PackedPairs(lay, torch.as_tensor(list(idx), dtype=torch.long), side, offset)


def bytes_per_layer(lm: LoadedModel, pairs: Sequence[tuple[Encoded, Encoded]], neutral: Layout | None) -> int:
    """Bytes a :class:`BlockCache` of one layer takes for ``pairs`` and the neutral layout (model dtype)."""
    elem = torch.tensor([], dtype=next(lm.model.parameters()).dtype).element_size()
    tokens = sum(len(b.ids) + len(t.ids) for b, t in pairs) + (neutral.rows * neutral.width if neutral else 0)
    return tokens * lm.info.hidden_size * elem


class DirectPath:
    """Runs blocks ``L+1..end`` + final norm + LM head from a block-``L`` output (the prefix cache's path)."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.tail = Tail(lm)  # Unsupported: no final norm or head found
        self.uniform_from = len(lm.blocks)  # set by the first reference forward

    def call(self, lay: Layout) -> Call:
        """The arguments the model passes block 0 for ``lay``'s batch (the forward stops there: embeddings,
        mask and rotary embeddings only). Raises ``Unsupported`` if block 0 is not reached."""
        cap = Capture(self.lm, [0])

        def stop(module: Any, args: Any) -> None:
            raise StopForward

        with torch.no_grad(), cap:
            handle = self.lm.blocks[0].register_forward_pre_hook(stop)
            try:
                forward_with_positions(self.lm.model, lay.ids, lay.model_mask, lay.positions, use_cache=False)
            except StopForward:
                pass
            finally:
                handle.remove()
        call = cap.calls.get(0)
        if call is None:
            raise Unsupported("block 0 was not called")
        return call

    def logits(self, layer: int, lay: Layout, h: torch.Tensor, call: Call) -> torch.Tensor:
        """Logits ``[N, V]`` at the scored tokens of ``lay`` from block ``layer``'s (steered) output ``h``
        ``[rows, S, H]``; differentiable in ``h``."""
        n = len(self.lm.blocks)
        if layer + 1 < n:
            cap = Capture(self.lm, [layer + 1])
            cap.inputs[layer + 1] = h
            cap.calls = {k: call for k in range(layer + 1, n)}
            h = run_blocks(self.lm, cap, layer + 1, lay.rows, torch.arange(lay.rows))
        sel = h[lay.src_row.to(h.device), lay.src_col.to(h.device)]
        return self.tail.logits(self.tail.norm(sel))


def check_tolerance(dtype: torch.dtype) -> float:
    """Per-token log-prob tolerance of the self-check (nats): the sweep's."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2


__all__ = ["CACHE_BUDGET_BYTES", "BlockCache", "Call", "DirectPath", "PackedPairs", "StopForward", "bytes_per_layer",
           "check_tolerance", "pack_pairs", "plain_argument", "same_argument", "same_call", "shared_prompts",
           "uniform_from"]
