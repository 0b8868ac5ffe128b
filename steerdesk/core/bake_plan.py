"""Planning a bake: which steering folds exactly into which bias slot of which family (see core/bake.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import SteerdeskError
from .models import LoadedModel
from .steering import Steer

FORMAT = "steerdesk.bake/1"
SIDECAR = "steerdesk_bake.json"
CONFIG_KEY = "steerdesk_bake"
CHECK_TEXT = "The quick brown fox jumps over the lazy dog. Steering check, 1 2 3."

ProgressFn = Callable[[int, int, str], None]

# Families whose blocks already carry a bias on a residual writer (same class in and out).
NATIVE_SLOTS = {
    "gpt2": "mlp.c_proj.bias",
    "gpt_neox": "mlp.dense_4h_to_h.bias",
    "phi": "mlp.fc2.bias",
}
LLAMA_SLOT = "mlp.down_proj.bias"
NORM_AFTER_WRITER = {"gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text"}


@dataclass(frozen=True)
class BakePlan:
    """How a steering recipe is folded into a checkpoint (decided before any weight is touched).

    ``addends`` maps block ``L`` to the ``[hidden]`` float32 vector added after block ``L``;
    ``slot`` is the bias, relative to a block, that receives it; ``target_model_type`` is the
    family of the written checkpoint (``"llama"`` for a re-expression). ``max_tokens`` is the
    sequence length (prompt + generated tokens) up to which the bake is exact, ``None`` when
    there is no limit. ``notes`` are sentences for the user (re-expression, limits, skipped steers).
    """

    source_model_type: str
    target_model_type: str
    slot: str
    layers: tuple[int, ...]
    addends: Mapping[int, torch.Tensor] = field(compare=False, repr=False)
    max_tokens: int | None = None
    notes: tuple[str, ...] = ()

    @property
    def re_expressed(self) -> bool:
        """True when the checkpoint is written in another family than the source's."""
        return self.source_model_type != self.target_model_type


@dataclass(frozen=True)
class BakeResult:
    """A finished bake: where it is, how it was folded, the metadata written, the self-check.

    ``max_logit_diff``: the largest |logit difference| between the baked model and the hooked
    source model on :data:`CHECK_TEXT`, in the model's dtype; ``logit_scale``: the largest
    |logit| of the hooked model there (for judging the difference). ``seconds``: wall time.
    """

    out_dir: Path
    plan: BakePlan
    metadata: dict[str, Any]
    max_logit_diff: float
    logit_scale: float
    seconds: float

    def summary(self) -> str:
        """A few lines for a terminal or a dialog."""
        p = self.plan
        lines = [f"Baked {', '.join(f'L{layer}' for layer in p.layers)} into {self.out_dir}",
                 f"  {p.source_model_type} -> {p.target_model_type} checkpoint, bias slot {p.slot}",
                 (f"  check: max |logit difference| vs the hooked model {self.max_logit_diff:.3g} "
                  f"(logits up to {self.logit_scale:.3g})")]
        lines += [f"  note: {note}" for note in p.notes]
        if p.max_tokens is not None:
            lines.append(f"  LIMIT: exact only for sequences up to {p.max_tokens} tokens (sliding attention window)")
        return "\n".join(lines)


# ================================================================================= planning

def check_settings(mode: str, positions: str = "all", layer: int | None = None) -> None:
    """Refuse (``SteerdeskError``, one line with the reason) a mode or positions that cannot be baked.

    Only ``add`` on positions ``all`` can; ``layer`` only makes the message concrete.
    """
    if positions != "all":
        raise SteerdeskError(f"Steering at positions {positions!r} cannot be baked: weights act on every "
                             f"position alike (use positions 'all').")
    if mode in ("project", "clamp"):
        upto = f"block {layer}" if layer is not None else "block L"
        before = f"blocks 0-{layer}" if layer is not None else "blocks 0-L"
        raise SteerdeskError(
            f"'{mode}' steering cannot be baked exactly: it subtracts (h.v^)v^, which depends on each "
            f"position's hidden state, and no bias can carry that; folding the projection into every "
            f"writer up to {upto} would also change what {before} read through their norms. "
            f"Only 'add' can be baked.")
    if mode != "add":
        raise SteerdeskError(f"Unknown steering mode {mode!r}: only 'add' can be baked.")


def fold_addends(steers: Sequence[Steer] | Sequence[Sequence[Steer]], num_layers: int,
                 hidden_size: int) -> tuple[dict[int, torch.Tensor], list[str]]:
    """Sum the ``add`` steers of each layer into one ``[hidden_size]`` float32 vector.

    ``u`` is the raw vector, or the unit vector with ``normalize`` (computed as the hooks do).
    Scale-0 steers are the identity and are skipped (named in the returned notes). Raises
    ``SteerdeskError`` for per-row steering, a mode other than ``add``, positions other than
    ``all``, a steer that fails :meth:`Steer.check`, or nothing left to bake.
    """
    if not steers:
        raise SteerdeskError("Nothing to bake: no steering given (a vector and layers are needed).")
    if not isinstance(steers[0], Steer):
        raise SteerdeskError("Per-row steering cannot be baked: a checkpoint has one set of weights for every "
                             "prompt; bake one row's steering.")
    addends: dict[int, torch.Tensor] = {}
    notes: list[str] = []
    for s in steers:
        if not isinstance(s, Steer):
            raise SteerdeskError("Per-row steering cannot be baked: give one flat list of steers.")
        s.check(num_layers, hidden_size)
        if not s.is_identity:
            check_settings(s.mode, s.positions, s.layer)
        if s.is_identity:
            notes.append(f"layer {s.layer}: scale 0 is the identity, skipped")
            continue
        v = s.vector.detach().to(torch.float32).reshape(-1).cpu()
        u = v / v.norm().clamp_min(torch.finfo(torch.float32).tiny) if s.normalize else v
        add = float(s.scale) * u
        if not bool(torch.isfinite(add).all()):
            raise SteerdeskError(f"Layer {s.layer}: scale x vector overflows float32; lower the scale.")
        addends[s.layer] = addends[s.layer] + add if s.layer in addends else add
    if not addends:
        raise SteerdeskError("Nothing to bake: every steer has scale 0 (the identity); the checkpoint would "
                             "equal the model.")
    return addends, notes


def model_type(model: Any) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def window_limit(config: Any) -> int | None:
    """The sliding window length when any layer uses one that matters, else None."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    if getattr(config, "model_type", "") == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    max_pos = getattr(config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and window >= max_pos:
        return None
    return int(window)


def check_rope(config: Any, family: str) -> None:
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, Mapping) else "default"
    if rope_type not in ("default", None):
        raise SteerdeskError(f"Cannot bake {family}: its RoPE type {rope_type!r} has not been checked to give the "
                             f"same positions in a Llama checkpoint (only 'default' is re-expressed).")
    factor = rope.get("partial_rotary_factor", 1.0) if isinstance(rope, Mapping) else 1.0
    factor = getattr(config, "partial_rotary_factor", factor) if factor == 1.0 else factor
    if factor not in (None, 1, 1.0):
        raise SteerdeskError(f"Cannot bake {family}: it rotates only part of each head (partial_rotary_factor "
                             f"{factor}), which a Llama checkpoint cannot express.")


def plan_bake(lm: LoadedModel, steers: Sequence[Steer] | Sequence[Sequence[Steer]]) -> BakePlan:
    """Decide how ``steers`` are folded into ``lm``'s weights, or refuse with the reason.

    Cheap (no weights are copied): a panel can call it to say up front whether a steering can be
    baked. Raises ``SteerdeskError`` for what cannot be baked exactly (see the module docstring).
    """
    model = lm.model
    config = model.config
    family = model_type(model)
    addends, notes = fold_addends(steers, lm.info.num_layers, lm.info.hidden_size)  # the recipe first
    layers = tuple(sorted(addends))
    if (getattr(model, "is_quantized", False) or getattr(config, "quantization_config", None) is not None
            or lm.info.quantization):
        raise SteerdeskError(f"Cannot bake a quantised model ({family}): load it unquantised.")
    if family in NORM_AFTER_WRITER:
        raise SteerdeskError(f"Cannot bake {family}: a norm follows each residual writer (post-attention / "
                             f"post-feedforward norms), so no bias adds a constant to the stream after a block.")
    if family == "llama":
        slot = LLAMA_SLOT
        target = "llama"
        if getattr(config, "pretraining_tp", 1) not in (None, 1):
            raise SteerdeskError("Cannot bake a Llama checkpoint with pretraining_tp > 1.")
        limit = None
    elif family in NATIVE_SLOTS:
        slot, target, limit = NATIVE_SLOTS[family], family, None
        if family == "gpt2" and getattr(config, "add_cross_attention", False):
            raise SteerdeskError("Cannot bake GPT-2 with cross-attention.")
    elif family in ("mistral", "qwen2", "phi3"):
        check_rope(config, family)
        target = "llama"
        slot = LLAMA_SLOT  # the block's last writer: o_proj's output is read by the block's MLP
        limit = window_limit(config)
        notes.insert(0, f"re-expressed as a Llama checkpoint ({family} has no bias on a residual writer)")
        if limit is not None:
            notes.append(f"{family} uses a sliding attention window of {limit} tokens, which Llama has not: "
                         f"the baked checkpoint equals the steered model only for sequences up to {limit} tokens")
    elif family == "gemma":
        raise SteerdeskError("Cannot bake gemma: its blocks have no bias on a residual writer, and a Llama "
                             "re-expression has not been checked (scaled embeddings, (1 + w) norms).")
    else:
        raise SteerdeskError(f"Cannot bake {family or type(model).__name__}: steerdesk does not know which bias of "
                             f"its blocks adds to the residual stream (known: llama, mistral, qwen2, phi3, gpt2, "
                             f"gpt_neox, phi).")
    for layer in layers:
        get_attr(lm.blocks[layer], slot.rsplit(".", 1)[0], family)
    return BakePlan(source_model_type=family, target_model_type=target, slot=slot, layers=layers,
                    addends=addends, max_tokens=limit, notes=tuple(notes))



def get_attr(obj: Any, path: str, family: str) -> Any:
    for part in path.split("."):
        nxt = getattr(obj, part, None)
        if nxt is None:
            raise SteerdeskError(f"Cannot bake {family}: its blocks have no {path} (an unexpected layout).")
        obj = nxt
    return obj


# ================================================================================ re-expression

