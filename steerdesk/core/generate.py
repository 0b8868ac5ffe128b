"""Streaming, batched, optionally steered generation on top of ``model.generate`` (KV cache on)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .datasets import format_prompt, uses_chat_template
from .errors import SteerdeskError
from .memory import oom_guard
from .models import LoadedModel
from .steering import Steer, Steering

if TYPE_CHECKING:
    from .condition import ConditionGate

TextCallback = Callable[[int, str], None]
StepCallback = Callable[[int, list[int], "torch.Tensor | None"], None]


@dataclass
class SamplingSettings:
    """Greedy when ``temperature`` is 0; otherwise temperature / top-p sampling.

    Under sampling every batch row draws from its own random stream, seeded from ``seed`` and
    the row's identity (see :func:`row_seeds`); ``seed=None`` takes a fresh base seed from
    torch's global generator for each call.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def check(self) -> None:
        """Raise ``SteerdeskError`` for settings generation cannot use."""
        if not 1 <= self.max_new_tokens <= 100_000:
            raise SteerdeskError("max new tokens must be between 1 and 100000.")
        if not (self.temperature >= 0 and self.temperature < 1e3):
            raise SteerdeskError("temperature must be a number >= 0 (0 means greedy).")
        if not 0 < self.top_p <= 1:
            raise SteerdeskError("top-p must be in (0, 1].")

    @property
    def greedy(self) -> bool:
        """True when decoding picks the most likely token (temperature 0)."""
        return self.temperature == 0


@dataclass
class GenerationResult:
    """Generated text and token ids of one row (prompt excluded)."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "eos", "length" or "stopped"
    projections: list[list[float]] = field(default_factory=list)  # per token, per watched layer
    gate_score: float | None = None  # the prompt's CAST score when a condition gate was used
    gate_open: bool | None = None  # whether the gate let this row's steering through


class _RowStreamer:
    """``model.generate`` streamer: per-row incremental decoding with clean UTF-8 boundaries.

    Each new token costs two decodes of a short window (the tokens since the last emitted
    chunk, plus the chunk before it for context: leading-space and clean-up rules need a
    left neighbour), not a decode of the whole row: streaming stays O(1) per token.
    """

    def __init__(self, tokenizer: Any, rows: int, eos_ids: set[int], on_text: TextCallback | None,
                 on_step: Callable[[list[int]], None] | None, stop: threading.Event | None):
        self.tok = tokenizer
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.prefix = [0] * rows  # window start: first token of the last emitted chunk
        self.read = [0] * rows  # tokens up to here have been emitted as text
        self.sent: list[list[str]] = [[] for _ in range(rows)]
        self.done = [False] * rows
        self.eos_ids = eos_ids
        self.on_text = on_text
        self.on_step = on_step
        self.stop = stop
        self._prompt_seen = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def _emit(self, row: int, text: str) -> None:
        self.sent[row].append(text)
        self.on_text(row, text)  # type: ignore[misc]

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompt ids
            self._prompt_seen = True
            return
        if self.stop is not None and self.stop.is_set():
            return  # nothing is emitted after Stop
        ids = value.reshape(-1).tolist()
        for row, token in enumerate(ids):
            if self.done[row]:
                continue
            if token in self.eos_ids:
                self.done[row] = True
                continue
            toks = self.tokens[row]
            toks.append(token)
            if self.on_text is None:
                continue
            lo, mid = self.prefix[row], self.read[row]
            before = self._decode(toks[lo:mid])
            text = self._decode(toks[lo:])
            if text.endswith("\ufffd") or len(text) <= len(before):
                continue  # an incomplete multi-byte character, or nothing new yet: wait
            # Sliced by length: if a tokenizer's clean-up rewrote the context chunk in the
            # light of the new token (" '" + " hi" -> "'hi"), streaming goes on regardless.
            self._emit(row, text[len(before):])
            self.prefix[row], self.read[row] = mid, len(toks)
        if self.on_step is not None:
            self.on_step(ids)

    def end(self) -> None:
        """Flush what is still held back, so the streamed chunks add up to the final text."""
        if self.on_text is None:
            return
        for row in range(len(self.tokens)):
            text = self._decode(self.tokens[row])
            sent = "".join(self.sent[row])
            if len(text) > len(sent):
                self._emit(row, text[len(sent):])


def _eos_ids(lm: LoadedModel) -> set[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, lm.tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def row_seeds(seed: int, keys: Sequence[str]) -> list[int]:
    """One 63-bit seed per row from the base ``seed`` and the row's identity ``keys[r]``.

    SHA-256 of ``"steerdesk-row/1|{seed}|{key}"``: stable across processes, platforms and
    torch versions, and unrelated for different keys or seeds. Rows with equal keys get the
    same seed (the same random stream).
    """
    out = []
    for key in keys:
        digest = hashlib.sha256(f"steerdesk-row/1|{int(seed)}|{key}".encode("utf-8", "surrogatepass")).digest()
        out.append(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return out


def default_row_keys(prompts: Sequence[str], system: str | None = None) -> list[str]:
    """A row's identity under sampling: its system message and prompt text, not its steering.

    So an unsteered and an identity-steered row of one prompt share a random stream, and a
    row's tokens do not depend on the other rows of the batch.
    """
    return [f"{system or ''}\x00{p}" for p in prompts]


class _RowSampler:
    """Final logits processor for per-row sampling inside a *greedy* ``model.generate``.

    Applies transformers' ``TemperatureLogitsWarper`` and ``TopPLogitsWarper`` (the same
    warpers and order as ``do_sample=True``), then draws one token per row by inversion
    sampling: one uniform number from the row's own ``torch.Generator`` (on the logits'
    device), located in the row's cumulative distribution (float64). It returns scores that
    are ``-inf`` except 0 at the drawn token, so greedy selection takes it. Every row consumes
    exactly one draw per step (finished rows too), so a row's stream never depends on others.
    """

    def __init__(self, temperature: float, top_p: float, seeds: Sequence[int]):
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        self.warpers: list[Any] = [TemperatureLogitsWarper(temperature)]
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))
        self.seeds = list(seeds)
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        device = scores.device
        if self.generators is None:
            self.generators = [torch.Generator(device=device).manual_seed(s) for s in self.seeds]
        u = torch.cat([torch.rand(1, generator=g, device=device, dtype=torch.float64) for g in self.generators])
        cdf = torch.softmax(scores.float(), dim=-1).double().cumsum(dim=-1)  # [B, V]
        target = (u * cdf[:, -1]).unsqueeze(1)  # [B, 1], in [0, total)
        token = torch.searchsorted(cdf, target, right=True).clamp_max(scores.shape[-1] - 1)  # [B, 1]
        forced = torch.full_like(scores, -float("inf"))
        return forced.scatter_(1, token, 0.0)


def encode_prompts(lm: LoadedModel, prompts: Sequence[str], system: str | None = None,
                   raw: bool = False) -> dict[str, torch.Tensor]:
    """Chat-format and left-pad a batch of user prompts."""
    tok = lm.tokenizer
    texts = list(prompts) if raw else [format_prompt(tok, p, system) for p in prompts]
    special = not uses_chat_template(tok)
    rows = [tok(t, add_special_tokens=special)["input_ids"] for t in texts]
    if any(len(r) == 0 for r in rows):
        raise SteerdeskError("A prompt is empty after tokenization.")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    device = lm.input_device
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def describe_steering(rows: Sequence[Sequence[Steer]]) -> str:
    """One line naming each row's steering (layers, scales, mode) for logs and errors."""
    parts = sorted({f"layer {s.layer} x{s.scale:g} ({s.mode})" for row in rows for s in row})
    return ", ".join(parts) if parts else "no steering"


def generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    steering: Sequence[Sequence[Steer]] | Sequence[Steer] | None = None,
    *,
    sampling: SamplingSettings | None = None,
    system: str | None = None,
    on_text: TextCallback | None = None,
    on_step: StepCallback | None = None,
    stop: threading.Event | None = None,
    watch: torch.Tensor | None = None,
    use_cache: bool = True,
    raw_prompts: bool = False,
    row_keys: Sequence[str] | None = None,
    gate: ConditionGate | None = None,
) -> list[GenerationResult]:
    """Generate for a batch of user prompts, each row with its own steering.

    ``steering`` is a flat list (every row) or one list per row; a steer's ``positions`` may be a
    token window (``first:N``, ``gen:A-B``, ``prompt:A-B``: :class:`~steerdesk.core.parsing.TokenWindow`;
    generated token k's projection in ``watch`` is the hidden state a ``gen`` window containing k
    steers). ``on_text(row, chunk)``
    streams decoded text; ``stop`` ends generation within one token. ``watch``
    (``[num_layers, hidden]`` directions) records, for every generated token, the
    projection of the hidden state that produced it on each layer's unit direction.

    Under sampling, row ``r`` draws from its own generator seeded from ``(sampling.seed,
    row_keys[r])``; ``row_keys`` defaults to :func:`default_row_keys` (system message +
    prompt), so identity steering reproduces the unsteered row token for token and a row's
    tokens are the same in any batch. Pass distinct keys for independent samples of one
    prompt. Greedy decoding ignores the keys.

    ``gate`` (:class:`~steerdesk.core.condition.ConditionGate`) scores every unsteered prompt
    once, before generation (one forward pass cut after the gate's layer), and drops the steering
    of the rows it keeps closed (they generate exactly as unsteered); each result carries its
    score and decision. Raises ``SteerdeskError`` for bad requests and when the logits become NaN
    or infinite.
    """
    sampling = sampling or SamplingSettings()
    sampling.check()
    if not prompts:
        raise SteerdeskError("No prompt given.")
    if any(not p.strip() for p in prompts):
        raise SteerdeskError("The prompt is empty.")
    n = len(prompts)
    if steering and not isinstance(steering[0], Steer):
        rows = [list(r) for r in steering]  # type: ignore[arg-type]
        if len(rows) != n:
            raise SteerdeskError(f"Got {len(rows)} steering rows for {n} prompts.")
    else:
        rows = [list(steering or []) for _ in range(n)]  # type: ignore[arg-type]
    if row_keys is not None and len(row_keys) != n:
        raise SteerdeskError(f"Got {len(row_keys)} row keys for {n} prompts.")
    scores: list[float | None] = [None] * n
    opened: list[bool | None] = [None] * n
    if gate is not None:
        from .condition import gate_scores

        sc = gate_scores(lm, prompts, gate, system=system, raw=raw_prompts)
        scores = [float(x) for x in sc]
        opened = list(gate.opens(sc))
        rows = [row if opened[r] else [] for r, row in enumerate(rows)]
    inputs = encode_prompts(lm, prompts, system, raw=raw_prompts)
    width = inputs["input_ids"].shape[1]
    eos = _eos_ids(lm)

    from transformers import (
        GenerationConfig,
        LogitsProcessor,
        LogitsProcessorList,
        StoppingCriteria,
        StoppingCriteriaList,
    )

    # Projections of the token-producing hidden state per watched layer, filled by hooks.
    step_proj: dict[int, torch.Tensor] = {}
    units = None
    watch_layers: list[int] = []
    if watch is not None:
        units = watch.float() / watch.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
        watch_layers = list(range(units.shape[0]))

    def observe(layer: int, h: torch.Tensor) -> None:
        u = units[layer].to(h.device, torch.float32)  # type: ignore[index]
        step_proj[layer] = (h[:, -1].float() @ u).cpu()

    projections: list[list[list[float]]] = [[] for _ in range(n)]
    steps = [0]

    def step_done(ids: list[int]) -> None:
        mat = None
        if units is not None:
            mat = torch.stack([step_proj.get(layer, torch.full((n,), float("nan"))) for layer in watch_layers], 1)
            for r in range(n):
                if not streamer.done[r] or ids[r] in eos:
                    projections[r].append(mat[r].tolist())
        if on_step is not None:
            on_step(steps[0], ids, mat)
        steps[0] += 1

    streamer = _RowStreamer(lm.tokenizer, n, eos, on_text, step_done if (on_step or units is not None) else None,
                            stop)
    described = describe_steering(rows)

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> torch.Tensor:
            flag = stop is not None and stop.is_set()
            return torch.full((input_ids.shape[0],), flag, dtype=torch.bool, device=input_ids.device)

    identity_rows = [all(st.is_identity for st in row) for row in rows]
    dtype = str(getattr(lm.model, "dtype", "")).replace("torch.", "")

    class _Finite(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if not bool(torch.isfinite(scores).all()):
                bad = (~torch.isfinite(scores)).any(dim=-1).nonzero().reshape(-1).tolist()
                plain = [r for r in bad if identity_rows[r]]
                if plain:  # an unsteered (or identity-steered) row: the scale is not the cause
                    raise SteerdeskError(
                        f"The model's output became NaN or infinite without steering (row {plain[0]}): "
                        f"the model itself overflows in {dtype or 'its dtype'}; "
                        f"load it in float32 (or bfloat16) or shorten the prompt.")
                raise SteerdeskError(
                    f"The model's output became NaN or infinite under steering ({described}); "
                    f"lower the scale or pick another layer.")
            return scores

    processors: list[Any] = [_Finite()]
    if not sampling.greedy:
        base = sampling.seed
        if base is None:  # a fresh base seed, from torch's global generator (torch.manual_seed applies)
            base = int(torch.randint(0, 2**62, (1,)).item())
        keys = list(row_keys) if row_keys is not None else default_row_keys(prompts, system)
        processors.append(_RowSampler(sampling.temperature, sampling.top_p, row_seeds(base, keys)))

    # Always greedy inside model.generate: under sampling, _RowSampler has already drawn each
    # row's token and left it the only finite score.
    config = GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=lm.tokenizer.pad_token_id,
        eos_token_id=sorted(eos) or None,
        use_cache=use_cache,
    )
    with oom_guard("generating", "try fewer new tokens or a shorter prompt."), \
            Steering(lm, rows, prompt_length=width, observe=observe if units is not None else None,
                     watch=watch_layers, prompt_starts=(inputs["attention_mask"] == 0).sum(1).cpu()), \
            torch.inference_mode():
        out = lm.model.generate(
            **inputs,
            generation_config=config,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_Stop()]),
            logits_processor=LogitsProcessorList(processors),
        )
    stopped = stop is not None and stop.is_set()
    results = []
    for r in range(n):
        gen = out[r, width:].tolist()
        ids: list[int] = []
        reason = "length"
        for t in gen:
            if t in eos:
                reason = "eos"
                break
            ids.append(t)
        if stopped and reason != "eos":
            reason = "stopped"
            ids = ids[: len(streamer.tokens[r])]  # what was shown is what is returned
        text = lm.tokenizer.decode(ids, skip_special_tokens=True)
        results.append(GenerationResult(text=text, token_ids=ids, finish_reason=reason,
                                        projections=projections[r][: len(ids)], gate_score=scores[r],
                                        gate_open=opened[r]))
    return results


def compare(
    lm: LoadedModel,
    prompt: str,
    steers: Sequence[Steer],
    **kwargs: Any,
) -> tuple[GenerationResult, GenerationResult]:
    """Unsteered (row 0) and steered (row 1) generation of one prompt in one batched pass."""
    results = generate(lm, [prompt, prompt], [[], list(steers)], **kwargs)
    return results[0], results[1]
