"""Prompt versus vector: the same held-out scores for a system-prompt instruction, the vector, and both."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .datasets import Dataset
from .errors import SteerdeskError
from .evaluate import evaluate
from .generate import GenerationResult, SamplingSettings, generate
from .models import LoadedModel
from .steering import Steer

CONDITIONS = ("unsteered", "prompt", "vector", "both")


@dataclass
class Condition:
    """Scores of one condition as deltas versus the plain (no instruction, no vector) model."""

    name: str
    margin_delta: float
    fluency_delta: float
    text: str = ""
    token_ids: list[int] = field(default_factory=list)


@dataclass
class Versus:
    """What steering gives that a prompt does not: four conditions, scored and generated alike."""

    instruction: str
    prompt: str
    conditions: list[Condition]
    n_pairs: int

    def to_dict(self) -> dict[str, Any]:
        """The comparison as JSON-ready values."""
        return {"instruction": self.instruction, "prompt": self.prompt, "n_pairs": self.n_pairs,
                "conditions": [c.__dict__ for c in self.conditions]}


def prompt_vs_vector(
    lm: LoadedModel,
    heldout: Dataset,
    steers: Sequence[Steer],
    instruction: str,
    prompt: str,
    *,
    sampling: SamplingSettings | None = None,
    max_pairs: int | None = 16,
    cancel: threading.Event | None = None,
) -> Versus:
    """Score and generate for (a) the instruction as system message, (b) the vector, (c) both.

    Deltas are versus the plain model on the same held-out pairs; generations of all four
    conditions run in one batch (rows with and without the system message, steered or not).
    """
    if not instruction.strip():
        raise SteerdeskError("Write the instruction to compare with (e.g. 'Reply rudely.').")
    if not steers:
        raise SteerdeskError("Pick a vector and layers to compare with the instruction.")
    plain = evaluate(lm, heldout, steers, max_pairs=max_pairs, cancel=cancel)
    instructed = evaluate(lm, heldout, steers, system=instruction, max_pairs=max_pairs, cancel=cancel)
    base = plain.unsteered
    scores = {
        "unsteered": base,
        "prompt": instructed.unsteered,
        "vector": plain.steered,
        "both": instructed.steered,
    }
    # One batched pass: the system message is part of the prompt text, so rows are formatted apart.
    from .datasets import format_prompt

    tok = lm.tokenizer
    texts = [format_prompt(tok, prompt), format_prompt(tok, prompt, instruction),
             format_prompt(tok, prompt), format_prompt(tok, prompt, instruction)]
    rows = [[], [], list(steers), list(steers)]
    results: list[GenerationResult] = generate(lm, texts, rows, sampling=sampling, stop=cancel, raw_prompts=True)
    conditions = []
    for name, res in zip(CONDITIONS, results):
        s = scores[name]
        conditions.append(Condition(name, s.margin - base.margin, s.fluency - base.fluency, res.text,
                                    res.token_ids))
    return Versus(instruction, prompt, conditions, plain.n_pairs)
