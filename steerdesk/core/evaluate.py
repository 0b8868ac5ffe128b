"""Held-out scores of a steering configuration, from forward passes only (no generation).

Every reply of a held-out contrast set (base and target) is scored by its **mean log-probability
per token** given its prompt. The reply tokens are those from ``Encoded.reply_start`` (chat template
applied, as in extraction) to the end; the first one is predicted from the last prompt token.

* **behaviour margin** = mean over target replies - mean over base replies (for a paired set this is
  the mean over pairs of target minus base);
* **fluency** = mean over all replies, base and target;
* **KL** (optional) = mean over the reply tokens of neutral texts of KL(unsteered || steered) of the
  next-token distribution.

Everything is reported as a delta versus unsteered (KL is one already).

Batching: each batch row is one (configuration, text) pair, steered with per-row
:class:`~steerdesk.core.steering.Steering`. Rows are laid out with the prompt left-padded and the
reply right-padded, so every reply starts at the same column: one prompt length then serves the
whole batch, and the ``prompt`` / ``generated`` steering positions mean prompt / reply tokens, as
they do in generation. Position ids are explicit (``cumsum(mask) - 1``), so padding changes nothing.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .datasets import Dataset
from .errors import Cancelled, SteerdeskError
from .extract import forward_with_positions
from .layouts import (
    EvalTexts,
    Layout,
    make_layout,
    make_layouts,
    make_packed_layouts,
    prepare_texts,
)
from .memory import oom_guard
from .models import LoadedModel
from .steering import Steer, Steering

Progress = Callable[[int, int], None]

#: Short, neutral assistant-style texts for the optional KL measure (no persona, no tone).
NEUTRAL_TEXTS: tuple[str, ...] = (
    "The train leaves the station at nine in the morning and arrives shortly after noon.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "To make a cup of tea, heat the water, add the tea bag and let it steep for a few minutes.",
    "The library is open from Monday to Friday, and it closes early on public holidays.",
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar and oxygen.",
    "The meeting has been moved to Thursday afternoon in the small conference room.",
    "A triangle has three sides, and the sum of its angles is one hundred and eighty degrees.",
    "Please remember to water the plants and close the windows before you leave.",
)

#: Upper bound on one float32 logits block ``[tokens, vocab]`` (memory, not speed).
LOGITS_BUDGET_BYTES = 256 << 20

_OOM_HINT = "try a smaller batch size or fewer rows per forward pass."


# =============================================================================== scores

@dataclass
class Scores:
    """Absolute scores of one configuration (mean log-prob per token, nats)."""

    margin: float
    fluency: float
    kl: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The scores as JSON-ready values (non-finite -> None)."""
        return {k: json_float(v) for k, v in asdict(self).items()}


@dataclass
class Evaluation:
    """One configuration against unsteered, on the same texts."""

    unsteered: Scores
    steered: Scores
    n_pairs: int
    n_neutral: int = 0

    @property
    def margin_delta(self) -> float:
        """Steered minus unsteered behaviour margin (nats/token)."""
        return self.steered.margin - self.unsteered.margin

    @property
    def fluency_delta(self) -> float:
        """Steered minus unsteered mean log-probability per token (negative: less fluent)."""
        return self.steered.fluency - self.unsteered.fluency

    @property
    def kl(self) -> float | None:
        """Mean KL(unsteered || steered) on the neutral texts, or None without them."""
        return self.steered.kl

    def to_dict(self) -> dict[str, Any]:
        """The evaluation as JSON-ready values (non-finite -> None)."""
        return {"margin_delta": json_float(self.margin_delta), "fluency_delta": json_float(self.fluency_delta),
                "kl": json_float(self.kl), "unsteered": self.unsteered.to_dict(),
                "steered": self.steered.to_dict(), "n_pairs": self.n_pairs, "n_neutral": self.n_neutral}


def json_float(x: float | None) -> float | None:
    """JSON has no NaN: a non-finite score (steering blew the model up) becomes null."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# ============================================================================= scoring

def logits_chunk_tokens(vocab: int, budget: int = LOGITS_BUDGET_BYTES) -> int:
    """Tokens per float32 logits block ``[tokens, vocab]`` that fit in ``budget`` bytes (at least 1)."""
    return max(1, budget // max(1, vocab * 4))


class Workspace:
    """Output buffers reused from one scoring call to the next (log-softmax, KL terms, LM head).

    A ``[tokens, vocab]`` float32 block is tens of MB: above glibc's largest mmap threshold (32 MB),
    so every fresh one is new pages the kernel must fault in and zero, which on a CPU cost as much
    as the log-softmax itself (2026-12-01, Xeon, 442 x 49152: ``exp`` into a fresh tensor 0.129 ms
    per row, into a reused one 0.038). A buffer handed out is valid until the next :meth:`take`
    of the same name.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised ``shape`` tensor, carved from buffer ``name`` (grown when too small)."""
        n = 1
        for d in shape:
            n *= int(d)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[name] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(*shape)


def logits_picker(logits: torch.Tensor, lo: int, workspace: Workspace | None = None
                  ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``at(rows, cols)`` -> ``[n, vocab]``: the rows of ``logits`` (``[B, K, vocab]``, column ``lo``
    first, as :func:`model_logits` returns them) at batch coordinates ``(rows, cols)``, copied into
    ``workspace``'s ``"picked"`` buffer when one is given (valid until the next call)."""
    b, k, v = logits.shape
    flat = logits.reshape(b * k, v)

    def at(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        idx = rows.to(logits.device) * k + (cols.to(logits.device) - lo)
        out = workspace.take("picked", (idx.numel(), v), logits.dtype, logits.device) if workspace else None
        return torch.index_select(flat, 0, idx, out=out) if out is not None else flat.index_select(0, idx)
    return at


def score_tokens(
    lay: Layout,
    copies: int,
    logits_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    vocab: int,
    ref: torch.Tensor | None = None,
    workspace: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-segment mean log-prob of the scored tokens (and mean KL vs ``ref``) of a tiled batch.

    ``logits_at(rows, cols)`` returns ``[n, vocab]`` logits at those batch coordinates.
    ``ref`` (``[N, vocab]`` unsteered log-probs of the untiled batch's scored tokens) turns on KL.
    ``workspace`` holds the ``[n, vocab]`` intermediates between calls (same values, no fresh pages).
    Returns CPU float64 tensors of ``copies * n_segments`` values (one per text and copy; for a
    layout of one text per row, that is one per row).
    """
    n, b, ns = lay.n_tokens, lay.rows, lay.n_segments
    assert lay.seg is not None
    total = copies * n
    # At most 1024 tokens per head product: one oneDNN block on a CPU (core/kernels.py), no copy.
    chunk = min(logits_chunk_tokens(vocab), 1024)
    lp_sum = torch.zeros(copies * ns, dtype=torch.float64)
    kl_sum = torch.zeros(copies * ns, dtype=torch.float64) if ref is not None else None
    for start in range(0, total, chunk):
        t = torch.arange(start, min(start + chunk, total), device=lay.tok.device)
        k, j = t // n, t % n
        rows = lay.src_row[j] + k * b
        logits = logits_at(rows, lay.src_col[j]).float()
        tok = lay.tok[j].to(logits.device)
        out = (lay.seg[j] + k * ns).cpu()
        take = (lambda name: workspace.take(name, logits.shape, logits.dtype, logits.device)) if workspace \
            else (lambda name: None)
        # One fused kernel (logsumexp is several passes on a CPU).
        logp = torch.log_softmax(logits, -1, out=take("logp")) if workspace else logits.log_softmax(-1)
        lp = logp.gather(-1, tok[:, None]).squeeze(-1)
        if kl_sum is not None:
            assert ref is not None
            r = ref[j.to(ref.device)].to(logp.device)
            kl = (torch.exp(r, out=take("kl_p")).mul_(torch.sub(r, logp, out=take("kl_d")))).sum(-1) if workspace \
                else (r.exp() * (r - logp)).sum(-1)
            kl_sum.index_add_(0, out, kl.double().cpu())
        lp_sum.index_add_(0, out, lp.double().cpu())
    counts = lay.counts.double().repeat(copies)
    return lp_sum / counts, (kl_sum / counts if kl_sum is not None else None)


def reference_logprobs(lay: Layout, logits_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                       vocab: int) -> torch.Tensor:
    """``[N, vocab]`` float32 log-probs at the scored tokens of an untiled batch (the KL reference)."""
    chunk = logits_chunk_tokens(vocab)
    parts = []
    for start in range(0, lay.n_tokens, chunk):
        j = torch.arange(start, min(start + chunk, lay.n_tokens), device=lay.tok.device)
        parts.append(logits_at(lay.src_row[j], lay.src_col[j]).float().log_softmax(-1))
    return torch.cat(parts)


def model_logits(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 keep: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The model's own logits at columns ``keep`` (``[B, K, V]``) and the first kept column.

    Uses ``logits_to_keep`` so the LM head runs on the reply window only; falls back to all
    columns for a model whose forward lacks it.
    """
    try:
        out = forward_with_positions(lm.model, ids, mask, positions, use_cache=False, logits_to_keep=keep)
        return out.logits, int(keep[0])
    except TypeError as exc:
        if "logits_to_keep" not in str(exc):
            raise
        out = forward_with_positions(lm.model, ids, mask, positions, use_cache=False)
        return out.logits, 0


def vocab_size(lm: LoadedModel) -> int:
    """Size of the model's output vocabulary (LM head rows)."""
    head = lm.model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    return int(lm.model.config.vocab_size)


Config = Sequence[Steer]


class TextScorer:
    """Scores of many configurations on one :class:`EvalTexts`, with full forward passes.

    Rows of a forward are ``copies x texts`` of one batch; ``max_rows`` and the logits budget
    bound how many configurations share a forward. The unsteered baseline is computed once
    (and is the KL reference).
    """

    def __init__(self, lm: LoadedModel, texts: EvalTexts, *, batch_size: int = 16, max_rows: int = 64):
        if max_rows < 1:
            raise SteerdeskError("The number of rows per forward pass must be at least 1.")
        self.lm = lm
        self.texts = texts
        self.batch_size = batch_size
        self.max_rows = max_rows
        self.layouts = make_layouts(lm, texts, batch_size)
        self.vocab = vocab_size(lm)
        self.refs: dict[int, torch.Tensor] = {}  # layout index -> unsteered log-probs (neutral only)
        self.baseline_lp: torch.Tensor | None = None
        self.baseline_kl: torch.Tensor | None = None
        self.workspace = Workspace()

    # -- one forward ---------------------------------------------------------------------
    def copies_per_forward(self, lay: Layout) -> int:
        """How many configurations of this batch fit one forward pass."""
        k = int(lay.keep().numel())
        by_rows = self.max_rows // lay.rows
        by_logits = LOGITS_BUDGET_BYTES // max(1, lay.rows * k * self.vocab * 4)
        return max(1, min(by_rows, by_logits))

    def forward(self, li: int, configs: Sequence[Config]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean log-prob (and KL) per row of ``len(configs) x texts`` rows of layout ``li``."""
        lay = self.layouts[li]
        c = len(configs)
        ids, mask, positions = lay.tiled(c)
        rows = [list(cfg) for cfg in configs for _ in range(lay.rows)]
        with oom_guard("scoring", _OOM_HINT), Steering(self.lm, rows, prompt_length=lay.prompt_length), \
                torch.inference_mode():
            logits, lo = model_logits(self.lm, ids, mask, positions, lay.keep())
        return score_tokens(lay, c, logits_picker(logits, lo, self.workspace), self.vocab, self.refs.get(li),
                            self.workspace)

    def baseline(self, cancel: threading.Event | None = None,
                 progress: Callable[[], None] | None = None) -> Scores:
        """Unsteered scores; keeps the per-text values and the KL reference."""
        n = len(self.texts)
        lp = torch.full((n,), float("nan"), dtype=torch.float64)
        for li, lay in enumerate(self.layouts):
            _check(cancel)
            with oom_guard("scoring", _OOM_HINT), torch.inference_mode():
                logits, lo = model_logits(self.lm, lay.ids, lay.model_mask, lay.positions, lay.keep())
            at = logits_picker(logits, lo)
            if lay.kind == "neutral":
                self.refs[li] = reference_logprobs(lay, at, self.vocab)
            row_lp, _ = score_tokens(lay, 1, at, self.vocab)
            lp[lay.texts] = row_lp
            if progress:
                progress()
        self.baseline_lp = lp
        self.baseline_kl = torch.where(torch.tensor([k == "neutral" for k in self.texts.kinds]),
                                       torch.zeros(n, dtype=torch.float64), torch.full((n,), float("nan"),
                                                                                       dtype=torch.float64))
        return aggregate(self.texts, lp, self.baseline_kl)

    def score(self, configs: Sequence[Config], *, cancel: threading.Event | None = None,
              progress: Callable[[], None] | None = None) -> list[Scores]:
        """Scores of each configuration (call :meth:`baseline` first when KL is wanted)."""
        if self.texts.n_neutral and not self.refs:
            raise SteerdeskError("The unsteered baseline must be computed before KL can be measured.")
        n = len(self.texts)
        lp = torch.full((len(configs), n), float("nan"), dtype=torch.float64)
        kl = torch.full((len(configs), n), float("nan"), dtype=torch.float64)
        for li, lay in enumerate(self.layouts):
            step = self.copies_per_forward(lay)
            for start in range(0, len(configs), step):
                _check(cancel)
                group = configs[start:start + step]
                row_lp, row_kl = self.forward(li, group)
                for k in range(len(group)):
                    sl = slice(k * lay.n_segments, (k + 1) * lay.n_segments)
                    lp[start + k, lay.texts] = row_lp[sl]
                    if row_kl is not None:
                        kl[start + k, lay.texts] = row_kl[sl]
                if progress:
                    progress()
        return [aggregate(self.texts, lp[c], kl[c]) for c in range(len(configs))]

    def forwards_needed(self, n_configs: int) -> int:
        """Forward passes :meth:`score` needs for ``n_configs`` configurations."""
        return sum(-(-n_configs // self.copies_per_forward(lay)) for lay in self.layouts)


def aggregate(texts: EvalTexts, lp: torch.Tensor, kl: torch.Tensor | None) -> Scores:
    """Scores from per-text mean log-probs (and per-text mean KL for neutral texts)."""
    base = lp[texts.indices("base")]
    target = lp[texts.indices("target")]
    both = lp[texts.indices("base", "target")]
    neutral = texts.indices("neutral")
    kl_value = float(kl[neutral].mean()) if (kl is not None and neutral) else None
    return Scores(margin=float(target.mean() - base.mean()), fluency=float(both.mean()), kl=kl_value)


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("Evaluation cancelled.")


# ============================================================================ entry point

def evaluate(
    lm: LoadedModel,
    heldout: Dataset,
    steers: Sequence[Steer] = (),
    *,
    neutral: Sequence[str] | None = None,
    system: str | None = None,
    max_pairs: int | None = None,
    batch_size: int = 16,
    max_rows: int = 64,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> Evaluation:
    """Score one steering configuration against unsteered on held-out pairs.

    ``steers`` is what :class:`~steerdesk.core.steering.Steering` takes (one flat list, applied
    to every text). ``neutral`` texts (e.g. :data:`NEUTRAL_TEXTS`) add the KL measure.
    ``progress(done, total)`` counts forward passes; ``cancel`` is checked before each.
    """
    texts = prepare_texts(lm, heldout, neutral=neutral, system=system, max_pairs=max_pairs)
    scorer = TextScorer(lm, texts, batch_size=batch_size, max_rows=max_rows)
    total = len(scorer.layouts) + scorer.forwards_needed(1)
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress:
            progress(done[0], total)

    unsteered = scorer.baseline(cancel, tick)
    (steered,) = scorer.score([list(steers)], cancel=cancel, progress=tick)
    return Evaluation(unsteered=unsteered, steered=steered, n_pairs=texts.n_pairs, n_neutral=texts.n_neutral)


__all__ = ["NEUTRAL_TEXTS", "Scores", "Evaluation", "EvalTexts", "prepare_texts", "evaluate", "TextScorer",
           "aggregate", "Layout", "Workspace", "logits_picker", "make_layout", "make_layouts", "make_packed_layouts",
           "score_tokens", "model_logits"]
