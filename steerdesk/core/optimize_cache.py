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
from .layouts import Layout, packed_attention
from .models import LoadedModel
from .prefix import Capture, Tail, Unsupported, run_blocks

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


Key = tuple[int, int]  # a recorded text: (pair, 0 base / 1 target) or (-1, neutral text)


class BlockCache:
    """Block ``layer``'s unsteered output per recorded text (real tokens only), under the text's key."""

    def __init__(self, layer: int):
        self.layer = layer
        self.pieces: dict[Key, torch.Tensor] = {}
        self.store: torch.Tensor | None = None  # [T + 1, H]: every text's tokens, then a zero row
        self.start: dict[Key, int] = {}  # first row in store of each text

    def take(self, h: torch.Tensor, lay: Layout, keys: Sequence[Key]) -> None:
        """Keep the real tokens of each row of ``h`` ``[rows, S, H]`` (one text per row) under its key."""
        real = lay.mask.to(h.device).bool()
        for r, key in enumerate(keys):
            self.pieces[key] = h[r][real[r]].detach()  # boolean indexing copies

    def finish(self) -> None:
        """Concatenate the pieces into one store."""
        parts = list(self.pieces.values())
        self.store = torch.cat(parts + [parts[0].new_zeros(1, parts[0].shape[-1])])
        at = 0
        for key, x in self.pieces.items():
            self.start[key] = at
            at += x.shape[0]
        self.pieces.clear()

    def rows(self, lay: Layout, keys: Sequence[Key]) -> torch.Tensor:
        """Block output ``[rows, S, H]`` of an unpacked layout whose row ``r`` holds text ``keys[r]``
        (its real tokens where ``lay.mask`` is 1, in order; padding positions zero)."""
        assert self.store is not None
        store = self.store
        first = torch.tensor([self.start[k] for k in keys], dtype=torch.long, device=store.device)
        mask = lay.mask.to(store.device)
        index = torch.where(mask.bool(), first[:, None] + mask.cumsum(-1) - 1, store.shape[0] - 1)
        return store[index]

    def packed(self, packed: PackedTexts, keys: Sequence[Key]) -> torch.Tensor:
        """Block output ``[rows, S, H]`` of a :class:`PackedTexts` layout of the texts ``keys``."""
        assert self.store is not None
        store = self.store
        first = torch.tensor([self.start[k] for k in keys], dtype=torch.long)
        index = torch.where(packed.text >= 0, first[packed.text.clamp_min(0)] + packed.offset, store.shape[0] - 1)
        return store[index.to(store.device)]


@dataclass
class PackedTexts:
    """Texts packed by shared prompt: one row per group of texts with the same prompt tokens and label,
    ``[pad | prompt | reply 1 | reply 2 | ... | pad]``.

    The texts of a row share their prompt tokens (the same tokens, so the same block outputs); a 4D
    attention mask lets each reply see the prompt and itself only (causally), and position ids
    continue from the prompt in every reply, so every scored log-prob is the one of the text's own
    unpacked row up to float rounding, and the gradient in ``v`` is the same sum (the shared prompt
    positions receive every reply's gradient, as the copies did). A label is the steering sign: one
    per row. ``layout`` has one segment per text, in the order given, and lists the scored tokens in
    that order (text by text, as an unpacked layout lists them row by row). ``text``/``offset`` say
    which token of which text each position holds (:meth:`BlockCache.packed`).
    """

    layout: Layout
    text: torch.Tensor  # [rows, S] index of the text at each position (-1: padding)
    offset: torch.Tensor  # [rows, S] token index within that text
    row_label: torch.Tensor  # [rows] float32, the label (sign) of each row


def shared_prompts(items: Sequence[Encoded]) -> bool:
    """True when every text has at least one prompt token (it then shares them with the texts of the same
    prompt): packable by :func:`pack_texts`."""
    return all(e.reply_start >= 1 for e in items)


def pack_texts(items: Sequence[Encoded], labels: Sequence[float], pad_id: int, device: torch.device, fmt: str,
               dtype: torch.dtype) -> PackedTexts:
    """Pack ``items`` by (prompt tokens, label) (see :class:`PackedTexts`; :func:`shared_prompts` must
    hold). ``fmt``: the mask format the model takes (:func:`~steerdesk.core.layouts.packed_mask_format`:
    ``"bool"`` or ``"additive"``), ``dtype`` the model's (additive masks)."""
    groups: dict[tuple[tuple[int, ...], float], list[int]] = {}
    for i, (e, label) in enumerate(zip(items, labels)):
        groups.setdefault((tuple(e.ids[:e.reply_start]), float(label)), []).append(i)
    rows = list(groups.items())
    p_max = max(len(prompt) for (prompt, _), _ in rows)
    width = p_max + max(sum(len(items[i].ids) - len(prompt) for i in members) for (prompt, _), members in rows)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    tag = torch.full((n, width), -2, dtype=torch.long)  # -1 prompt, k reply of text k, -2 padding
    text = torch.full((n, width), -1, dtype=torch.long)
    offset = torch.zeros((n, width), dtype=torch.long)
    where: dict[int, tuple[int, int, int]] = {}  # text -> (row, column of its first reply token, prompt's last)
    for r, ((prompt, _), members) in enumerate(rows):
        p = len(prompt)
        ids[r, p_max - p:p_max] = torch.tensor(prompt)
        positions[r, p_max - p:p_max] = torch.arange(p)
        tag[r, p_max - p:p_max] = -1
        text[r, p_max - p:p_max] = members[0]
        offset[r, p_max - p:p_max] = torch.arange(p)
        col = p_max
        for i in members:
            e = items[i]
            m = len(e.ids) - p
            ids[r, col:col + m] = torch.tensor(e.ids[p:])
            positions[r, col:col + m] = torch.arange(p, p + m)
            tag[r, col:col + m] = i
            text[r, col:col + m] = i
            offset[r, col:col + m] = torch.arange(p, p + m)
            where[i] = (r, col, p_max - 1)
            col += m
    src_row: list[int] = []
    src_col: list[int] = []
    tok: list[int] = []
    seg: list[int] = []
    for i, e in enumerate(items):  # scored tokens text by text (reply_start >= 1: all reply tokens)
        r, col, last = where[i]
        p = e.reply_start
        for u in range(len(e.ids) - p):  # token p + u, predicted at the prompt's last column or the one before
            src_row.append(r)
            src_col.append(last if u == 0 else col + u - 1)
            tok.append(e.ids[p + u])
            seg.append(i)
    real = tag > -2
    tq, tk = tag[:, :, None], tag[:, None, :]
    attn = packed_attention(real, (tk == -1) | (tk == tq), fmt, dtype)
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)
    counts = torch.tensor([float(len(e.ids) - e.reply_start) for e in items], dtype=torch.float32)
    lay = Layout(ids=ids.to(device), mask=real.long().to(device), positions=positions.to(device), reply_col=p_max,
                 src_row=as_long(src_row), src_col=as_long(src_col), tok=as_long(tok), counts=counts,
                 texts=list(range(len(items))), kind="heldout", seg=as_long(seg),
                 seg_row=[where[i][0] for i in range(len(items))], attn=attn.to(device))
    return PackedTexts(lay, text, offset, torch.tensor([label for (_, label), _ in rows], dtype=torch.float32))


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
            cap = Capture(self.lm, [layer])
            cap.outputs[layer] = h
            cap.calls = {k: call for k in range(layer + 1, n)}
            h = run_blocks(self.lm, cap, layer, lay.rows, torch.arange(lay.rows))
        sel = h[lay.src_row.to(h.device), lay.src_col.to(h.device)]
        return self.tail.logits(self.tail.norm(sel))


__all__ = ["BlockCache", "Call", "DirectPath", "Key", "PackedTexts", "StopForward",
           "bytes_per_layer", "pack_texts", "plain_argument", "same_argument", "same_call",
           "shared_prompts", "uniform_from"]
