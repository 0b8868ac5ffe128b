"""What a held-out evaluation scores, and how it is laid out in batch rows.

:class:`EvalTexts` are the tokenized held-out replies (and neutral texts) of
:func:`prepare_texts`. A :class:`Layout` is one batch of them: prompts left-padded and replies
right-padded so every reply starts at the same column (:func:`make_layouts`), or several texts
packed in one row where they share prompt tokens, kept apart by a 4D attention mask
(:func:`make_packed_layouts`; used by sweeps after a self-check). Scoring is in
:mod:`steerdesk.core.evaluate`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .datasets import Dataset
from .errors import SteerdeskError
from .extract import Encoded, encode
from .models import LoadedModel

KINDS = ("base", "target", "neutral")


# =============================================================================== texts

@dataclass
class EvalTexts:
    """Tokenized held-out replies (and neutral texts) to score."""

    encoded: list[Encoded]
    kinds: list[str]  # "base" | "target" | "neutral", one per item
    n_pairs: int
    dataset_name: str = ""
    dataset_sha256: str = ""
    prompts: list[str] = field(default_factory=list)  # the user prompt of each item ("" for neutral texts)

    def __len__(self) -> int:
        return len(self.encoded)

    def indices(self, *kinds: str) -> list[int]:
        """Indices of the texts of these kinds (base / target / neutral)."""
        return [i for i, k in enumerate(self.kinds) if k in kinds]

    @property
    def n_neutral(self) -> int:
        """Number of neutral texts (KL is measured on them)."""
        return self.kinds.count("neutral")


def prepare_texts(
    lm: LoadedModel,
    heldout: Dataset,
    *,
    neutral: Sequence[str] | None = None,
    system: str | None = None,
    max_pairs: int | None = None,
) -> EvalTexts:
    """Chat-format and tokenize the held-out replies (and neutral texts, as replies to no prompt).

    ``max_pairs`` keeps the first N rows. Raises ``SteerdeskError`` for a set that cannot give a
    margin (no base or no target reply) or a reply with no token to score.
    """
    examples = heldout.examples[:max_pairs] if max_pairs else heldout.examples
    if max_pairs is not None and max_pairs < 1:
        raise SteerdeskError("The number of held-out pairs must be at least 1.")
    base = [(e.prompt, e.base) for e in examples if e.base.strip()]
    target = [(e.prompt, e.target) for e in examples if e.target.strip()]
    if not base or not target:
        raise SteerdeskError(f"The held-out set {heldout.name!r} needs at least one base and one target reply.")
    neutral_pairs = [("", t) for t in (neutral or ()) if t.strip()]
    encoded = encode(lm, base + target + neutral_pairs, system)
    kinds = ["base"] * len(base) + ["target"] * len(target) + ["neutral"] * len(neutral_pairs)
    for e, (_, reply) in zip(encoded, base + target + neutral_pairs):
        if n_scored(e) < 1:
            raise SteerdeskError(f"The reply {reply[:40]!r} has no token to score (it is empty after formatting).")
    return EvalTexts(encoded, kinds, n_pairs=min(len(base), len(target)), dataset_name=heldout.name,
                     dataset_sha256=heldout.sha256(), prompts=[p for p, _ in base + target + neutral_pairs])


def n_scored(e: Encoded) -> int:
    """Tokens of ``e`` that are scored: those with a real token before them (the first token of a
    text has no prediction)."""
    return len(e.ids) - max(e.reply_start, 1)


# ============================================================================== layout

@dataclass
class Layout:
    """One padded batch of texts, replies aligned at column ``reply_col``.

    The scored tokens are listed flat, row-major: token ``j`` is ``tok[j]``, predicted by the
    logits at ``(src_row[j], src_col[j])``, and counts for text segment ``seg[j]``. A row holds
    one text (``make_layout``: segment ``i`` is row ``i``) or, in a packed layout
    (``make_packed_layouts``), several texts that share their prompt tokens, kept apart by the
    4D attention mask ``attn``. Tiling the batch ``c`` times (``c`` configurations) makes row
    ``k * rows + i`` copy ``k`` of row ``i`` and segment ``k * n_segments + s`` copy ``k`` of
    segment ``s``.
    """

    ids: torch.Tensor  # [b, S]
    mask: torch.Tensor  # [b, S] 1 for a real token
    positions: torch.Tensor  # [b, S]
    reply_col: int  # columns < reply_col are prompt tokens, columns >= reply_col reply tokens
    src_row: torch.Tensor  # [N]
    src_col: torch.Tensor  # [N]
    tok: torch.Tensor  # [N]
    counts: torch.Tensor  # [n_segments] float32, scored tokens per segment
    texts: list[int]  # index into EvalTexts of each segment
    kind: str  # "heldout" or "neutral"
    source_rows: list[int] = field(default_factory=list)  # rows of the batch this was cut from
    seg: torch.Tensor | None = None  # [N] segment of each scored token (default: its row)
    seg_row: list[int] = field(default_factory=list)  # row of each segment (default: segment i is row i)
    attn: torch.Tensor | None = None  # [b, 1, S, S] custom mask in the model's attention format (packed)
    # A flat packed layout (steering at every position only): each group's prompt is followed by its
    # replies, so prompt and reply columns interleave and ``reply_col`` (0) means nothing.
    flat: bool = False

    def __post_init__(self) -> None:
        if not self.source_rows:
            self.source_rows = list(range(self.rows))
        if self.seg is None:
            self.seg = self.src_row
        if not self.seg_row:
            self.seg_row = list(range(len(self.texts)))

    @property
    def rows(self) -> int:
        """Batch rows."""
        return int(self.ids.shape[0])

    @property
    def n_segments(self) -> int:
        """Texts laid out in this batch (several per row when packed)."""
        return len(self.texts)

    @property
    def width(self) -> int:
        """Columns (tokens) per row."""
        return int(self.ids.shape[1])

    @property
    def n_tokens(self) -> int:
        """Real (unpadded) tokens in the batch."""
        return int(self.tok.shape[0])

    @property
    def prompt_length(self) -> int | None:
        """The prompt length to give :class:`~steerdesk.core.steering.Steering`: ``reply_col``, or None
        for a flat layout (steering positions other than ``"all"`` then raise instead of steering the
        wrong tokens)."""
        return None if self.flat else self.reply_col

    @property
    def prompt_starts(self) -> torch.Tensor:
        """``[rows]`` long: the column of each row's first real token (its left padding), which is
        where a ``prompt:A-B`` steering window counts from. Meaningful for unpacked layouts
        (:func:`make_layout`: one text per row) only."""
        return (self.mask.cumsum(-1) == 0).sum(-1)

    @property
    def model_mask(self) -> torch.Tensor:
        """The attention mask to give the model: the custom 4D one of a packed layout, else ``mask``."""
        return self.attn if self.attn is not None else self.mask

    def keep(self) -> torch.Tensor:
        """Columns whose logits are needed (``logits_to_keep``)."""
        lo, hi = int(self.src_col.min()), int(self.src_col.max())
        return torch.arange(lo, hi + 1, device=self.ids.device)

    def subset(self, rows: Sequence[int]) -> Layout:
        """These rows (repeats allowed, with all their segments), same width and reply column."""
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.ids.device)
        assert self.seg is not None
        src_row, src_col, tok, seg = [], [], [], []
        counts: list[float] = []
        texts: list[int] = []
        seg_row: list[int] = []
        for new, old in enumerate(rows):
            for s in (s for s, r in enumerate(self.seg_row) if r == old):
                sel = self.seg == s
                n = int(sel.sum())
                src_row.append(torch.full((n,), new, dtype=torch.long, device=self.ids.device))
                seg.append(torch.full((n,), len(texts), dtype=torch.long, device=self.ids.device))
                src_col.append(self.src_col[sel])
                tok.append(self.tok[sel])
                counts.append(float(self.counts[s]))
                texts.append(self.texts[s])
                seg_row.append(new)
        return Layout(ids=self.ids[idx], mask=self.mask[idx], positions=self.positions[idx],
                      reply_col=self.reply_col, src_row=torch.cat(src_row), src_col=torch.cat(src_col),
                      tok=torch.cat(tok), counts=torch.tensor(counts, dtype=torch.float32), texts=texts,
                      kind=self.kind, source_rows=[self.source_rows[r] for r in rows], seg=torch.cat(seg),
                      seg_row=seg_row, attn=None if self.attn is None else self.attn[idx], flat=self.flat)

    def tiled(self, copies: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids, model mask, positions repeated ``copies`` times along the batch."""
        mask = self.model_mask
        return (self.ids.repeat(copies, 1), mask.repeat(copies, *([1] * (mask.ndim - 1))),
                self.positions.repeat(copies, 1))


def make_layout(items: Sequence[Encoded], texts: Sequence[int], pad_id: int, device: torch.device,
                kind: str = "heldout") -> Layout:
    """Pad a batch so that every reply starts at the same column (prompt left, reply right)."""
    p_max = max(e.reply_start for e in items)
    r_max = max(len(e.ids) - e.reply_start for e in items)
    width = p_max + r_max
    b = len(items)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    src_row: list[int] = []
    src_col: list[int] = []
    tok: list[int] = []
    counts = torch.zeros(b, dtype=torch.float32)
    for i, e in enumerate(items):
        off = p_max - e.reply_start
        n = len(e.ids)
        ids[i, off:off + n] = torch.tensor(e.ids)
        mask[i, off:off + n] = 1
        first = max(e.reply_start, 1)
        for t in range(first, n):
            src_row.append(i)
            src_col.append(off + t - 1)
            tok.append(e.ids[t])
        counts[i] = n - first
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)
    return Layout(ids=ids.to(device), mask=mask.to(device), positions=positions.to(device), reply_col=p_max,
                  src_row=as_long(src_row), src_col=as_long(src_col), tok=as_long(tok), counts=counts,
                  texts=list(texts), kind=kind)


def make_layouts(lm: LoadedModel, texts: EvalTexts, batch_size: int) -> list[Layout]:
    """Held-out and neutral texts in separate batches of at most ``batch_size``, longest first."""
    if batch_size < 1:
        raise SteerdeskError("Batch size must be at least 1.")
    pad_id = lm.tokenizer.pad_token_id
    device = lm.input_device
    out = []
    for kind, idx in (("heldout", texts.indices("base", "target")), ("neutral", texts.indices("neutral"))):
        # Sorting by length keeps padding small; base and target of a pair often land together.
        order = sorted(idx, key=lambda i: (-len(texts.encoded[i].ids), i))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            out.append(make_layout([texts.encoded[i] for i in chunk], chunk, pad_id, device, kind))
    return out


def packed_mask_format(lm: LoadedModel) -> str | None:
    """How a custom 4D attention mask must be written for this model: ``"bool"`` (sdpa: True =
    attend), ``"additive"`` (eager: 0 or the dtype's minimum), or None (other kernels: no packing)."""
    impl = getattr(getattr(lm.model, "config", None), "_attn_implementation", None)
    return {"sdpa": "bool", "eager": "additive"}.get(str(impl)) if impl else None


def make_packed_layouts(lm: LoadedModel, texts: EvalTexts, *, row_tokens: int = 320, max_rows: int = 16,
                        positions: str = "all") -> list[Layout] | None:
    """Held-out (and neutral) texts packed so that texts sharing a prompt share its tokens.

    The texts with the same prompt tokens (a pair's base and target reply) form a group; several
    groups share one row, and the prompt prefix common to all groups of a row (the chat template's
    system part) is written once. With steering at every position (``positions="all"``) a row is
    flat, ``[common | prompt 1' | replies of group 1 | prompt 2' | replies of group 2 | ... | pad]``,
    and the groups are spread over the number of rows (at most ``row_tokens`` tokens each where a
    group fits) that leaves the fewest padded token slots. Otherwise (``"mixed"``) a row is ``[pad |
    common | prompt 1' | prompt 2' | ... | replies of group 1 | replies of group 2 | ... | pad]``:
    every prompt token before ``reply_col``, every reply token after it (so ``prompt`` /
    ``generated`` steering positions mean what they do unpacked), at the cost of the padding that
    aligning the rows' prompt ends takes.
    The custom 4D mask lets a token see exactly what it would see in its own unpacked text (the
    common part, its group's prompt, its own reply, causally) and position ids continue as in the
    unpacked text, so the scores equal the unpacked ones up to float rounding (the sweep checks
    that against the model's own unpacked forward before using it). Each reply's last token is left
    out of the row: it is scored from the column before it, and its own column would be no one's
    query or key (nothing of its reply follows it; the mask hides it from the row's other texts).
    Rows hold about ``row_tokens`` tokens (longer rows share more, but attention grows with the
    square of the row); at most ``max_rows`` rows per layout. A text with no prompt token (plain
    formatting of an empty prompt) has its first token, which is never scored, counted as its
    prompt; that moves the token to the prompt side, so with steering ``positions`` other than
    ``"all"`` such texts are not packed.
    Returns None when the model's attention kernel takes no custom mask, a text has no prompt token
    and ``positions`` is not ``"all"``, or a row is wider than the model's sliding attention window.
    """
    fmt = packed_mask_format(lm)
    if fmt is None:
        return None
    if positions != "all" and any(e.reply_start < 1 for e in texts.encoded):
        return None
    starts = [max(e.reply_start, 1) for e in texts.encoded]  # the prompt side of each text
    dtype = next(lm.model.parameters()).dtype
    pad_id = lm.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = 0
    device = lm.input_device
    out: list[Layout] = []
    for kind, idx in (("heldout", texts.indices("base", "target")), ("neutral", texts.indices("neutral"))):
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in idx:
            groups.setdefault(tuple(texts.encoded[i].ids[:starts[i]]), []).append(i)
        items = list(groups.items())
        if not items:
            continue
        flat = positions == "all"
        # The prompt prefix every group shares (the system part), written once per row.
        common = _common_length([list(p) for p, _ in items]) if flat else 0
        size = lambda it: len(it[0]) - common + sum(_written(texts, starts, i) for i in it[1])
        n_rows = max(1, -(-sum(size(it) for it in items) // row_tokens))
        n_rows = min(n_rows, len(items))
        bins = _balance(items, size, n_rows)
        if flat:  # the row count (from n_rows up) with the fewest token slots, rows within row_tokens
            cap = max(row_tokens, common + max(size(it) for it in items))
            best = None
            for n in range(n_rows, min(len(items), n_rows + 4) + 1):
                b = bins if n == n_rows else _balance(items, size, n)
                width = common + max(sum(size(it) for it in r) for r in b)
                if width <= cap and (best is None or n * width < best[0]):
                    best = (n * width, b)
            if best is not None:
                bins = best[1]
        for start in range(0, len(bins), max_rows):
            out.append(_pack_rows(bins[start:start + max_rows], texts, starts, pad_id, device, kind, fmt, dtype,
                                  flat=flat))
    # A sliding-window model masks by column distance, which packing stretches: only when no row is
    # wider than the window does the custom mask stay exact.
    window = getattr(getattr(lm.model, "config", None), "sliding_window", None)
    if isinstance(window, int) and window > 0 and any(lay.width > window for lay in out):
        return None
    return out


Group = tuple[tuple[int, ...], list[int]]  # (prompt tokens, the texts sharing them)


def _written(texts: EvalTexts, starts: list[int], i: int) -> int:
    """Reply tokens of text ``i`` a packed row holds: all but the last. The last reply token is scored
    (the logits one column before it predict it) but its own column is no one's query or key: no
    later token of its reply follows, and no other text of the row sees it (the mask), so its hidden
    states change no score."""
    return max(0, len(texts.encoded[i].ids) - starts[i] - 1)


def _common_length(prompts: list[list[int]]) -> int:
    """Length of the prefix all ``prompts`` share, leaving each at least its last token."""
    if len(prompts) < 2:
        return 0
    return max(0, min(len(os.path.commonprefix(prompts)), min(len(p) for p in prompts) - 1))


def _balance(items: list[Group], size: Callable[[Group], int], n_rows: int) -> list[list[Group]]:
    """``items`` over ``n_rows`` rows, longest first onto the lightest row (LPT: balanced rows)."""
    bins: list[list[Group]] = [[] for _ in range(n_rows)]
    load = [0] * n_rows
    for it in sorted(items, key=lambda it: -size(it)):
        r = min(range(n_rows), key=lambda r: load[r])
        bins[r].append(it)
        load[r] += size(it)
    return [b for b in bins if b]


def packed_attention(real: torch.Tensor, rule: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """4D attention mask ``[rows, 1, S, S]`` of packed rows: query ``q`` sees key ``k`` when ``k <= q``,
    both are real tokens (``real`` ``[rows, S]`` bool) and ``rule`` ``[rows, S, S]`` allows it; a padding
    query sees itself (no empty softmax row). ``fmt`` ``"bool"`` (True = attend) or additive in ``dtype``
    (0 / dtype's minimum), as :func:`packed_mask_format` says the model takes it."""
    width = real.shape[-1]
    allowed = torch.ones(width, width, dtype=torch.bool).tril() & real[:, None, :] & real[:, :, None] & rule
    allowed |= torch.eye(width, dtype=torch.bool)
    allowed = allowed[:, None]
    if fmt == "bool":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)


def _pack_rows(rows: list[list[Group]], texts: EvalTexts, starts: list[int], pad_id: int,
               device: torch.device, kind: str, fmt: str, dtype: torch.dtype, *, flat: bool = False) -> Layout:
    """One packed layout (see :func:`make_packed_layouts`): aligned at ``reply_col``, or ``flat``."""
    plans = [(_common_length([list(p) for p, _ in groups]), groups) for groups in rows]
    p_width = max(c + sum(len(p) - c for p, _ in groups) for c, groups in plans)
    r_width = max(sum(_written(texts, starts, i) for _, m in groups for i in m)
                  for _, groups in plans)
    width = p_width + r_width
    if flat:
        width = max(c + sum(len(p) - c + sum(_written(texts, starts, i) for i in m) for p, m in groups)
                    for c, groups in plans)
    b = len(rows)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    positions = torch.zeros((b, width), dtype=torch.long)
    # Token tags: group (-1 common, -2 padding) and reply (-1 prompt); see the mask rule below.
    group = torch.full((b, width), -2, dtype=torch.long)
    reply = torch.full((b, width), -1, dtype=torch.long)
    src_row: list[int] = []
    src_col: list[int] = []
    tok: list[int] = []
    seg: list[int] = []
    counts: list[float] = []
    seg_texts: list[int] = []
    seg_row: list[int] = []
    for r, (c, groups) in enumerate(plans):
        col = 0 if flat else p_width - (c + sum(len(p) - c for p, _ in groups))
        ids[r, col:col + c] = torch.tensor(groups[0][0][:c], dtype=torch.long)
        positions[r, col:col + c] = torch.arange(c)
        group[r, col:col + c] = -1
        col += c
        # Flat: each group's prompt, then its replies. Aligned: every prompt, then every reply.
        order = [(g, part) for g in range(len(groups)) for part in ("prompt", "replies")] if flat else \
            [(g, "prompt") for g in range(len(groups))] + [(g, "replies") for g in range(len(groups))]
        last_prompt_col: dict[int, int] = {}
        for g, part in order:
            p, members = groups[g]
            if part == "prompt":
                n = len(p) - c
                ids[r, col:col + n] = torch.tensor(p[c:], dtype=torch.long)
                positions[r, col:col + n] = torch.arange(c, len(p))
                group[r, col:col + n] = g
                col += n
                last_prompt_col[g] = col - 1
                continue
            assert flat or col >= p_width
            for i in members:
                rep = texts.encoded[i].ids[starts[i]:]
                n = len(rep)
                w = _written(texts, starts, i)  # all but the reply's last token (a dead end; see above)
                ids[r, col:col + w] = torch.tensor(rep[:w], dtype=torch.long)
                positions[r, col:col + w] = torch.arange(len(p), len(p) + w)
                group[r, col:col + w] = g
                reply[r, col:col + w] = len(seg_texts)
                for u in range(n):
                    src_row.append(r)
                    src_col.append(last_prompt_col[g] if u == 0 else col + u - 1)
                    tok.append(rep[u])
                    seg.append(len(seg_texts))
                counts.append(float(n))
                seg_texts.append(i)
                seg_row.append(r)
                col += w
    real = group != -2
    mask[real] = 1
    # Query q sees key k (k <= q) when k is common, or in q's group and a prompt token or q's own reply.
    gq, gk = group[:, :, None], group[:, None, :]
    rq, rk = reply[:, :, None], reply[:, None, :]
    attn = packed_attention(real, (gk == -1) | ((gk == gq) & ((rk == -1) | (rk == rq))), fmt, dtype)
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)
    return Layout(ids=ids.to(device), mask=mask.to(device), positions=positions.to(device),
                  reply_col=0 if flat else p_width, src_row=as_long(src_row), src_col=as_long(src_col),
                  tok=as_long(tok), counts=torch.tensor(counts, dtype=torch.float32), texts=seg_texts, kind=kind,
                  seg=as_long(seg), seg_row=seg_row, attn=attn.to(device), flat=flat)


__all__ = ["KINDS", "EvalTexts", "Layout", "make_layout", "make_layouts", "make_packed_layouts", "n_scored",
           "packed_attention", "packed_mask_format", "prepare_texts"]
