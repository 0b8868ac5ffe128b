"""Bake ``add`` steering into a standalone Hugging Face checkpoint (issue 14).

Why this is exact. Steering ``add`` at block ``L`` on all positions adds the same vector
``c = sum(scale * u)`` (over the steers at ``L``) to the residual stream after block ``L``
(``hidden_states[L + 1]``, conventions in :mod:`steerdesk.core.steering`). Every decoder block
handled here ends with ``h + ... + W x + b`` where ``W x + b`` is the block's *last residual
writer* (the MLP down-projection; with a parallel residual, GPT-NeoX / phi-2, any writer would do)
whose output joins the stream with no norm after it and is read by nothing inside the block. (The
attention output projection would not do in a sequential block: the block's own MLP reads it.)
Replacing ``b`` by ``b + c`` therefore adds ``c`` to the block's output at every position, which
is what the hook does; later blocks read the same stream in both models. Several steers at
several layers compose: each changes only its own block's bias.

Slots, per family (``model_type`` of the source config):

* ``llama`` (SmolLM2 included): ``mlp.down_proj.bias``, switched on with ``mlp_bias=True`` (the
  gate / up biases this also creates are zero);
* ``gpt2``: ``mlp.c_proj.bias``; ``gpt_neox``: ``mlp.dense_4h_to_h.bias`` (with the parallel
  residual the MLP output still joins the stream once); ``phi`` (phi-2 style): ``mlp.fc2.bias``;
* families without a bias slot are **re-expressed** as Llama when both compute the same function:
  ``mistral`` (``mlp_bias``), ``qwen2`` (``attention_bias=True`` carries its q/k/v biases; the
  ``o_proj`` bias this also creates stays zero, ``mlp_bias`` holds ``c``), ``phi3`` (fused
  ``qkv_proj`` split into q/k/v in that order, ``gate_up_proj`` split into gate (first half) and
  up (second half), ``mlp_bias``). A
  sliding attention window that Llama cannot express leaves the bake exact only for sequences up
  to the window's length: that limit is written in the metadata and returned.

Refused, with the reason: ``project`` and ``clamp`` (they depend on ``h . v^`` at each position,
which no weight can carry; the naive fold into every writer up to block ``L`` also changes what
blocks ``0..L`` read through their norms -- ``tests/core/test_bake_refusals.py`` shows the
difference), positions other than ``all``, per-row steering, Gemma 2 / Gemma 3 (a norm after each
writer), any other family, quantised models, and a recipe of scale-0 steers only (a no-op).

Every bake is checked before anything is written: the baked model (built in memory, sharing the
source's tensors) and the hooked source model run on the same token ids; in float32 a logit
difference above ``1e-3 * (1 + max |logit|)`` refuses the bake (it would be a bug here).
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .errors import Cancelled, SteerdeskError
from .models import LoadedModel
from .steering import Steer

FORMAT = "steerdesk.bake/1"
SIDECAR = "steerdesk_bake.json"
CONFIG_KEY = "steerdesk_bake"
CHECK_TEXT = "The quick brown fox jumps over the lazy dog. Steering check, 1 2 3."

ProgressFn = Callable[[int, int, str], None]

# Families whose blocks already carry a bias on a residual writer (same class in and out).
_NATIVE_SLOTS = {
    "gpt2": "mlp.c_proj.bias",
    "gpt_neox": "mlp.dense_4h_to_h.bias",
    "phi": "mlp.fc2.bias",
}
_LLAMA_SLOT = "mlp.down_proj.bias"
_NORM_AFTER_WRITER = {"gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text"}


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


def _model_type(model: Any) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def _window_limit(config: Any) -> int | None:
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


def _check_rope(config: Any, family: str) -> None:
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
    family = _model_type(model)
    addends, notes = fold_addends(steers, lm.info.num_layers, lm.info.hidden_size)  # the recipe first
    layers = tuple(sorted(addends))
    if (getattr(model, "is_quantized", False) or getattr(config, "quantization_config", None) is not None
            or lm.info.quantization):
        raise SteerdeskError(f"Cannot bake a quantised model ({family}): load it unquantised.")
    if family in _NORM_AFTER_WRITER:
        raise SteerdeskError(f"Cannot bake {family}: a norm follows each residual writer (post-attention / "
                             f"post-feedforward norms), so no bias adds a constant to the stream after a block.")
    if family == "llama":
        slot = _LLAMA_SLOT
        target = "llama"
        if getattr(config, "pretraining_tp", 1) not in (None, 1):
            raise SteerdeskError("Cannot bake a Llama checkpoint with pretraining_tp > 1.")
        limit = None
    elif family in _NATIVE_SLOTS:
        slot, target, limit = _NATIVE_SLOTS[family], family, None
        if family == "gpt2" and getattr(config, "add_cross_attention", False):
            raise SteerdeskError("Cannot bake GPT-2 with cross-attention.")
    elif family in ("mistral", "qwen2", "phi3"):
        _check_rope(config, family)
        target = "llama"
        slot = _LLAMA_SLOT  # the block's last writer: o_proj's output is read by the block's MLP
        limit = _window_limit(config)
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
        _get_attr(lm.blocks[layer], slot.rsplit(".", 1)[0], family)
    return BakePlan(source_model_type=family, target_model_type=target, slot=slot, layers=layers,
                    addends=addends, max_tokens=limit, notes=tuple(notes))


def _get_attr(obj: Any, path: str, family: str) -> Any:
    for part in path.split("."):
        nxt = getattr(obj, part, None)
        if nxt is None:
            raise SteerdeskError(f"Cannot bake {family}: its blocks have no {path} (an unexpected layout).")
        obj = nxt
    return obj


# ================================================================================ re-expression

def _llama_config(config: Any, *, attention_bias: bool, mlp_bias: bool) -> Any:
    """A ``LlamaConfig`` computing the same function as a Mistral / Qwen2 / Phi3 ``config``."""
    from transformers import LlamaConfig

    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    rope = copy.deepcopy(getattr(config, "rope_parameters", None))
    if isinstance(rope, dict):
        rope.pop("partial_rotary_factor", None)  # checked to be 1
    try:
        return LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers, num_attention_heads=heads, num_key_value_heads=kv,
            head_dim=head_dim, hidden_act=config.hidden_act, max_position_embeddings=config.max_position_embeddings,
            initializer_range=getattr(config, "initializer_range", 0.02), rms_norm_eps=config.rms_norm_eps,
            use_cache=True, pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id, tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            rope_parameters=rope, attention_bias=attention_bias, mlp_bias=mlp_bias,
            attention_dropout=getattr(config, "attention_dropout", 0.0) or 0.0,
        )
    except (ValueError, TypeError) as exc:
        raise SteerdeskError(f"Cannot re-express {config.model_type} as Llama: {str(exc).splitlines()[0]}") from None


def _target_config(lm: LoadedModel, plan: BakePlan) -> Any:
    config = lm.model.config
    family = plan.source_model_type
    if family == "llama":
        new = copy.deepcopy(config)
        new.mlp_bias = True
    elif family in _NATIVE_SLOTS:
        new = copy.deepcopy(config)
    elif family == "qwen2":
        new = _llama_config(config, attention_bias=True, mlp_bias=True)
    else:  # mistral, phi3
        new = _llama_config(config, attention_bias=False, mlp_bias=True)
    new.dtype = lm.model.dtype
    return new


def _target_state(lm: LoadedModel, plan: BakePlan, new_model: Any) -> dict[str, torch.Tensor]:
    """The source's tensors under the target's names, new biases zero, ``c`` added at the slots.

    Unchanged tensors are shared with the source model (no copy); the source is never modified.
    """
    src = lm.model.state_dict()
    family = plan.source_model_type
    state: dict[str, torch.Tensor] = {}
    if family == "phi3":
        cfg = lm.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        q_size = cfg.num_attention_heads * head_dim
        kv_size = (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) * head_dim
        for name, t in src.items():
            if name.endswith("self_attn.qkv_proj.weight"):
                stem = name[: -len("qkv_proj.weight")]
                if t.shape[0] != q_size + 2 * kv_size:
                    raise SteerdeskError(f"Cannot bake phi3: {name} has {t.shape[0]} rows, expected "
                                         f"{q_size + 2 * kv_size}.")
                state[stem + "q_proj.weight"] = t[:q_size].clone()
                state[stem + "k_proj.weight"] = t[q_size:q_size + kv_size].clone()
                state[stem + "v_proj.weight"] = t[q_size + kv_size:].clone()
            elif name.endswith("mlp.gate_up_proj.weight"):
                stem = name[: -len("gate_up_proj.weight")]
                half = t.shape[0] // 2  # Phi3MLP: gate, up = gate_up_proj(x).chunk(2)
                state[stem + "gate_proj.weight"] = t[:half].clone()
                state[stem + "up_proj.weight"] = t[half:].clone()
            else:
                state[name] = t
    else:
        state = dict(src)
    expected = new_model.state_dict()  # meta tensors: names and shapes only
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise SteerdeskError(f"Cannot bake {family}: the {plan.target_model_type} checkpoint has no place for "
                             f"{unknown[0]} (an unexpected layout).")
    for name, meta in expected.items():
        if name in state:
            if tuple(state[name].shape) != tuple(meta.shape):
                raise SteerdeskError(f"Cannot bake {family}: {name} has shape {tuple(state[name].shape)}, the "
                                     f"{plan.target_model_type} checkpoint expects {tuple(meta.shape)}.")
            continue
        if name.endswith(".bias"):  # a bias the source family has not: zero
            ref = lm.model.get_input_embeddings().weight
            state[name] = torch.zeros(meta.shape, dtype=ref.dtype, device=ref.device)
        elif name == "lm_head.weight" and getattr(new_model.config, "tie_word_embeddings", False):
            continue  # tied: filled by tie_weights
        else:
            raise SteerdeskError(f"Cannot bake {family}: the source model has no tensor for {name}.")
    prefix = lm.info.block_path
    for layer, c in plan.addends.items():
        name = f"{prefix}.{layer}.{plan.slot}"
        if name not in state:
            raise SteerdeskError(f"Cannot bake {family}: no bias {name} in the {plan.target_model_type} checkpoint.")
        old = state[name]
        state[name] = (old.to(torch.float32) + c.to(old.device)).to(old.dtype)
    return state


def build_baked_model(lm: LoadedModel, plan: BakePlan) -> Any:
    """The baked model in memory (eval mode), its unchanged tensors shared with ``lm.model``.

    Built on the meta device and filled with ``load_state_dict(assign=True)``, so a large model
    is not copied; non-persistent buffers (rotary frequencies) are taken from the source model.
    Raises ``SteerdeskError`` if the layouts do not match.
    """
    from transformers import AutoModelForCausalLM

    config = _target_config(lm, plan)
    with torch.device("meta"):
        new = AutoModelForCausalLM.from_config(config, dtype=lm.model.dtype)
    state = _target_state(lm, plan, new)
    missing, unexpected = new.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise SteerdeskError(f"Cannot bake: unexpected tensor {unexpected[0]}.")
    if getattr(new.config, "tie_word_embeddings", False):
        new.tie_weights()
    src_buffers = dict(lm.model.named_buffers())
    src_modules = dict(lm.model.named_modules())
    for name, module in new.named_modules():
        for bname, buf in list(module._buffers.items()):
            if buf is None or not buf.is_meta:
                continue
            full = f"{name}.{bname}" if name else bname
            other = src_buffers.get(full)
            if other is None or tuple(other.shape) != tuple(buf.shape):
                raise SteerdeskError(f"Cannot bake: no source buffer for {full}.")
            module._buffers[bname] = other
        src_module = src_modules.get(name)
        # Attributes computed from buffers at init (e.g. the rotary attention scaling) are copied too.
        if src_module is not None and hasattr(src_module, "attention_scaling"):
            module.attention_scaling = src_module.attention_scaling
    leftovers = [n for n, p in new.named_parameters() if p.is_meta] + [n for n, b in new.named_buffers() if b.is_meta]
    if leftovers:
        raise SteerdeskError(f"Cannot bake: no value for {leftovers[0]}.")
    if missing and any(m != "lm_head.weight" for m in missing):
        raise SteerdeskError(f"Cannot bake: no value for {missing[0]}.")
    new.generation_config = copy.deepcopy(lm.model.generation_config)
    new.eval()
    new.requires_grad_(False)
    return new


# ================================================================================ the check

def check_ids(lm: LoadedModel, length: int = 24) -> torch.Tensor:
    """``[1, length]`` token ids of :data:`CHECK_TEXT` (repeated as needed), on the input device."""
    ids = lm.tokenizer(CHECK_TEXT, add_special_tokens=False)["input_ids"]
    while len(ids) < length:
        ids = ids + ids
    return torch.tensor([ids[:length]], device=lm.input_device)


def compare_logits(lm: LoadedModel, steers: Sequence[Steer], baked: Any, ids: torch.Tensor) -> tuple[float, float]:
    """``(max |baked - hooked| logit difference, max |hooked logit|)`` on ``ids`` ``[1, S]``."""
    from .steering import Steering

    with torch.inference_mode():
        with Steering(lm, list(steers)):
            want = lm.model(input_ids=ids).logits.float()
        got = baked(input_ids=ids.to(baked.get_input_embeddings().weight.device)).logits.float()
    diff = float((got.to(want.device) - want).abs().amax())
    return diff, float(want.abs().amax())


# ================================================================================ metadata

def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bake_metadata(lm: LoadedModel, steers: Sequence[Steer], plan: BakePlan, *, vectors: Any = None,
                  vector_path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What the checkpoint records about its making (JSON-ready): format, source model, vector
    identity (``directions_sha256`` as in records and sweeps, plus the file's SHA-256), the
    steers (layer, scale, mode, normalize, positions), the target family, slot and limits."""
    from .. import __version__
    from .identity import model_identity, vector_identity

    vec: dict[str, Any] = {}
    if vectors is not None:
        vec = vector_identity(vectors, str(vector_path) if vector_path is not None else None)
    elif vector_path is not None:
        vec = {"path": str(vector_path)}
    if vector_path is not None and Path(vector_path).is_file():
        vec["file_sha256"] = file_sha256(vector_path)
    first = steers[0]
    return {
        "format": FORMAT,
        "steerdesk_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {**model_identity(lm), "model_type": plan.source_model_type, "path": lm.info.source},
        "vector": vec,
        "steers": [{"layer": int(s.layer), "scale": float(s.scale), "mode": s.mode, "normalize": bool(s.normalize),
                    "positions": s.positions} for s in steers],
        "layers": list(plan.layers),
        "scale": float(first.scale),
        "mode": first.mode,
        "normalize": bool(first.normalize),
        "target_model_type": plan.target_model_type,
        "re_expressed": plan.re_expressed,
        "bias_slot": plan.slot,
        "exact_up_to_tokens": plan.max_tokens,
        "notes": list(plan.notes),
    }


# ================================================================================ writing

def check_out_dir(out_dir: str | os.PathLike[str], force: bool = False, source: str | None = None) -> Path:
    """The output folder as a ``Path``, after refusing what a bake must not write to.

    Raises ``SteerdeskError`` when it exists (unless ``force``), is a file or a link, its parent
    folder is missing, or it is, holds or lies in ``source`` (the folder the model was loaded from).
    """
    out = Path(out_dir).expanduser()
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise SteerdeskError(f"{out} exists and is not a folder: choose another output folder.")
        if not force:
            raise SteerdeskError(f"{out} already exists: choose another folder, or pass --force to replace it.")
    parent = out.parent
    if not parent.is_dir():
        raise SteerdeskError(f"Cannot bake into {out}: the folder {parent} does not exist.")
    src = Path(source).resolve() if source else None
    if src is not None and src.exists():
        target = out.resolve()
        if target == src or src in target.parents or target in src.parents:
            raise SteerdeskError(f"Cannot bake into {out}: it is (or holds) the folder the model was loaded from.")
    return out


def _legacy_rope_keys(config_file: Path) -> None:
    """Add the pre-transformers-5 RoPE keys (``rope_theta``, ``rope_scaling``) next to ``rope_parameters``.

    transformers 5 writes only ``rope_parameters``; readers built for transformers 4 (older vLLM,
    transformers 4 itself) would silently fall back to their default theta (10000) without
    ``rope_theta``. transformers 5 reads the legacy keys back into the same ``rope_parameters``.
    """
    config = json.loads(config_file.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return
    config.setdefault("rope_theta", rope["rope_theta"])
    if rope.get("rope_type", "default") != "default" and "rope_scaling" not in config:
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write(baked: Any, lm: LoadedModel, tmp: Path, metadata: dict[str, Any]) -> None:
    baked.config.steerdesk_bake = metadata
    baked.save_pretrained(tmp)
    _legacy_rope_keys(tmp / "config.json")
    lm.tokenizer.save_pretrained(tmp)
    if not (tmp / "generation_config.json").is_file():
        baked.generation_config.save_pretrained(tmp)
    (tmp / SIDECAR).write_text(json.dumps(metadata, indent=1) + "\n", encoding="utf-8")
    for f in tmp.iterdir():  # flush before the rename makes the folder visible
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _replace_folder(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``; an existing ``out`` is moved aside first and removed after."""
    if not out.exists():
        os.rename(tmp, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(aside)
    os.rename(out, aside)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def bake(
    lm: LoadedModel,
    steers: Sequence[Steer],
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    vectors: Any = None,
    vector_path: str | os.PathLike[str] | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> BakeResult:
    """Write ``lm`` with ``steers`` folded into its weights as a Hugging Face checkpoint folder.

    ``steers``: a flat list of ``add`` steers on positions ``all`` (see :func:`plan_bake` for
    what is refused). ``out_dir`` gets ``model.safetensors`` (or shards), ``config.json`` (with a
    ``steerdesk_bake`` entry), the tokenizer files, ``generation_config.json`` and
    ``steerdesk_bake.json`` (the same metadata); ``AutoModelForCausalLM.from_pretrained(out_dir)``
    loads it without steerdesk and without remote code. ``vectors`` / ``vector_path`` identify
    the vector set in the metadata. The folder is written beside ``out_dir`` under a temporary
    name and renamed at the end: a failure (disk full, cancel) leaves nothing behind. An existing
    ``out_dir`` is refused unless ``force`` (then replaced whole). ``progress(done, total, msg)``
    is called per step; ``cancel`` is checked between steps.

    Raises ``SteerdeskError`` (one line) for anything that cannot be baked exactly, an existing
    folder, a float32 self-check that fails, or a write error; :class:`Cancelled` when cancelled.
    """
    t0 = time.perf_counter()
    out = Path(out_dir).expanduser()
    steps = 4

    def step(i: int, msg: str) -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled("Stopped.")
        if progress is not None:
            progress(i, steps, msg)

    if vectors is not None:
        vectors.check_compatible(lm.info)
    check_out_dir(out, force, lm.info.source)
    step(0, "Planning the bake")
    plan = plan_bake(lm, steers)
    kept = [s for s in steers if not s.is_identity]
    step(1, "Folding the steering into the weights")
    baked = build_baked_model(lm, plan)
    step(2, "Checking the baked model against the hooked one")
    diff, scale = compare_logits(lm, kept, baked, check_ids(lm, min(24, plan.max_tokens or 24)))  # within the limit
    if lm.model.dtype in (torch.float32, torch.float64) and not diff <= 1e-3 * (1.0 + scale):
        raise SteerdeskError(f"The baked model does not reproduce the steered one (max logit difference {diff:.3g}, "
                             f"logits up to {scale:.3g}); nothing was written. This is a steerdesk bug.")
    metadata = bake_metadata(lm, kept, plan, vectors=vectors, vector_path=vector_path)
    metadata["check"] = {"max_logit_diff": diff, "logit_scale": scale,
                         "dtype": str(lm.model.dtype).replace("torch.", "")}
    step(3, f"Writing {out}")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.bake-", dir=out.parent))
    except OSError as exc:
        raise SteerdeskError(f"Cannot write the baked checkpoint to {out}: {exc.strerror or exc}") from None
    try:
        _write(baked, lm, tmp, metadata)
        if cancel is not None and cancel.is_set():
            raise Cancelled("Stopped.")
        _replace_folder(tmp, out)
    except OSError as exc:
        why = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise SteerdeskError(f"Cannot write the baked checkpoint to {out}: {why}; nothing was written.") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if progress is not None:
        progress(steps, steps, f"Baked into {out}")
    return BakeResult(out_dir=out, plan=plan, metadata=metadata, max_logit_diff=diff, logit_scale=scale,
                      seconds=time.perf_counter() - t0)
