"""Steering hooks: add / project / clamp a vector at the output of chosen decoder blocks.

Conventions (DESIGN.md section 2):

* layer ``L`` is the **output of decoder block L** (``hidden_states[L + 1]`` of a HF forward);
* ``add``:     ``h + a*u``
* ``project``: ``h - a*(h.v^)v^``         (``a = 1`` removes the direction: ablation)
* ``clamp``:   ``h - (h.v^)v^ + a*u``     (the component along ``v^`` becomes ``a*|u|``)

where ``v^`` is the unit vector and ``u`` is the raw vector, or ``v^`` with ``normalize``.
Positions are absolute (prompt = positions before ``prompt_length``), read from the cache
length at each model call, so steering is identical with the KV cache on or off. Besides
``all`` / ``prompt`` / ``generated``, a steer may act on a token window (``first:N``,
``gen:A-B``, ``prompt:A-B``; syntax and boundary convention in
:class:`steerdesk.core.parsing.TokenWindow`: ``gen`` windows steer the passes that *produce*
generated tokens A..B).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from .errors import SteerdeskError
from .models import LoadedModel
from .parsing import POSITION_NAMES, TokenWindow, check_layers, parse_positions

MODES = ("add", "project", "clamp")
POSITIONS = POSITION_NAMES  # the named positions; windows too: see parse_positions

MODE_FORMULAS = {
    "add": "h + a*v",
    "project": "h - a*(h.v^)v^",
    "clamp": "h - (h.v^)v^ + a*v",
}


@dataclass(frozen=True)
class Steer:
    """One vector applied at one layer."""

    layer: int
    vector: torch.Tensor
    scale: float = 1.0
    mode: str = "add"
    normalize: bool = False
    positions: str = "all"  # "all", "prompt", "generated" or a window: "first:N", "gen:A-B", "prompt:A-B"

    def check(self, num_layers: int, hidden_size: int) -> None:
        """Raise ``SteerdeskError`` for settings that cannot be applied."""
        if self.mode not in MODES:
            raise SteerdeskError(f"Unknown steering mode {self.mode!r}; use one of {', '.join(MODES)}.")
        parse_positions(self.positions)  # named positions or a token window; raises with the forms
        check_layers([self.layer], num_layers)
        if not math.isfinite(self.scale):
            raise SteerdeskError(f"Scale must be a finite number, got {self.scale}.")
        if abs(self.scale) > 1e4:
            raise SteerdeskError(f"Scale {self.scale:g} is absurd (|scale| must be at most 10000).")
        if self.vector.ndim != 1 or self.vector.shape[0] != hidden_size:
            raise SteerdeskError(
                f"The vector for layer {self.layer} has shape {tuple(self.vector.shape)}, "
                f"but the model's hidden size is {hidden_size}."
            )
        if not bool(torch.isfinite(self.vector).all()):
            raise SteerdeskError(f"The vector for layer {self.layer} contains NaN or infinite values.")
        if not bool(self.vector.any()) and not self.is_identity:
            # A zero vector would make this a silent no-op (add) or has nothing to act on
            # (project / clamp / normalize). Scale 0 in add or project mode is the identity on
            # purpose (comparisons and sweeps rely on it) and stays allowed.
            what = ("it cannot be normalised" if self.normalize and self.mode == "add"
                    else f"{self.mode} at scale {self.scale:g} would do nothing" if self.mode == "add"
                    else f"there is nothing to {self.mode}")
            raise SteerdeskError(f"Layer {self.layer} has no steering direction (zero vector): {what}.")

    @property
    def is_identity(self) -> bool:
        """True when this steer leaves hidden states unchanged whatever the vector: scale 0 in
        ``add`` or ``project`` mode (``clamp`` at scale 0 still removes the direction)."""
        return self.scale == 0 and self.mode in ("add", "project")


RowSpec = Sequence[Steer]


class _Op:
    """A steering operation prepared for one (layer, device, dtype)."""

    __slots__ = ("addend", "mode", "positions", "rows", "scale", "unit", "window")

    def __init__(self, mode: str, positions: str, rows: torch.Tensor | None,
                 unit: torch.Tensor | None, addend: torch.Tensor | None, scale: torch.Tensor | None):
        self.mode = mode
        self.positions = positions
        self.window = parse_positions(positions)
        self.rows = rows  # None: all rows (vectors broadcast)
        self.unit = unit  # [R, 1, H] unit vectors (project / clamp)
        self.addend = addend  # [R, 1, H] scaled vectors (add / clamp)
        self.scale = scale  # [R, 1, 1] (project)


def block_hidden(output: Any) -> torch.Tensor:
    """The hidden state ``[batch, seq, hidden]`` a decoder block returned (alone or first of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    return hidden


def _offset_from_kwargs(kwargs: dict[str, Any]) -> int:
    """Absolute position of the first token of this model call."""
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        return int(cache_position.reshape(-1)[0])
    for key in ("cache", "past_key_values"):
        cache = kwargs.get(key)
        if cache is None:
            continue
        if hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
        if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
            return int(cache[0][0].shape[-2])  # legacy tuple cache
    return 0


class Steering:
    """Context manager installing steering hooks; hooks are removed on exit, even on error.

    ``rows`` is either a flat list of :class:`Steer` (every batch row gets them) or one
    list per batch row (per-row steering: side-by-side comparisons and sweeps).
    ``observe(layer, hidden)`` is called with each steered-or-watched block output
    (after steering) for the layers in ``watch``; it receives the live tensor.
    ``prompt_starts`` (one int per batch row: the column of the row's first prompt token, i.e.
    its left padding) is needed by ``prompt:A-B`` windows only. Raises ``SteerdeskError`` when a
    steer cannot be applied or its positions need ``prompt_length`` / ``prompt_starts``.
    """

    def __init__(
        self,
        lm: LoadedModel,
        rows: RowSpec | Sequence[RowSpec] = (),
        *,
        prompt_length: int | None = None,
        observe: Callable[[int, torch.Tensor], None] | None = None,
        watch: Sequence[int] = (),
        prompt_starts: Sequence[int] | torch.Tensor | None = None,
    ):
        self.lm = lm
        self.blocks = lm.blocks
        per_row = bool(rows) and not isinstance(rows[0], Steer)
        self.per_row = per_row
        self.batch_rows: list[list[Steer]] = (
            [list(r) for r in cast(Sequence[RowSpec], rows)] if per_row else [list(cast(RowSpec, rows))])
        self.prompt_length = prompt_length
        self.observe = observe
        self.watch = set(watch)
        n_layers, hidden = lm.info.num_layers, lm.info.hidden_size
        for row in self.batch_rows:
            for s in row:
                s.check(n_layers, hidden)
                if s.positions != "all" and prompt_length is None:
                    raise SteerdeskError(f"Steering positions {s.positions!r} need the prompt length.")
                if parse_positions(s.positions).kind == "prompt_window" and prompt_starts is None:
                    raise SteerdeskError(f"Steering positions {s.positions!r} need where each row's prompt "
                                         f"starts (only generation provides it).")
        self.prompt_starts = (None if prompt_starts is None
                              else torch.as_tensor(prompt_starts, dtype=torch.long).reshape(-1).cpu())
        self._offset = 0
        self._handles: list[Any] = []
        self._prepared: dict[tuple[int, torch.device, torch.dtype], list[_Op]] = {}
        self.layers = sorted({s.layer for row in self.batch_rows for s in row})

    # -- preparation -----------------------------------------------------------------
    def _prepare(self, layer: int, device: torch.device, dtype: torch.dtype) -> list[_Op]:
        key = (layer, device, dtype)
        ops = self._prepared.get(key)
        if ops is not None:
            return ops
        ops = []
        if not self.per_row:
            for s in self.batch_rows[0]:
                if s.layer == layer:
                    ops.append(self._make_op([s], None, device, dtype))
        else:
            # Group identical (mode, positions) ops at this layer; one op covers many rows.
            groups: dict[tuple[str, str, int], list[tuple[int, Steer]]] = {}
            for r, row in enumerate(self.batch_rows):
                k = 0
                for s in row:
                    if s.layer != layer:
                        continue
                    groups.setdefault((s.mode, s.positions, k), []).append((r, s))
                    k += 1  # the k-th op of a row at this layer keeps its order
            for (_mode, _pos, _k), members in sorted(groups.items(), key=lambda kv: kv[0][2]):
                rows = torch.tensor([r for r, _ in members], device=device)
                ops.append(self._make_op([s for _, s in members], rows, device, dtype))
        self._prepared[key] = ops
        return ops

    @staticmethod
    def _make_op(steers: list[Steer], rows: torch.Tensor | None,
                 device: torch.device, dtype: torch.dtype) -> _Op:
        vecs = torch.stack([s.vector.detach().to(torch.float32).reshape(-1) for s in steers])  # [R, H]
        norms = vecs.norm(dim=-1, keepdim=True)
        unit = vecs / norms.clamp_min(torch.finfo(torch.float32).tiny)
        if not bool(torch.isfinite(norms).all()):  # |v| beyond float32 (components near 1e38)
            wide = vecs.double()
            unit = (wide / wide.norm(dim=-1, keepdim=True).clamp_min(1e-300)).float()
        scales = torch.tensor([[s.scale] for s in steers], dtype=torch.float32)
        mode = steers[0].mode
        u = torch.stack([unit[i] if s.normalize else vecs[i] for i, s in enumerate(steers)])
        addend = (scales * u) if mode in ("add", "clamp") else None
        # Float32 for reduced-precision models: the hook computes in float32 (see _make_hook).
        work = torch.promote_types(dtype, torch.float32)
        conv = lambda t: None if t is None else t.to(device=device, dtype=work).unsqueeze(1)
        return _Op(
            mode=mode,
            positions=steers[0].positions,
            rows=rows,
            unit=conv(unit) if mode in ("project", "clamp") else None,
            addend=conv(addend),
            scale=conv(scales) if mode == "project" else None,  # [R, 1, 1]
        )

    # -- hooks -------------------------------------------------------------------------
    def _pre_model(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        self._offset = _offset_from_kwargs(kwargs)

    def _position_mask(self, op: _Op, seq_len: int, device: torch.device) -> torch.Tensor | None:
        """Float32 mask of the positions ``op`` steers in this call (None: all).

        ``[1, S, 1]`` for row-independent positions; ``[R, S, 1]`` (the op's rows, or every row)
        for ``prompt:A-B`` windows, which count from each row's first prompt token.
        """
        w: TokenWindow = op.window
        if w.kind == "all":
            return None
        if self.prompt_length is None:
            raise SteerdeskError(f"Steering positions {op.positions!r} need the prompt length.")
        p = self.prompt_length
        pos = torch.arange(self._offset, self._offset + seq_len, device=device)
        if w.kind == "prompt":
            keep = pos < p
        elif w.kind == "generated":
            keep = pos >= p
        elif w.kind == "gen":  # the passes producing generated tokens start..stop (see TokenWindow)
            keep = pos >= p - 1 + w.start
            if w.stop is not None:
                keep = keep & (pos <= p - 1 + w.stop)
        else:  # prompt_window: per row, prompt token i sits at column starts[r] + i
            starts = cast(torch.Tensor, self.prompt_starts)
            if op.rows is not None:
                starts = starts.index_select(0, op.rows.cpu())
            rel = pos.view(1, -1) - starts.to(device).view(-1, 1)  # [R, S]
            hi = w.stop if w.stop is not None else p
            keep2 = (rel >= w.start) & (rel <= hi) & (pos.view(1, -1) < p)
            return keep2.unsqueeze(-1).to(torch.float32)
        return keep.view(1, seq_len, 1).to(torch.float32)

    def _apply(self, op: _Op, x: torch.Tensor, scaled: bool) -> torch.Tensor:
        """Apply ``op`` to the hidden states ``x`` ``[B, S, H]`` (float32 or wider); same dtype out.

        ``scaled`` (models in a reduced dtype): ``project`` / ``clamp`` work on ``h / 2^k`` with
        ``2^(k+1) > max|h|`` per position (exact scaling), so the dot product cannot overflow
        float32 even for bfloat16 values near 3e38 when the exact result fits.
        """
        mask = self._position_mask(op, x.shape[1], x.device)
        if mask is not None and not bool(mask.any()):
            return x
        hr = x if op.rows is None else x.index_select(0, op.rows)
        # What each mode prepared (``_Op``): add -> addend; project -> unit, scale; clamp -> unit, addend.
        addend, unit, scale = cast(torch.Tensor, op.addend), cast(torch.Tensor, op.unit), cast(torch.Tensor, op.scale)
        if not scaled:  # float32 / float64 models: the original formulas, bit for bit
            if op.mode == "add":
                delta = addend
            else:
                coeff = (hr * unit).sum(dim=-1, keepdim=True)  # [R, S, 1]
                if op.mode == "project":
                    delta = -scale * coeff * unit
                else:  # clamp
                    delta = addend - coeff * unit
            if mask is not None:
                delta = delta * mask.to(x.dtype)
            new = hr + delta
        else:
            if op.mode == "add":
                new = hr + addend
            else:
                # s = 2^k with max|h| < 2s (k >= 0, at most 127): dividing by s is exact.
                _, exp = torch.frexp(hr.abs().amax(dim=-1, keepdim=True))  # max|h| < 2^exp
                s = torch.exp2((exp - 1).clamp(0, 127).to(hr.dtype))
                z = hr / s
                coeff = (z * unit).sum(dim=-1, keepdim=True)  # [R, S, 1], |coeff| < 2 sqrt(H)
                if op.mode == "project":
                    new = (z - scale * coeff * unit) * s
                else:  # clamp
                    new = (z - coeff * unit) * s + addend
            if mask is not None:
                new = torch.where(mask.bool(), new, hr)
        if op.rows is None:
            return new
        return x.index_copy(0, op.rows, new)

    @staticmethod
    def _cast_back(layer: int, ops: list[_Op], h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cast the float32 result ``y`` to the model's dtype once; refuse what does not fit.

        Raises ``SteerdeskError`` naming the layer, the mode(s), the largest |value| and the
        dtype's largest finite number when a steered value overflows the dtype (while the
        block's own output was finite: an overflow of the model itself is not steering's).
        """
        out = y.to(h.dtype)
        if bool(torch.isfinite(out).all()) or not bool(torch.isfinite(h).all()):
            return out
        modes = "/".join(sorted({op.mode for op in ops}))
        biggest = float(y.abs().amax())
        limit = torch.finfo(h.dtype).max
        raise SteerdeskError(
            f"Steering overflowed {str(h.dtype).replace('torch.', '')} at layer {layer} ({modes}): "
            f"max |value| {biggest:.4g} > {limit:.4g}, the largest {str(h.dtype).replace('torch.', '')} "
            f"number; lower the scale or load the model in float32.")

    def steer(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Block ``layer``'s output ``h`` ``[batch, seq, hidden]`` after this object's steering at that
        layer (``h`` itself when nothing steers there): what the hook on block ``layer`` returns.
        The direct block path of a sweep (:func:`~steerdesk.core.prefix.run_blocks`) calls it on a
        recorded output instead of running the block. Raises ``SteerdeskError`` for a per-row setup
        of another batch size, or a steered value that overflows the model's dtype."""
        ops = self._prepare(layer, h.device, h.dtype)
        if ops and self.per_row and h.shape[0] != len(self.batch_rows):
            raise SteerdeskError(
                f"Per-row steering was set up for {len(self.batch_rows)} rows but the batch has {h.shape[0]}."
            )
        if ops:
            # All arithmetic in float32 (a no-op conversion for float32 models), one cast back:
            # in float16 a dot product or a partial sum can overflow although the result fits.
            scaled = h.dtype.itemsize < 4
            y = h.float() if scaled else h
            for op in ops:
                y = self._apply(op, y, scaled)
            h = y if y.dtype == h.dtype else self._cast_back(layer, ops, h, y)
        if self.observe is not None and layer in self.watch:
            self.observe(layer, h)
        return h

    def _make_hook(self, layer: int) -> Callable[..., Any]:
        def hook(module: Any, args: Any, output: Any) -> Any:
            h = block_hidden(output)
            new = self.steer(layer, h)
            return _replace_hidden(output, new) if new is not h else None
        return hook

    def __enter__(self) -> Steering:
        try:
            self._handles.append(
                self.lm.model.register_forward_pre_hook(self._pre_model, with_kwargs=True))
            for layer in sorted(set(self.layers) | self.watch):
                self._handles.append(self.blocks[layer].register_forward_hook(self._make_hook(layer)))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove every hook this object installed."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def steers_for(vectors: torch.Tensor, layers: Sequence[int], *, scale: float = 1.0, mode: str = "add",
               normalize: bool = False, positions: str = "all") -> list[Steer]:
    """One :class:`Steer` per layer from a ``[num_layers, hidden]`` direction tensor."""
    out = []
    for layer in layers:
        check_layers([layer], vectors.shape[0], of="vectors")
        out.append(Steer(layer=layer, vector=vectors[layer], scale=scale, mode=mode,
                         normalize=normalize, positions=positions))
    return out
