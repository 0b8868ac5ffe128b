"""Scored layer x scale sweeps: where does a vector steer, and at what cost in fluency.

Every cell (a layer, or a named set of layers, times a scale) is scored on the same held-out
texts as :func:`steerdesk.core.evaluate.evaluate` would score it alone (to float rounding):
margin and fluency deltas versus unsteered, and optionally KL on neutral texts.

Two tricks make a sweep cheap:

* **per-row steering**: one forward pass carries several configurations, one batch row per
  (configuration, text);
* **prefix reuse**: a configuration whose first steered layer is L leaves blocks 0..L-1
  untouched, so their output is the unsteered one. One unsteered forward per text batch records
  the input of every block that starts a configuration (and the arguments the model passes to each
  block: mask, rotary embeddings, position ids); each configuration then runs only blocks L..end
  from the recorded input, followed by the final norm and the LM head. This works for any model
  whose blocks are called with batch-first tensors; a self-check against the model's own forward
  (first batch) falls back to full forward passes where it does not (``result.path == "full"``).

* **packing** (on top of prefix reuse): a pair's two replies share their prompt tokens and the
  texts of a row share the chat template's system prefix, kept apart by a custom 4D attention mask
  (:func:`steerdesk.core.evaluate.make_packed_layouts`); used only after the packed unsteered scores
  matched the model's own unpacked ones (``result.packed``).

Cells where steering is the identity (``add`` or ``project`` at scale 0) are not computed: their
delta is exactly 0. Rows whose layer(s) the vector set has no direction for (a GGUF control vector
has no block 0) are not computed either: their cells are null and the row is marked ``no_vector``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .datasets import Dataset
from .errors import Cancelled, SteerdeskError
from .evaluate import EvalTexts, Layout, Scores, TextScorer, _json_float, aggregate, make_packed_layouts, \
    model_logits, prepare_texts, reference_logprobs, score_tokens
from .memory import oom_guard
from .parsing import check_layers, parse_scales, parse_sets  # noqa: F401 - parse_*: names the window imported
from .steering import MODES, POSITIONS, Steer, Steering, _block_hidden

log = logging.getLogger(__name__)

FORMAT = "steerdesk.sweep/1"
DEFAULT_SCALES = (0.0, 0.5, 1.0, 2.0)
DEFAULT_BUDGET = 0.5
CACHE_BUDGET_BYTES = 2 << 30
_OOM_HINT = "try a smaller batch size or fewer rows per forward pass (--batch-size, --max-rows)."

#: ``on_cell(row, col, margin_delta, fluency_delta)``: row indexes ``layers`` then ``sets``.
CellCallback = Callable[[int, int, float, float], None]
Progress = Callable[[int, int], None]

# On a CPU, a steered forward of the direct path carries at most this many token rows (when one
# configuration of a batch allows): core/kernels.py runs a product of up to 1024 rows as one oneDNN
# call, a larger one in blocks whose outputs are then concatenated (a copy of every product's output).
CPU_FORWARD_TOKENS = 1024

# Final-norm attribute names on the base model, most common first (checked by the self-check).
_FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_norm", "norm_f", "ln_out")


# ============================================================================== result

@dataclass
class SetRow:
    """A named multi-layer configuration: one extra heatmap row."""

    name: str
    layers: list[int]
    margin_delta: list[float | None] = field(default_factory=list)
    fluency_delta: list[float | None] = field(default_factory=list)
    kl: list[float | None] | None = None
    no_vector: bool = False  # the vector set lacks a direction for one of the layers: not evaluated


@dataclass
class SweepResult:
    """A finished sweep; arrays are ``[layer][scale]`` (``None`` where a score was not finite, or
    for every cell of a row whose layer the vector set has no direction for: ``no_vector[row]``)."""

    layers: list[int]
    scales: list[float]
    margin_delta: list[list[float | None]]
    fluency_delta: list[list[float | None]]
    kl: list[list[float | None]] | None
    sets: list[SetRow]
    baseline: dict[str, Any]
    fluency_budget: float
    best: dict[str, Any] | None
    settings: dict[str, Any]
    model: dict[str, Any]
    vector: dict[str, Any]
    dataset: dict[str, Any]
    steerdesk_version: str = ""
    created: str = ""
    seconds: float = 0.0
    path: str = "prefix"  # "prefix" (prefix reuse) or "full" (full forward passes)
    packed: bool = False  # steered forwards ran on packed layouts (texts sharing prompt tokens)
    no_vector: list[bool] = field(default_factory=list)  # per layer row: no direction, not evaluated

    # -- cells -----------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return len(self.layers) + len(self.sets)

    def row_label(self, row: int) -> str:
        return f"layer {self.layers[row]}" if row < len(self.layers) else self.sets[row - len(self.layers)].name

    def row_layers(self, row: int) -> list[int]:
        return [self.layers[row]] if row < len(self.layers) else list(self.sets[row - len(self.layers)].layers)

    def row_has_vector(self, row: int) -> bool:
        """False for a row whose layer(s) the vector set has no direction for (cells null, never 0)."""
        if row < len(self.layers):
            return not (row < len(self.no_vector) and self.no_vector[row])
        return not self.sets[row - len(self.layers)].no_vector

    def cell(self, row: int, col: int) -> tuple[float | None, float | None]:
        """``(margin_delta, fluency_delta)`` of a cell; rows are layers then sets."""
        if row < len(self.layers):
            return self.margin_delta[row][col], self.fluency_delta[row][col]
        s = self.sets[row - len(self.layers)]
        return s.margin_delta[col], s.fluency_delta[col]

    def within_budget(self, row: int, col: int) -> bool:
        _, fluency = self.cell(row, col)
        return fluency is not None and -fluency <= self.fluency_budget

    # -- files -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "layers": self.layers,
            "scales": self.scales,
            "margin_delta": self.margin_delta,
            "fluency_delta": self.fluency_delta,
            "kl": self.kl,
            "no_vector": [not self.row_has_vector(r) for r in range(len(self.layers))],
            "sets": [{"name": s.name, "layers": s.layers, "margin_delta": s.margin_delta,
                      "fluency_delta": s.fluency_delta, "kl": s.kl, "no_vector": s.no_vector} for s in self.sets],
            "baseline": self.baseline,
            "fluency_budget": self.fluency_budget,
            "best": self.best,
            "settings": self.settings,
            "model": self.model,
            "vector": self.vector,
            "dataset": self.dataset,
            "steerdesk_version": self.steerdesk_version,
            "created": self.created,
            "seconds": self.seconds,
            "path": self.path,
            "packed": self.packed,
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> "SweepResult":
        if obj.get("format") != FORMAT:
            raise SteerdeskError(f"Not a steerdesk sweep (format {obj.get('format')!r}, expected {FORMAT}).")
        try:
            return cls(
                layers=[int(x) for x in obj["layers"]], scales=[float(x) for x in obj["scales"]],
                margin_delta=obj["margin_delta"], fluency_delta=obj["fluency_delta"], kl=obj.get("kl"),
                sets=[SetRow(s["name"], list(s["layers"]), s["margin_delta"], s["fluency_delta"], s.get("kl"),
                             bool(s.get("no_vector", False))) for s in obj.get("sets", [])],
                no_vector=[bool(x) for x in obj.get("no_vector") or []],
                baseline=dict(obj.get("baseline", {})), fluency_budget=float(obj["fluency_budget"]),
                best=obj.get("best"), settings=dict(obj.get("settings", {})), model=dict(obj.get("model", {})),
                vector=dict(obj.get("vector", {})), dataset=dict(obj.get("dataset", {})),
                steerdesk_version=str(obj.get("steerdesk_version", "")), created=str(obj.get("created", "")),
                seconds=float(obj.get("seconds", 0.0)), path=str(obj.get("path", "prefix")),
                packed=bool(obj.get("packed", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SteerdeskError(f"A sweep file is missing or has a bad field: {exc}.") from None

    def save(self, path: str | Path) -> None:
        """Write the result as JSON (atomic)."""
        from .fileio import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "SweepResult":
        try:
            obj = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SteerdeskError(f"Sweep file not found: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SteerdeskError(f"{path}: not a readable sweep file ({exc}).") from None
        return cls.from_dict(obj)


def pick_best(margin: Sequence[Sequence[float | None]], fluency: Sequence[Sequence[float | None]],
              budget: float) -> tuple[int, int] | None:
    """The (row, col) with the largest margin delta whose fluency loss is at most ``budget``."""
    best: tuple[int, int] | None = None
    best_value = -math.inf
    for r, (mrow, frow) in enumerate(zip(margin, fluency)):
        for c, (m, f) in enumerate(zip(mrow, frow)):
            if m is None or f is None or not math.isfinite(m) or not math.isfinite(f):
                continue
            if -f <= budget and m > best_value:
                best, best_value = (r, c), m
    return best


# ========================================================================== configurations

@dataclass
class _Cell:
    row: int
    col: int
    steers: list[Steer]
    start: int  # first steered layer
    identity: bool
    index: int = 0


def _is_identity(steers: Sequence[Steer]) -> bool:
    return all(s.mode in ("add", "project") and s.scale == 0 for s in steers)


# ============================================================================ prefix reuse

class _Unsupported(Exception):
    """The direct block path cannot run this model (a fallback, never shown to the user)."""


class _Capture:
    """Block inputs and block call arguments recorded during one unsteered forward."""

    def __init__(self, lm: Any, starts: Sequence[int]):
        self.lm = lm
        self.starts = set(starts)
        self.first = min(starts)
        self.inputs: dict[int, torch.Tensor] = {}
        self.calls: dict[int, tuple[tuple[Any, ...], dict[str, Any], bool]] = {}
        self._handles: list[Any] = []

    def _hook(self, layer: int) -> Callable[..., None]:
        def pre(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if args:
                hidden, rest, as_kw = args[0], tuple(args[1:]), False
            elif "hidden_states" in kwargs:
                hidden, rest, as_kw = kwargs["hidden_states"], (), True
            else:
                raise _Unsupported("block called without a hidden state")
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            self.calls[layer] = (rest, kw, as_kw)
            if layer in self.starts:
                self.inputs[layer] = hidden.detach().clone()
        return pre

    def __enter__(self) -> "_Capture":
        blocks = self.lm.blocks
        for layer in range(self.first, len(blocks)):
            self._handles.append(blocks[layer].register_forward_pre_hook(self._hook(layer), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.inputs.values())


class _RowPicker:
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
        raise _Unsupported(f"cannot batch a block argument of type {type(x).__name__}")


class _Tail:
    """Final norm + LM head (+ soft-capping) of a causal LM, found by name; verified by the self-check."""

    def __init__(self, lm: Any):
        model = lm.model
        base = getattr(model, "base_model", None) or model
        self.norm = None
        for name in _FINAL_NORMS:
            mod = getattr(base, name, None)
            if isinstance(mod, torch.nn.Module):
                self.norm = mod
                break
        if self.norm is None:
            raise _Unsupported("no final norm found")
        self.head = model.get_output_embeddings()
        if self.head is None:
            raise _Unsupported("no LM head")
        config = model.config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.logit_scale = getattr(config, "logit_scale", None)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        h = h.to(self.head.weight.device)
        logits = self.head(h)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _run_blocks(lm: Any, cap: _Capture, start: int, rows: int, idx: torch.Tensor) -> torch.Tensor:
    """Blocks ``start..end`` on the recorded input of block ``start``, batch rows ``idx`` of it."""
    pick = _RowPicker(rows, idx)
    h = pick(cap.inputs[start])
    for layer in range(start, len(lm.blocks)):
        if layer not in cap.calls:
            raise _Unsupported(f"block {layer} was not called by the model's forward")
        rest, kw, as_kw = cap.calls[layer]
        args = [pick(a) for a in rest]
        kwargs = {k: pick(v) for k, v in kw.items()}
        block = lm.blocks[layer]
        out = block(*args, hidden_states=h, **kwargs) if as_kw else block(h, *args, **kwargs)
        h = _block_hidden(out)
    return h


# ================================================================================= sweep

def _tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2


def _pack_tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2


class _PackMismatch(Exception):
    """Packed layouts did not reproduce the model's own unpacked scores (a fallback, never shown)."""


class _Sweeper:
    def __init__(self, lm: Any, texts: EvalTexts, cells: list[_Cell], *, batch_size: int, max_rows: int,
                 prefix_reuse: bool, cache_budget: int, cancel: threading.Event | None,
                 on_cell: Callable[[_Cell, Scores, Scores], None], progress: Callable[[], None],
                 pack: bool = True, pack_tokens: int = 320):
        self.lm = lm
        self.texts = texts
        self.cells = cells
        self.scorer = TextScorer(lm, texts, batch_size=batch_size, max_rows=max_rows)
        self.cancel = cancel
        self.on_cell = on_cell
        self._progress = progress
        self._ticks = 0
        self.path = "prefix" if prefix_reuse else "full"
        self.cache_budget = cache_budget
        self.checked = False
        self.tail: _Tail | None = None
        if prefix_reuse:
            try:
                self.tail = _Tail(lm)
            except _Unsupported as exc:
                log.info("prefix reuse off: %s", exc)
                self.path = "full"
        n = len(texts)
        self.lp = torch.full((len(cells), n), float("nan"), dtype=torch.float64)
        self.kl = torch.full((len(cells), n), float("nan"), dtype=torch.float64)
        self.work = [c for c in cells if not c.identity]
        self.starts = sorted({c.start for c in self.work})
        self.layouts: list[Layout] = self.scorer.layouts  # what the steered forwards run on
        self._pieces: dict[tuple[int, int], list[Layout]] = {}
        self.packed: list[Layout] | None = None
        self.verify = False  # check each packed baseline against the model's own unpacked scores
        if pack and self.path == "prefix" and self.starts:
            positions = {s.positions for c in self.work for s in c.steers}
            self.packed = make_packed_layouts(lm, texts, row_tokens=pack_tokens, max_rows=max(1, batch_size),
                                              positions="all" if positions == {"all"} else "mixed")
        if self.packed is not None:  # the unpacked reference pass, then everything on packed layouts
            self.layouts = self.packed
            self.total = len(self.scorer.layouts) + self.total_steps()
            self.layouts = self.scorer.layouts
        else:
            self.total = self.total_steps()

    def _check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("Sweep cancelled.")

    # -- planning ----------------------------------------------------------------------
    def chunks(self) -> list[list[int]]:
        """Groups of layouts whose recorded block inputs fit the cache budget together."""
        layouts = self.layouts
        if self.path == "full" or not self.starts:
            return [list(range(len(layouts)))]
        hidden = self.lm.info.hidden_size
        elem = torch.tensor([], dtype=next(self.lm.model.parameters()).dtype).element_size()
        groups: list[list[int]] = [[]]
        used = 0
        for li, lay in enumerate(layouts):
            need = lay.rows * lay.width * hidden * elem * len(self.starts)
            if groups[-1] and used + need > self.cache_budget:
                groups.append([])
                used = 0
            groups[-1].append(li)
            used += need
        return groups

    def groups(self, chunk: Sequence[int]) -> list[tuple[int, list[_Cell]]]:
        """``(start layer, cells)`` per forward group: every layout of ``chunk`` runs each group once."""
        sc = self.scorer
        if self.path == "prefix":  # the LM head runs on the scored tokens only, in chunks
            # max_rows counts texts (a packed row holds several); on a CPU a forward also stays within
            # CPU_FORWARD_TOKENS tokens where a whole batch of one configuration does.
            step = max(1, min(sc.max_rows // max(self.layouts[li].rows, self.layouts[li].n_segments) for li in chunk))
            if self.lm.input_device.type == "cpu":
                step = min(step, max(1, min(CPU_FORWARD_TOKENS // max(1, self.layouts[li].rows * self.layouts[li].width)
                                            for li in chunk)))
        else:
            step = min(sc.copies_per_forward(self.layouts[li]) for li in chunk)
        out = []
        for start in self.starts:
            at_start = [c for c in self.work if c.start == start]
            out.extend((start, at_start[g:g + step]) for g in range(0, len(at_start), step))
        return out

    def total_steps(self) -> int:
        return sum(len(chunk) * (1 + len(self.groups(chunk))) for chunk in self.chunks())

    # -- baseline ------------------------------------------------------------------------
    def baseline(self, li: int) -> _Capture | None:
        """Unsteered forward of one layout: baseline scores, KL reference, recorded block inputs."""
        self._check()
        sc, lay = self.scorer, self.layouts[li]
        cap = _Capture(self.lm, self.starts) if (self.path == "prefix" and self.starts) else None
        with torch.inference_mode(), oom_guard("sweeping", _OOM_HINT):
            if cap is not None:
                with cap:
                    logits, lo = model_logits(self.lm, lay.ids, lay.model_mask, lay.positions, lay.keep())
            else:
                logits, lo = model_logits(self.lm, lay.ids, lay.model_mask, lay.positions, lay.keep())
        at = lambda r, col: logits[r.to(logits.device), (col - lo).to(logits.device)]  # noqa: E731
        if lay.kind == "neutral":
            sc.refs[li] = reference_logprobs(lay, at, sc.vocab)
        row_lp, _ = score_tokens(lay, 1, at, sc.vocab)
        assert sc.baseline_lp is not None
        if self.verify:  # a packed layout: the baseline stays the model's own unpacked scores
            want = sc.baseline_lp[lay.texts]
            err = float((row_lp - want).abs().max())
            if not err <= _pack_tolerance(next(self.lm.model.parameters()).dtype):
                raise _PackMismatch(f"packed scores differ from the model's by {err:.3g}")
        else:
            sc.baseline_lp[lay.texts] = row_lp
        self.tick()
        return cap

    def plain_baseline(self, li: int) -> None:
        """The model's own unsteered scores of unpacked layout ``li`` (the reference for packing)."""
        self._check()
        sc, lay = self.scorer, self.scorer.layouts[li]
        with torch.inference_mode(), oom_guard("sweeping", _OOM_HINT):
            logits, lo = model_logits(self.lm, lay.ids, lay.mask, lay.positions, lay.keep())
        at = lambda r, col: logits[r.to(logits.device), (col - lo).to(logits.device)]  # noqa: E731
        row_lp, _ = score_tokens(lay, 1, at, sc.vocab)
        assert sc.baseline_lp is not None
        sc.baseline_lp[lay.texts] = row_lp
        self.tick()

    def self_check(self, li: int, cap: _Capture) -> bool:
        """The direct block path must reproduce the model's own unsteered scores.

        Checked on (at most) two texts of the first batch, each twice, from the lowest start
        layer: cheap, and it exercises the row selection, every block's arguments and the tail.
        """
        lay = self.layouts[li]
        assert self.scorer.baseline_lp is not None
        k = min(2, lay.rows)
        sub = lay.subset(list(range(k)) * 2)
        try:
            with torch.inference_mode():
                row_lp, _ = self._direct(sub, cap, min(self.starts), [[]], None, lay.rows)
        except _Unsupported as exc:
            log.info("prefix reuse off: %s", exc)
            return False
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            log.info("prefix reuse off: the direct block path failed (%s: %s)", type(exc).__name__, exc)
            return False
        want = self.scorer.baseline_lp[sub.texts]
        err = float((row_lp - want).abs().max())
        tol = _tolerance(next(self.lm.model.parameters()).dtype)
        if not err <= tol:
            log.info("prefix reuse off: the direct block path differs from the model by %.3g", err)
            return False
        return True

    # -- steered forwards ----------------------------------------------------------------
    def _direct(self, lay: Layout, cap: _Capture, start: int, configs: Sequence[Sequence[Steer]],
                ref: torch.Tensor | None, recorded_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``configs x rows of lay`` from the recorded input of block ``start``.

        ``lay.source_rows`` are the rows of the recorded batch (``recorded_rows`` of them) that
        ``lay`` holds; normally all of them.
        """
        assert self.tail is not None
        c = len(configs)
        src = torch.as_tensor(lay.source_rows, dtype=torch.long)
        idx = src.repeat(c)
        rows = [list(cfg) for cfg in configs for _ in range(lay.rows)]
        with Steering(self.lm, rows, prompt_length=lay.reply_col):
            h = _run_blocks(self.lm, cap, start, recorded_rows or lay.rows, idx)
        tail = self.tail

        def at(r: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
            sel = h[r.to(h.device), col.to(h.device)]
            return tail.logits(tail.norm(sel))
        return score_tokens(lay, c, at, self.scorer.vocab, ref)

    def run_group(self, li: int, cap: _Capture | None, start: int, group: list[_Cell]) -> None:
        self._check()
        configs = [c.steers for c in group]
        lay = self.layouts[li]
        if cap is None:
            with oom_guard("sweeping", _OOM_HINT):
                parts = [(lay, *self.scorer.forward(li, configs))]
        else:
            parts = []
            for piece in self.pieces(li):
                with oom_guard("sweeping", _OOM_HINT), torch.inference_mode():
                    parts.append((piece, *self._direct(piece, cap, start, configs,
                                                       self.scorer.refs.get(li) if piece is lay else None, lay.rows)))
        for piece, row_lp, row_kl in parts:
            for k, cell in enumerate(group):
                sl = slice(k * piece.n_segments, (k + 1) * piece.n_segments)
                self.lp[cell.index, piece.texts] = row_lp[sl]
                if row_kl is not None:
                    self.kl[cell.index, piece.texts] = row_kl[sl]
        self.tick()

    def pieces(self, li: int) -> list[Layout]:
        """Layout ``li`` cut into row groups of at most ``CPU_FORWARD_TOKENS`` tokens (CPU, no KL
        reference to cut along); the whole layout otherwise."""
        lay = self.layouts[li]
        key = (id(lay), li)
        hit = self._pieces.get(key)
        if hit is not None:
            return hit
        per = max(1, CPU_FORWARD_TOKENS // max(1, lay.width))
        if self.lm.input_device.type != "cpu" or lay.kind == "neutral" or li in self.scorer.refs or per >= lay.rows:
            out = [lay]
        else:
            n = -(-lay.rows // per)
            per = -(-lay.rows // n)  # even pieces
            out = [lay.subset(range(i, min(i + per, lay.rows))) for i in range(0, lay.rows, per)]
        self._pieces[key] = out
        return out

    # -- driver --------------------------------------------------------------------------
    def run(self) -> Scores:
        """Run every cell; returns the unsteered scores. Cells are reported when complete."""
        sc = self.scorer
        n = len(self.texts)
        sc.baseline_lp = torch.full((n,), float("nan"), dtype=torch.float64)
        neutral = torch.tensor([k == "neutral" for k in self.texts.kinds])
        sc.baseline_kl = torch.where(neutral, torch.zeros(n, dtype=torch.float64),
                                     torch.full((n,), float("nan"), dtype=torch.float64))
        if self.packed is not None:
            for li in range(len(sc.layouts)):
                self.plain_baseline(li)
            self.layouts, self.verify = self.packed, True
            try:
                return self._run_layouts()
            except _PackMismatch as exc:
                log.info("packing off: %s", exc)
            self.layouts, self.verify, self.checked = sc.layouts, False, False
            sc.refs.clear()
            self.total = self.tick_count() + self.total_steps()
        return self._run_layouts()

    def tick(self) -> None:
        self._ticks += 1
        self._progress()

    def tick_count(self) -> int:
        return self._ticks

    def _run_layouts(self) -> Scores:
        sc = self.scorer
        chunks = self.chunks()
        base: Scores | None = None
        for ci, chunk in enumerate(chunks):
            last_chunk = ci == len(chunks) - 1
            caps: dict[int, _Capture | None] = {}
            for li in chunk:
                caps[li] = self.baseline(li)
                cap = caps[li]
                if self.path == "prefix" and not self.checked and cap is not None \
                        and self.layouts[li].kind == "heldout":
                    self.checked = True
                    if not self.self_check(li, cap):
                        if self.verify:  # unpacked layouts first, then (if they fail too) full passes
                            raise _PackMismatch("the direct block path differs on packed layouts")
                        self.path = "full"
                        self.total = self.total_steps()  # full passes carry fewer configurations
            if self.path == "full":
                caps.clear()  # also frees what was recorded before a failed self-check
            if last_chunk:
                base = aggregate(self.texts, sc.baseline_lp, sc.baseline_kl)
                for cell in self.cells:  # identity cells are the baseline itself
                    if cell.identity:
                        self.lp[cell.index] = sc.baseline_lp
                        self.kl[cell.index] = sc.baseline_kl
                        self.on_cell(cell, base, base)
            for start, group in self.groups(chunk):
                for li in chunk:
                    self.run_group(li, caps.get(li), start, group)
                if last_chunk:
                    assert base is not None
                    for cell in group:
                        self.on_cell(cell, aggregate(self.texts, self.lp[cell.index], self.kl[cell.index]), base)
            caps.clear()
        assert base is not None
        return base


def _directions(vectors: Any) -> torch.Tensor:
    d = getattr(vectors, "directions", vectors)
    if not isinstance(d, torch.Tensor) or d.ndim != 2:
        raise SteerdeskError("The sweep needs a vector set ([layers, hidden] directions).")
    return d


def layers_without_direction(vectors: Any, layers: Sequence[int]) -> list[int]:
    """Those of ``layers`` the vectors have no direction for (issue 10: absent is not zero).

    A :class:`~steerdesk.core.vectors.VectorSet` answers itself (a GGUF control vector has no
    block 0; other tools' files may skip layers); for a raw ``[layers, hidden]`` tensor an all-zero
    row is taken as no direction.
    """
    ask = getattr(vectors, "layers_without_direction", None)
    if callable(ask):
        return [int(x) for x in ask(list(layers))]
    d = _directions(vectors)
    return [int(x) for x in layers if 0 <= x < d.shape[0] and not bool(d[x].detach().ne(0).any())]


def rows_without_direction(vectors: Any, rows: Sequence[Sequence[int]]) -> list[list[int]]:
    """Per sweep row (its layers), the layers without a direction; an empty list = the row can run."""
    return [layers_without_direction(vectors, ls) for ls in rows]


def vector_identity(vectors: Any, path: str | None = None) -> dict[str, Any]:
    """What identifies a vector set in a result or a record."""
    d = _directions(vectors).detach().to(torch.float32).contiguous().cpu()
    meta = dict(getattr(vectors, "metadata", {}) or {})
    out: dict[str, Any] = {k: meta[k] for k in ("model", "architecture", "method", "read_position", "dataset_name",
                                                "dataset_sha256", "created") if k in meta}
    out["directions_sha256"] = hashlib.sha256(d.numpy().tobytes()).hexdigest()
    if path is not None:
        out["path"] = str(path)
    return out


def model_identity(lm: Any) -> dict[str, Any]:
    """Model id, revision (when the hub gave one), architecture, dtype, device, chat template hash."""
    info = lm.info
    config = getattr(lm.model, "config", None)
    template = getattr(lm.tokenizer, "chat_template", None)
    return {
        "name": info.name,
        "architecture": info.architecture,
        "revision": getattr(config, "_commit_hash", None),
        "num_layers": info.num_layers,
        "hidden_size": info.hidden_size,
        "dtype": info.dtype,
        "device": info.device,
        "chat_template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest() if isinstance(template, str)
        else None,
    }


def sweep(
    lm: Any,
    vectors: Any,
    heldout: Dataset,
    *,
    layers: Sequence[int] | None = None,
    scales: Sequence[float] = DEFAULT_SCALES,
    sets: Mapping[str, Sequence[int]] | None = None,
    mode: str = "add",
    normalize: bool = False,
    positions: str = "all",
    fluency_budget: float = DEFAULT_BUDGET,
    neutral: Sequence[str] | None = None,
    system: str | None = None,
    max_pairs: int | None = None,
    batch_size: int = 16,
    max_rows: int = 64,
    prefix_reuse: bool = True,
    pack: bool = True,
    cache_budget: int = CACHE_BUDGET_BYTES,
    vector_path: str | None = None,
    on_cell: CellCallback | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> SweepResult:
    """Score every (layer or layer set) x scale cell on held-out pairs; see the module docstring.

    ``vectors`` is a :class:`~steerdesk.core.vectors.VectorSet` (or a ``[layers, hidden]`` tensor).
    ``layers`` defaults to every layer. ``sets`` adds named multi-layer rows (``{"mid": [12, 15]}``),
    each steered with its layers' own vectors at the cell's scale. ``on_cell(row, col, margin_delta,
    fluency_delta)`` is called as each cell is done (rows: ``layers`` first, then ``sets``; identity
    cells first). ``progress(done, total)`` counts forward passes; ``cancel`` is checked before each
    and raises :class:`~steerdesk.core.errors.Cancelled`.
    """
    from .. import __version__

    t0 = time.perf_counter()
    directions = _directions(vectors)
    info = lm.info
    if directions.shape[1] != info.hidden_size:
        raise SteerdeskError(f"The vectors have hidden size {directions.shape[1]}, the model {info.hidden_size}.")
    if mode not in MODES:
        raise SteerdeskError(f"Unknown steering mode {mode!r}; use one of {', '.join(MODES)}.")
    if positions not in POSITIONS:
        raise SteerdeskError(f"Unknown positions {positions!r}; use one of {', '.join(POSITIONS)}.")
    if not (isinstance(fluency_budget, (int, float)) and math.isfinite(fluency_budget) and fluency_budget >= 0):
        raise SteerdeskError("The fluency budget must be a number >= 0.")
    n_vec = directions.shape[0]
    layer_list = list(range(min(n_vec, info.num_layers))) if layers is None else [int(x) for x in layers]
    layer_list = list(dict.fromkeys(layer_list))
    scale_list = [float(s) for s in scales]
    if not scale_list:
        raise SteerdeskError("No scales given.")
    set_items = [(str(k), sorted(dict.fromkeys(int(x) for x in v))) for k, v in (sets or {}).items()]
    if not layer_list and not set_items:
        raise SteerdeskError("No layers given.")
    for s_name, s_layers in set_items:
        if not s_layers:
            raise SteerdeskError(f"Layer set {s_name!r} is empty.")
    every_layer = layer_list + [x for _, ls in set_items for x in ls]
    check_layers(every_layer, info.num_layers)
    check_layers(every_layer, n_vec, of="vectors")

    cells: list[_Cell] = []
    row_layers = [[layer] for layer in layer_list] + [ls for _, ls in set_items]
    missing = rows_without_direction(vectors, row_layers)
    if all(missing):
        gone = sorted({x for m in missing for x in m})
        raise SteerdeskError(f"The vectors have no direction for layer{'s' if len(gone) > 1 else ''} "
                             f"{', '.join(map(str, gone))}: nothing to sweep (choose layers the set covers).")
    for r, ls in enumerate(row_layers):
        if missing[r]:
            continue  # "no vector": not evaluated, null cells (never a measured 0)
        for c, scale in enumerate(scale_list):
            steers = [Steer(layer=x, vector=directions[x], scale=scale, mode=mode, normalize=normalize,
                            positions=positions) for x in ls]
            for s in steers:
                s.check(info.num_layers, info.hidden_size)
            cells.append(_Cell(r, c, steers, start=min(ls), identity=_is_identity(steers), index=len(cells)))

    texts = prepare_texts(lm, heldout, neutral=neutral, system=system, max_pairs=max_pairs)
    n_rows, n_cols = len(row_layers), len(scale_list)
    margin = [[math.nan] * n_cols for _ in range(n_rows)]
    fluency = [[math.nan] * n_cols for _ in range(n_rows)]
    kl = [[math.nan] * n_cols for _ in range(n_rows)]
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], max(sweeper.total, done[0]))

    def cell_done(cell: _Cell, scores: Scores, base: Scores) -> None:
        m, f = scores.margin - base.margin, scores.fluency - base.fluency
        margin[cell.row][cell.col] = m
        fluency[cell.row][cell.col] = f
        kl[cell.row][cell.col] = scores.kl if scores.kl is not None else math.nan
        if on_cell is not None:
            on_cell(cell.row, cell.col, m, f)

    sweeper = _Sweeper(lm, texts, cells, batch_size=batch_size, max_rows=max_rows, prefix_reuse=prefix_reuse,
                       cache_budget=cache_budget, cancel=cancel, on_cell=cell_done, progress=tick, pack=pack)
    baseline = sweeper.run()

    to_json = lambda rows: [[_json_float(x) for x in row] for row in rows]  # noqa: E731
    n_layers = len(layer_list)
    has_kl = texts.n_neutral > 0
    set_rows = [SetRow(name, ls, [_json_float(x) for x in margin[n_layers + i]],
                       [_json_float(x) for x in fluency[n_layers + i]],
                       [_json_float(x) for x in kl[n_layers + i]] if has_kl else None,
                       no_vector=bool(missing[n_layers + i]))
                for i, (name, ls) in enumerate(set_items)]
    all_margin = to_json(margin)
    all_fluency = to_json(fluency)
    best_cell = pick_best(all_margin, all_fluency, float(fluency_budget))
    best = None
    if best_cell is not None:
        r, c = best_cell
        best = {"row": r, "col": c, "layer": layer_list[r] if r < n_layers else None,
                "set": set_items[r - n_layers][0] if r >= n_layers else None, "layers": row_layers[r],
                "scale": scale_list[c], "margin_delta": all_margin[r][c], "fluency_delta": all_fluency[r][c]}
    from_meta = getattr(vectors, "metadata", {}) or {}
    return SweepResult(
        layers=layer_list,
        scales=scale_list,
        margin_delta=all_margin[:n_layers],
        fluency_delta=all_fluency[:n_layers],
        kl=to_json(kl[:n_layers]) if has_kl else None,
        sets=set_rows,
        baseline={"margin": _json_float(baseline.margin), "fluency": _json_float(baseline.fluency)},
        fluency_budget=float(fluency_budget),
        best=best,
        settings={"mode": mode, "normalize": normalize, "positions": positions, "system": system,
                  "max_pairs": max_pairs, "batch_size": batch_size, "max_rows": max_rows,
                  "prefix_reuse": prefix_reuse, "pack": pack, "neutral_texts": list(neutral) if neutral else None,
                  "read_position": from_meta.get("read_position")},
        model=model_identity(lm),
        vector=vector_identity(vectors, vector_path),
        dataset={"name": texts.dataset_name, "sha256": texts.dataset_sha256, "n_pairs": texts.n_pairs,
                 "n_base": len(texts.indices("base")), "n_target": len(texts.indices("target")),
                 "n_neutral": texts.n_neutral},
        steerdesk_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        seconds=round(time.perf_counter() - t0, 3),
        path=sweeper.path,
        packed=sweeper.path == "prefix" and sweeper.layouts is sweeper.packed,
        no_vector=[bool(m) for m in missing[:n_layers]],
    )


# ================================================================================== PNG

_COOL = (59, 76, 192)
_MID = (242, 242, 242)
_WARM = (180, 4, 38)

# 3x5 bitmap digits for axis labels (rows of 3 bits, top to bottom).
_GLYPHS = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 2, 2),
    "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7), ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0),
    "#": (5, 7, 5, 7, 5), " ": (0, 0, 0, 0, 0),
    # letters for the "NO VECTOR" row label
    "N": (6, 5, 5, 5, 5), "O": (2, 5, 5, 5, 2), "V": (5, 5, 5, 5, 2), "E": (7, 4, 6, 4, 7),
    "C": (3, 4, 4, 4, 3), "T": (7, 2, 2, 2, 2), "R": (6, 5, 6, 5, 5),
}
NO_VECTOR_LABEL = "NO VECTOR"
#: Colours of a "no vector" row in the PNG: light background, dark hatching (not a value colour).
NO_VECTOR_BG = (236, 232, 220)
NO_VECTOR_HATCH = (90, 90, 90)


def diverging_rgb(x: float) -> tuple[int, int, int]:
    """Blue (-1) - light grey (0) - red (+1); clipped."""
    x = max(-1.0, min(1.0, x))
    end = _WARM if x > 0 else _COOL
    t = abs(x)
    return tuple(int(round(m + (e - m) * t)) for m, e in zip(_MID, end))  # type: ignore[return-value]


def _png_bytes(pixels: "Any") -> bytes:
    """A minimal RGB PNG from a ``[H, W, 3]`` uint8 numpy array."""
    import numpy as np

    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + np.ascontiguousarray(pixels[y]).tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _text(img: "Any", x: int, y: int, s: str, scale: int = 2) -> None:
    for ch in s:
        glyph = _GLYPHS.get(ch, _GLYPHS[" "])
        for gy, bits in enumerate(glyph):
            for gx in range(3):
                if bits & (4 >> gx):
                    img[y + gy * scale:y + (gy + 1) * scale, x + gx * scale:x + (gx + 1) * scale] = 30
        x += 4 * scale


def heatmap_png(result: SweepResult, path: str | Path, *, cell_w: int = 36, cell_h: int = 14) -> None:
    """Write the margin-delta heatmap as a PNG (no Qt): rows = layers (then sets), columns = scales.

    Diverging colours with symmetric limits (+-max |margin delta|, shown in the colour bar at the
    right); cells beyond the fluency budget are dimmed and hatched; the best cell is framed. Rows are
    labelled with their layer; named sets with ``#1``, ``#2``... in order. A row the vector set has no
    direction for is drawn as one beige band with dense dark hatching and the words ``NO VECTOR``
    (no value colour: it was not measured).
    """
    import numpy as np

    from .fileio import atomic_write_with

    rows = [result.cell(r, c) for r in range(result.n_rows) for c in range(len(result.scales))]
    finite = [abs(m) for m, _ in rows if m is not None and math.isfinite(m)]
    limit = max(finite) if finite and max(finite) > 0 else 1.0
    label_w = 8 * 4 + 4
    top = 16
    n_r, n_c = result.n_rows, len(result.scales)
    bar_x = label_w + n_c * cell_w + 10
    width = bar_x + 12 + 8 * 8
    height = max(top + n_r * cell_h + 4, top + 120)
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    for c, scale in enumerate(result.scales):
        _text(img, label_w + c * cell_w + 2, 3, f"{scale:g}"[:4])
    for r in range(n_r):
        y0 = top + r * cell_h
        label = str(result.layers[r]) if r < len(result.layers) else f"#{r - len(result.layers) + 1}"
        _text(img, 2, y0 + 2, label[:4])
        if not result.row_has_vector(r):
            yy, xx = np.mgrid[0:cell_h - 1, 0:n_c * cell_w - 1]
            band = np.empty((cell_h - 1, n_c * cell_w - 1, 3), dtype=np.uint8)
            band[:] = NO_VECTOR_BG
            band[(xx - yy) % 4 == 0] = NO_VECTOR_HATCH
            img[y0:y0 + cell_h - 1, label_w:label_w + n_c * cell_w - 1] = band
            scale = 2 if n_c * cell_w - 1 >= 4 * 2 * len(NO_VECTOR_LABEL) + 4 else 1
            text_w = 4 * scale * len(NO_VECTOR_LABEL)
            tx = label_w + max(0, (n_c * cell_w - text_w) // 2)
            ty = y0 + max(0, (cell_h - 1 - 5 * scale) // 2)
            img[ty - 1:ty + 5 * scale + 1, tx - 2:tx + text_w + 1] = NO_VECTOR_BG  # a clear box for the words
            _text(img, tx, ty, NO_VECTOR_LABEL, scale)
            continue
        for c in range(n_c):
            m, f = result.cell(r, c)
            x0 = label_w + c * cell_w
            color = np.array(diverging_rgb(m / limit) if m is not None else (128, 128, 128), dtype=np.float64)
            block = np.empty((cell_h - 1, cell_w - 1, 3))
            block[:] = color
            if not result.within_budget(r, c):
                block = 0.45 * block + 0.55 * 200  # dimmed ...
                yy, xx = np.mgrid[0:cell_h - 1, 0:cell_w - 1]
                block[(xx + yy) % 6 == 0] = 120  # ... and hatched
            img[y0:y0 + cell_h - 1, x0:x0 + cell_w - 1] = block.astype(np.uint8)
    if result.best is not None:
        r, c = result.best["row"], result.best["col"]
        x0, y0 = label_w + c * cell_w, top + r * cell_h
        for t in range(2):
            img[y0 + t, x0:x0 + cell_w - 1] = 0
            img[y0 + cell_h - 2 - t, x0:x0 + cell_w - 1] = 0
            img[y0:y0 + cell_h - 1, x0 + t] = 0
            img[y0:y0 + cell_h - 1, x0 + cell_w - 2 - t] = 0
    bar_h = 100
    for i in range(bar_h):
        img[top + i, bar_x:bar_x + 10] = diverging_rgb(1 - 2 * i / (bar_h - 1))
    _text(img, bar_x + 13, top, f"{limit:.2g}"[:6])
    _text(img, bar_x + 13, top + bar_h // 2 - 5, "0")
    _text(img, bar_x + 13, top + bar_h - 10, f"-{limit:.2g}"[:7])
    data = _png_bytes(img)
    atomic_write_with(path, lambda tmp: tmp.write_bytes(data))


def format_table(result: SweepResult) -> str:
    """The margin deltas as text, one row per layer (set): ``*`` on the best cell, ``~`` beyond the
    fluency budget, ``nan`` for a cell whose score was not finite, and ``no vector`` across a row
    whose layer(s) the vector set has no direction for (never a number: nothing was measured)."""
    lines = ["margin delta (nats/token); '~' = fluency loss beyond the budget, '*' = best",
             f"{'':>10}" + "".join(f"{s:>10g}" for s in result.scales)]
    best = result.best or {}
    for r in range(result.n_rows):
        label = str(result.layers[r]) if r < len(result.layers) else result.sets[r - len(result.layers)].name
        if not result.row_has_vector(r):
            lines.append(f"{label[:10]:>10}" + f"{'no vector':>10}" + " " * (10 * (len(result.scales) - 1)))
            continue
        cells = []
        for c in range(len(result.scales)):
            m, _ = result.cell(r, c)
            mark = "*" if (best.get("row"), best.get("col")) == (r, c) else (
                " " if result.within_budget(r, c) else "~")
            cells.append(f"{'nan' if m is None else format(m, '+.3f'):>9}{mark}")
        lines.append(f"{label[:10]:>10}" + "".join(cells))
    if result.best:
        b = result.best
        where = f"layer {b['layer']}" if b["layer"] is not None else f"set {b['set']} {b['layers']}"
        lines.append(f"best: {where} x{b['scale']:g}: margin {b['margin_delta']:+.3f}, "
                     f"fluency {b['fluency_delta']:+.3f} (budget {result.fluency_budget:g})")
    else:
        lines.append(f"no cell within the fluency budget {result.fluency_budget:g}")
    missing = [result.row_label(r) for r in range(result.n_rows) if not result.row_has_vector(r)]
    if missing:
        lines.append(f"no vector (not evaluated): {', '.join(missing)}")
    return "\n".join(lines)


__all__ = ["sweep", "SweepResult", "SetRow", "pick_best", "parse_scales", "parse_sets", "heatmap_png",
           "format_table", "layers_without_direction", "rows_without_direction",
           "model_identity", "vector_identity", "DEFAULT_SCALES", "DEFAULT_BUDGET", "FORMAT"]
