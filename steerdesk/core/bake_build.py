"""Building the baked model: the target family's config and state dict with the folded biases (see core/bake.py)."""

from __future__ import annotations

import copy
from typing import Any

import torch

from .bake_plan import NATIVE_SLOTS, BakePlan
from .errors import SteerdeskError
from .models import LoadedModel


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
    elif family in NATIVE_SLOTS:
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
