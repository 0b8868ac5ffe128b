"""Conditional steering (CAST, Lee et al. 2024, "Programming Refusal with Conditional Activation
Steering"): condition vectors from contrastive prompts, the per-row gate and its calibration.

* A **condition vector** at layer L is the mean difference of the prompt's block-L output
  (aggregated over the prompt: mean over its tokens, or its last token) between on-condition and
  off-condition prompts. It is stored as a :class:`~steerdesk.core.vectors.VectorSet` with
  metadata ``kind="condition"``.
* The **score** of a prompt at layer L is CAST's: the cosine similarity between the aggregated
  hidden state ``h`` and ``tanh(P h)``, where ``P = c c^T / (c^T c)`` projects on the condition
  direction ``c`` (:func:`cast_scores`). It lies in [-1, 1].
* The **gate** (:class:`ConditionGate`) opens a row when its score is on the chosen side of a
  threshold. It is decided once per row from the *unsteered* prompt, before generation, so it
  holds for the whole generation and is the same with the KV cache on or off; a closed row simply
  gets no steering (per-row steering), so it is byte-identical to an unsteered run.
* **Calibration** (:func:`calibrate`) searches layer x threshold x side for the best F1 on
  scores collected for every layer in one forward pass per prompt batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .errors import SteerdeskError
from .models import LoadedModel
from .parsing import check_layers
from .steering import block_hidden

READS = ("mean", "last")
SIDES = ("above", "below")
ProgressCallback = Callable[[int, int], None]


class _Enough(Exception):
    """Raised by a hook once the last layer needed has been read (ends the forward early)."""


def cast_scores(hidden: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """CAST's score of each row of ``hidden`` (``[..., H]``) for ``direction`` (``[H]`` or ``[..., H]``).

    ``cos(h, tanh(P h))`` with ``P = c c^T / (c^T c)`` (``P h = (h.c / c.c) c``), computed in
    float32; returns ``[...]`` in [-1, 1] (0 for a zero hidden state). Raises ``SteerdeskError``
    for a zero direction.
    """
    h = hidden.float()
    c = direction.float().to(h.device)
    cc = (c * c).sum(dim=-1, keepdim=True)
    if not bool((cc > 0).all()):
        raise SteerdeskError("The condition direction is zero: it cannot score prompts.")
    coeff = (h * c).sum(dim=-1, keepdim=True) / cc  # [..., 1]
    projected = torch.tanh(coeff * c)
    num = (h * projected).sum(dim=-1)
    den = h.norm(dim=-1) * projected.norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(num))


def prompt_states(lm: LoadedModel, prompts: Sequence[str], layers: Sequence[int], *, read: str = "mean",
                  system: str | None = None, raw: bool = False, batch_size: int = 16,
                  progress: ProgressCallback | None = None) -> torch.Tensor:
    """Aggregated unsteered block outputs of each prompt: ``[len(layers), len(prompts), hidden]`` float32.

    Prompts are formatted and left-padded exactly as generation does (``encode_prompts``);
    ``read="mean"`` averages a prompt's real tokens (chat template included, padding excluded),
    ``"last"`` takes its last token. One forward pass per batch of ``batch_size`` prompts, cut
    short after the deepest layer asked for. Raises ``SteerdeskError`` for an unknown read, no
    prompt or a layer out of range.
    """
    from .extract import forward_with_positions
    from .generate import encode_prompts

    if read not in READS:
        raise SteerdeskError(f"Unknown condition read {read!r}; use one of {', '.join(READS)}.")
    if not prompts:
        raise SteerdeskError("No prompt given.")
    layers = list(layers)
    check_layers(layers, lm.info.num_layers)
    deepest = max(layers)
    out = torch.zeros(len(layers), len(prompts), lm.info.hidden_size)
    where = {layer: i for i, layer in enumerate(layers)}
    step = max(1, int(batch_size))
    for start in range(0, len(prompts), step):
        chunk = list(prompts[start:start + step])
        inputs = encode_prompts(lm, chunk, system, raw=raw)
        mask = inputs["attention_mask"].float()  # [b, S]
        seen: dict[int, torch.Tensor] = {}

        def make_hook(layer: int) -> Callable[..., None]:
            def hook(module: Any, args: Any, output: Any) -> None:
                h = block_hidden(output).float()
                m = mask.to(h.device)
                if read == "mean":
                    agg = (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
                else:
                    agg = h[:, -1]  # left padding: the last column is every row's last prompt token
                seen[layer] = agg.cpu()
                if layer == deepest:
                    raise _Enough
            return hook

        handles = [lm.blocks[layer].register_forward_hook(make_hook(layer)) for layer in sorted(set(layers))]
        try:
            with torch.inference_mode():  # explicit position ids, as generation uses: padding is invisible
                positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)
                forward_with_positions(lm.model, inputs["input_ids"], inputs["attention_mask"], positions,
                                       use_cache=False)
        except _Enough:
            pass
        finally:
            for handle in handles:
                handle.remove()
        for layer, i in where.items():
            out[i, start:start + len(chunk)] = seen[layer]
        if progress is not None:
            progress(min(start + step, len(prompts)), len(prompts))
    return out


# ---------------------------------------------------------------------------- condition vectors

def compute_condition_vectors(lm: LoadedModel, positives: Sequence[str], negatives: Sequence[str], *,
                              read: str = "mean", system: str | None = None, name: str = "",
                              batch_size: int = 16, progress: ProgressCallback | None = None) -> Any:
    """Condition vectors for every layer: mean over ``positives`` minus mean over ``negatives`` of
    the aggregated prompt states (:func:`prompt_states`). Returns a ``VectorSet`` (``[layers, hidden]``
    directions, ``norms`` = mean |h| per layer) with metadata ``kind="condition"``, ``method="mean-diff"``,
    ``read_position="prompt-mean"`` or ``"prompt-last"``; projections of both sides are kept.
    Raises ``SteerdeskError`` with fewer than 2 prompts on a side.
    """
    from .. import __version__
    from .vectors import VectorSet

    if len(positives) < 2 or len(negatives) < 2:
        raise SteerdeskError("A condition needs at least 2 on-condition and 2 off-condition prompts.")
    layers = list(range(lm.info.num_layers))
    states = prompt_states(lm, list(positives) + list(negatives), layers, read=read, system=system,
                           batch_size=batch_size, progress=progress)  # [L, n, H]
    pos, neg = states[:, :len(positives)], states[:, len(positives):]
    directions = pos.mean(1) - neg.mean(1)  # [L, H]
    norms = states.norm(dim=-1).mean(1)
    unit = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    info = lm.info
    metadata = {
        "format": "steerdesk.vectors/1", "kind": "condition", "model": info.name,
        "architecture": info.architecture, "num_layers": str(info.num_layers), "hidden_size": str(info.hidden_size),
        "method": "mean-diff", "read_position": f"prompt-{read}", "layer_convention": "block_output",
        "dataset_name": name, "num_positive": str(len(positives)), "num_negative": str(len(negatives)),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "steerdesk_version": __version__,
    }
    return VectorSet(directions=directions.contiguous(), norms=norms.contiguous(), metadata=metadata,
                     proj_base=torch.einsum("lnh,lh->ln", neg, unit), proj_target=torch.einsum("lnh,lh->ln", pos, unit))


def condition_read(vs: Any) -> str:
    """``"mean"`` or ``"last"``: how a condition ``VectorSet`` aggregated prompts. Raises
    ``SteerdeskError`` when the set is not a condition (metadata ``kind`` is not ``"condition"``)."""
    meta = getattr(vs, "metadata", {}) or {}
    if meta.get("kind") != "condition":
        raise SteerdeskError("These vectors are not condition vectors (compute them with "
                             "'steerdesk calibrate --compute' or core.condition.compute_condition_vectors).")
    read = str(meta.get("read_position", "prompt-mean")).removeprefix("prompt-")
    return read if read in READS else "mean"


# ---------------------------------------------------------------------------- the gate

@dataclass(frozen=True)
class ConditionGate:
    """Steer a row only when its prompt's CAST score at ``layer`` is ``side`` of ``threshold``.

    ``direction`` is the condition vector of that layer (``[hidden]``), ``read`` how prompt
    states are aggregated (``"mean"`` over prompt tokens or the ``"last"`` one) - the same as
    when the condition vectors were computed. ``"above"`` opens on ``score > threshold``,
    ``"below"`` on ``score < threshold``.
    """

    layer: int
    direction: torch.Tensor
    threshold: float
    side: str = "above"
    read: str = "mean"

    def check(self, lm: LoadedModel) -> None:
        """Raise ``SteerdeskError`` for a gate that cannot be applied to ``lm``."""
        check_layers([self.layer], lm.info.num_layers)
        if self.side not in SIDES:
            raise SteerdeskError(f"Unknown gate side {self.side!r}; use one of {', '.join(SIDES)}.")
        if self.read not in READS:
            raise SteerdeskError(f"Unknown condition read {self.read!r}; use one of {', '.join(READS)}.")
        if not -1.0 <= float(self.threshold) <= 1.0:
            raise SteerdeskError(f"Gate threshold {self.threshold:g} is outside [-1, 1] (scores are cosines).")
        if self.direction.ndim != 1 or self.direction.shape[0] != lm.info.hidden_size:
            raise SteerdeskError(f"The condition vector has shape {tuple(self.direction.shape)}, "
                                 f"but the model's hidden size is {lm.info.hidden_size}.")
        if not bool(torch.isfinite(self.direction).all()) or not bool(self.direction.any()):
            raise SteerdeskError(f"The condition vector for layer {self.layer} is zero or not finite.")

    def opens(self, scores: torch.Tensor) -> list[bool]:
        """Per score: does the gate open (strict inequality on ``side`` of ``threshold``)."""
        hit = scores > self.threshold if self.side == "above" else scores < self.threshold
        return [bool(x) for x in hit.reshape(-1)]

    def describe(self) -> str:
        """One line for logs and records: layer, side, threshold, read."""
        op = ">" if self.side == "above" else "<"
        return f"gate at layer {self.layer}: score {op} {self.threshold:g} ({self.read})"


def gate_scores(lm: LoadedModel, prompts: Sequence[str], gate: ConditionGate, *, system: str | None = None,
                raw: bool = False) -> torch.Tensor:
    """CAST scores ``[len(prompts)]`` of the unsteered prompts at the gate's layer (one batched,
    truncated forward pass). Raises ``SteerdeskError`` for a gate that cannot be applied."""
    gate.check(lm)
    states = prompt_states(lm, prompts, [gate.layer], read=gate.read, system=system, raw=raw,
                           batch_size=max(1, len(prompts)))
    return cast_scores(states[0], gate.direction)


# ---------------------------------------------------------------------------- calibration

@dataclass
class Calibration:
    """Best gate found on labelled prompts, and every layer's scores for plotting.

    ``scores``: ``[len(layers), n]`` CAST scores; ``labels``: ``[n]`` bool (True = on-condition).
    ``f1`` / ``precision`` / ``recall`` of the best point; ``table``: per layer, its best
    ``(threshold, side, f1, precision, recall)``.
    """

    layer: int
    threshold: float
    side: str
    f1: float
    precision: float
    recall: float
    layers: list[int]
    scores: torch.Tensor
    labels: torch.Tensor
    table: list[tuple[int, float, str, float, float, float]]
    read: str = "mean"

    def to_json(self) -> dict[str, Any]:
        """The best point and the per-layer table (no scores)."""
        return {"layer": self.layer, "threshold": self.threshold, "side": self.side, "f1": self.f1,
                "precision": self.precision, "recall": self.recall, "read": self.read,
                "per_layer": [{"layer": la, "threshold": t, "side": s, "f1": f, "precision": p, "recall": r}
                              for la, t, s, f, p, r in self.table]}


def thresholds_for(scores: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` candidate thresholds per layer: evenly spaced strictly inside each row's score range
    (``[L, n]`` -> ``[L, count]``), so each splits the scores somewhere."""
    lo, hi = scores.min(dim=1, keepdim=True).values, scores.max(dim=1, keepdim=True).values
    frac = (torch.arange(count, dtype=torch.float32) + 0.5) / count  # (0, 1)
    return lo + (hi - lo) * frac.unsqueeze(0)


def f1_grid(scores: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """F1, precision, recall of ``score > t`` for every layer and threshold: ``[L, T]`` each.

    ``scores`` ``[L, n]``, ``labels`` ``[n]`` bool, ``thresholds`` ``[L, T]``. Precision is 0 when
    nothing is predicted positive; F1 0 when precision + recall is 0. No forward pass.
    """
    pred = scores.unsqueeze(1) > thresholds.unsqueeze(2)  # [L, T, n]
    y = labels.bool().view(1, 1, -1)
    tp = (pred & y).sum(-1).float()
    fp = (pred & ~y).sum(-1).float()
    fn = (~pred & y).sum(-1).float()
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12),
                     torch.zeros_like(tp))
    return f1, precision, recall


def calibrate(lm: LoadedModel, conditions: Any, prompts: Sequence[str], labels: Sequence[bool], *,
              layers: Sequence[int] | None = None, num_thresholds: int = 50, system: str | None = None,
              batch_size: int = 16, progress: ProgressCallback | None = None) -> Calibration:
    """Best (layer, threshold, side) for the gate by F1 on labelled ``prompts`` (True = on-condition).

    ``conditions``: a condition ``VectorSet`` (its read is used). Scores for all ``layers``
    (default: every layer with a direction) come from one truncated forward pass per batch
    (:func:`prompt_states`); thresholds (``num_thresholds`` per layer, :func:`thresholds_for`)
    and both sides (``below`` = the negated scores) are evaluated on those scores only. Ties go
    to the earlier layer, then the lower threshold. Raises ``SteerdeskError`` without both
    positive and negative prompts, or for vectors that are not conditions.
    """
    read = condition_read(conditions)
    conditions.check_compatible(lm.info)
    if len(prompts) != len(labels):
        raise SteerdeskError(f"Got {len(labels)} labels for {len(prompts)} prompts.")
    y = torch.tensor([bool(v) for v in labels])
    if bool(y.all()) or not bool(y.any()):
        raise SteerdeskError("Calibration needs both on-condition and off-condition prompts.")
    if num_thresholds < 1:
        raise SteerdeskError("Calibration needs at least one threshold.")
    use = list(layers) if layers is not None else conditions.layers_with_direction
    conditions.require_layers(use)
    states = prompt_states(lm, prompts, use, read=read, system=system, batch_size=batch_size, progress=progress)
    dirs = conditions.directions[use].float()  # [L, H]
    scores = cast_scores(states, dirs.unsqueeze(1))  # [L, n]
    table = []
    best: tuple[float, int, float, str, float, float] | None = None
    for side, sgn in (("above", 1.0), ("below", -1.0)):
        s = scores * sgn
        thr = thresholds_for(s, num_thresholds)
        f1, prec, rec = f1_grid(s, y, thr)
        for i, layer in enumerate(use):
            j = int(torch.argmax(f1[i]))  # first maximum: the lowest threshold
            row = (layer, float(thr[i, j]) * sgn, side, float(f1[i, j]), float(prec[i, j]), float(rec[i, j]))
            if side == "above":
                table.append(row)
            elif row[3] > table[i][3]:
                table[i] = row
            if best is None or row[3] > best[0]:
                best = (row[3], layer, row[1], side, row[4], row[5])
    assert best is not None
    f1b, layer, threshold, side, precision, recall = best
    return Calibration(layer=layer, threshold=threshold, side=side, f1=f1b, precision=precision, recall=recall,
                       layers=use, scores=scores, labels=y, table=table, read=read)


# ---------------------------------------------------------------------------- condition datasets

@dataclass
class ConditionSet:
    """Labelled prompts: ``prompts[i]`` is on-condition when ``labels[i]``; ``split[i]`` is
    ``"train"`` or ``"heldout"``."""

    prompts: list[str]
    labels: list[bool]
    split: list[str]
    name: str = ""

    def part(self, which: str) -> ConditionSet:
        """The rows of one split (``"train"`` or ``"heldout"``); all rows for ``"all"``."""
        idx = [i for i, s in enumerate(self.split) if which in ("all", s)]
        return ConditionSet([self.prompts[i] for i in idx], [self.labels[i] for i in idx],
                            [self.split[i] for i in idx], self.name)

    def positives(self) -> list[str]:
        """The on-condition prompts."""
        return [p for p, y in zip(self.prompts, self.labels) if y]

    def negatives(self) -> list[str]:
        """The off-condition prompts."""
        return [p for p, y in zip(self.prompts, self.labels) if not y]


def bundled_conditions() -> dict[str, str]:
    """Name -> file name of the condition sets shipped in ``steerdesk/assets/conditions``."""
    folder = resources.files("steerdesk") / "assets" / "conditions"
    return {p.name.rsplit(".", 1)[0]: p.name for p in folder.iterdir() if p.name.endswith(".jsonl")}


def load_condition_set(spec: str | Path) -> ConditionSet:
    """Read a condition set: a JSONL file (one ``{"prompt", "on": bool, "split"}`` object per line;
    ``split`` ``"train"`` or ``"heldout"``, default ``"train"``) or a bundled name (``bundled:NAME``
    or bare ``NAME``). Raises ``SteerdeskError`` naming the line of a bad row or a missing file."""
    text_spec = str(spec)
    name = text_spec.removeprefix("bundled:")
    if (text_spec.startswith("bundled:") or not Path(text_spec).exists()) and name in bundled_conditions():
        path = Path(str(resources.files("steerdesk") / "assets" / "conditions" / bundled_conditions()[name]))
    else:
        path = Path(text_spec)
        name = path.stem
        if not path.is_file():
            raise SteerdeskError(f"Condition set not found: {text_spec} "
                                 f"(bundled: {', '.join(sorted(bundled_conditions())) or 'none'}).")
    prompts, labels, split = [], [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            prompt, on, part = obj["prompt"], obj["on"], obj.get("split", "train")
        except (ValueError, KeyError, TypeError):
            raise SteerdeskError(f"{path}:{n}: expected a JSON object with 'prompt' and 'on'.") from None
        if not isinstance(prompt, str) or not prompt.strip() or not isinstance(on, bool) \
                or part not in ("train", "heldout"):
            raise SteerdeskError(f"{path}:{n}: 'prompt' must be text, 'on' true/false, 'split' train/heldout.")
        prompts.append(prompt)
        labels.append(on)
        split.append(part)
    if not prompts:
        raise SteerdeskError(f"{path}: no prompts.")
    return ConditionSet(prompts, labels, split, name)
