"""Prefix reuse for sweeps: record a block's output in one unsteered forward, replay the rest.

A configuration whose first steered layer is L leaves blocks 0..L untouched: steering adds to block
L's *output*, so blocks 0..L compute what they compute unsteered. :class:`Capture` records, during
one unsteered forward, the output of each block that starts a configuration and the arguments the
model passes to every block (mask, rotary embeddings, position ids); :func:`run_blocks` then
applies the steering at layer L to that output and runs blocks L+1..end for any batch rows, and
:class:`Tail` applies the final norm and LM head. :class:`Unsupported` marks a model this cannot
run (the sweep then falls back to full forward passes; never shown to the user).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .models import LoadedModel
from .steering import Steering, block_hidden

# Final-norm attribute names on the base model, most common first (checked by the sweep's self-check).
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_norm", "norm_f", "ln_out")


class Unsupported(Exception):
    """The direct block path cannot run this model (a fallback, never shown to the user)."""


class Capture:
    """Block outputs and block call arguments recorded during one unsteered forward.

    ``outputs[L]``: the hidden state ``[batch, seq, hidden]`` block ``L`` returned, for each ``L`` in
    ``starts`` (a copy); ``calls[L]``: the arguments block ``L`` was called with, for every block from
    ``min(starts)`` on (``(rest of args, kwargs without hidden_states, hidden state passed by keyword)``).
    """

    def __init__(self, lm: LoadedModel, starts: Sequence[int]):
        self.lm = lm
        self.starts = set(starts)
        self.first = min(starts)
        self.outputs: dict[int, torch.Tensor] = {}
        self.calls: dict[int, tuple[tuple[Any, ...], dict[str, Any], bool]] = {}
        self._handles: list[Any] = []

    def _pre_hook(self, layer: int) -> Callable[..., None]:
        def pre(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if args:
                rest, as_kw = tuple(args[1:]), False
            elif "hidden_states" in kwargs:
                rest, as_kw = (), True
            else:
                raise Unsupported("block called without a hidden state")
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            self.calls[layer] = (rest, kw, as_kw)
        return pre

    def _hook(self, layer: int) -> Callable[..., None]:
        def post(module: Any, args: Any, output: Any) -> None:
            self.outputs[layer] = block_hidden(output).detach().clone()
        return post

    def __enter__(self) -> Capture:
        blocks = self.lm.blocks
        try:
            for layer in range(self.first, len(blocks)):
                self._handles.append(blocks[layer].register_forward_pre_hook(self._pre_hook(layer), with_kwargs=True))
                if layer in self.starts:
                    self._handles.append(blocks[layer].register_forward_hook(self._hook(layer)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def nbytes(self) -> int:
        """Bytes held by the recorded block outputs."""
        return sum(t.numel() * t.element_size() for t in self.outputs.values())


class RowPicker:
    """Pick batch rows ``idx`` of every batch-first tensor of the recorded block arguments (memoised).

    ``idx = arange(b).repeat(c)`` tiles a batch of ``b`` texts for ``c`` configurations.
    """

    def __init__(self, rows: int, idx: torch.Tensor):
        self.rows = rows
        self.idx = idx
        self.identity = idx.numel() == rows and bool((idx.cpu() == torch.arange(rows)).all())
        self._memo: dict[int, tuple[Any, Any]] = {}

    def __call__(self, x: Any) -> Any:
        if self.identity or x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, torch.Tensor):
            if x.ndim < 2 or x.shape[0] != self.rows:
                return x  # broadcast over the batch, or not batched (cache_position)
            hit = self._memo.get(id(x))
            if hit is not None and hit[0] is x:
                return hit[1]
            picked = x.index_select(0, self.idx.to(x.device))
            self._memo[id(x)] = (x, picked)
            return picked
        if isinstance(x, tuple):
            return tuple(self(v) for v in x)
        if isinstance(x, list):
            return [self(v) for v in x]
        raise Unsupported(f"cannot batch a block argument of type {type(x).__name__}")


class Tail:
    """Final norm + LM head (+ soft-capping) of a causal LM, found by name; verified by the self-check."""

    def __init__(self, lm: LoadedModel):
        model = lm.model
        base = getattr(model, "base_model", None) or model
        norm = next((m for m in (getattr(base, name, None) for name in FINAL_NORMS)
                     if isinstance(m, torch.nn.Module)), None)
        if norm is None:
            raise Unsupported("no final norm found")
        self.norm: torch.nn.Module = norm
        self.head = model.get_output_embeddings()
        if self.head is None:
            raise Unsupported("no LM head")
        config = model.config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.logit_scale = getattr(config, "logit_scale", None)

    def logits(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[n, vocab]`` of final hidden states ``h`` ``[n, hidden]`` (norm already applied).

        ``out`` (``[n, vocab]``, the head's dtype and device): written in place of a fresh tensor when
        the head is a plain ``nn.Linear`` (its own product, ``aten::mm``); ignored otherwise.
        """
        h = h.to(self.head.weight.device)
        w = self.head.weight
        if out is not None and type(self.head) is torch.nn.Linear and h.dim() == 2 and h.dtype == w.dtype \
                and out.dtype == w.dtype and out.device == w.device and tuple(out.shape) == (h.shape[0], w.shape[0]):
            logits = torch.mm(h, w.t(), out=out)
            if self.head.bias is not None:
                logits.add_(self.head.bias)
        else:
            logits = self.head(h)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def run_blocks(lm: LoadedModel, cap: Capture, layer: int, rows: int, idx: torch.Tensor,
               steering: Steering | None = None) -> torch.Tensor:
    """Final hidden states ``[len(idx), seq, hidden]`` from the recorded output of block ``layer``.

    Batch rows ``idx`` (of the ``rows`` recorded) of ``cap.outputs[layer]`` get ``steering``'s
    steering at ``layer`` (:meth:`~steerdesk.core.steering.Steering.steer`, what its hook would do to
    the block's output), then blocks ``layer+1..end`` run with the recorded call arguments (their
    own steering hooks fire as in a forward; ``steering`` must be entered). Block ``layer`` itself
    does not run: unsteered, its output is the recorded one. Raises ``Unsupported`` when a block
    was not called by the recorded forward.
    """
    pick = RowPicker(rows, idx)
    h = pick(cap.outputs[layer])
    if steering is not None:
        h = steering.steer(layer, h)
    for b in range(layer + 1, len(lm.blocks)):
        if b not in cap.calls:
            raise Unsupported(f"block {b} was not called by the model's forward")
        rest, kw, as_kw = cap.calls[b]
        args = [pick(a) for a in rest]
        kwargs = {k: pick(v) for k, v in kw.items()}
        block = lm.blocks[b]
        out = block(*args, hidden_states=h, **kwargs) if as_kw else block(h, *args, **kwargs)
        h = block_hidden(out)
    return h


__all__ = ["FINAL_NORMS", "Capture", "RowPicker", "Tail", "Unsupported", "run_blocks"]
