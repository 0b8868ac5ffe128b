"""A leaner forward for Llama-style decoder blocks: the same arithmetic with fewer operators.

transformers' decoder block runs about 74 ATen operators and a dozen module calls per token
(SmolLM2, int4); on a CPU decode step that is as much time as the weight products
(docs/benchmarks.md, issue 11). :func:`install` gives each block of the Llama family (Llama,
Mistral, Qwen2, SmolLM2, ... : RMSNorm, q/k/v/o projections with rotary position embeddings, a
gated MLP, SDPA attention) a forward that does the same floating-point operations in the same
order, with rotary applied to queries and keys in one pass, the products of a fused group
(:mod:`steerdesk.core.quantize`) called once, and no per-projection module calls.

Only hooks on the blocks themselves see the lean forward's work: hooks on a block's attention, MLP or
norms no longer run (steerdesk hooks blocks only; transformers' ``output_attentions`` would need them).
Nothing is taken on trust: before a model's blocks are switched, the lean forward of its first and
last block (every block must have the same module types) is compared with transformers' forward
on random hidden states (a prefill with a padding mask, then a decode step through a KV cache)
and must give **bitwise equal** outputs and cache entries; otherwise the model keeps
transformers' forward. Hooks on the blocks (steering, reads)
run as before: only ``block.forward`` is replaced, per instance.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

#: The transformers families whose block, attention, MLP and norm code lean_forward reproduces, by the
#: module that defines them (exact classes: a family derived from these, e.g. Ministral3's position-
#: dependent query scale or SmolLM3's layers without RoPE, computes more than the structure shows).
FAMILIES = ("llama", "mistral", "qwen2")
_CLASSES = {"DecoderLayer", "Attention", "MLP", "RMSNorm"}
_BLOCK_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_ATTN_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj", "fused_q_proj_k_proj_v_proj", "rotary_emb"}
_MLP_CHILDREN = {"gate_proj", "up_proj", "down_proj", "act_fn", "fused_gate_proj_up_proj"}
_ORIGINAL = "_steerdesk_original_forward"
_sdpa: Callable[..., tuple[torch.Tensor, Any]] | None = None  # transformers' SDPA attention, imported on first use


def _rms(x: torch.Tensor, norm: Any) -> torch.Tensor:
    """transformers' ``LlamaRMSNorm.forward``, operator for operator (float32 inside)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(dtype)


def _qkv(attn: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The q, k, v projections of ``x`` ``[b, s, hidden]``: one product for a fused group."""
    fused = getattr(attn, "fused_q_proj_k_proj_v_proj", None)
    if fused is not None:
        y = fused.product(x)
        (a, b), (_, c), (_, d) = fused.slices
        return y[..., a:b], y[..., b:c], y[..., c:d]
    return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)


def _gate_up(mlp: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    fused = getattr(mlp, "fused_gate_proj_up_proj", None)
    if fused is not None:
        y = fused.product(x)
        (a, b), (_, c) = fused.slices
        return y[..., a:b], y[..., b:c]
    return mlp.gate_proj(x), mlp.up_proj(x)


def lean_forward(self: Any, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, cache: Any = None, use_cache: bool | None = False,
                 position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                 **kwargs: Any) -> torch.Tensor:
    """A Llama-style block's forward: ``hidden_states`` ``[b, s, hidden]`` -> ``[b, s, hidden]``.

    The arguments are those transformers passes to ``LlamaDecoderLayer.forward`` (``cache`` also
    as ``past_key_values``); the KV cache is updated as there. Bound to a block by :func:`install`.
    """
    global _sdpa
    if _sdpa is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        _sdpa = sdpa_attention_forward
    attend = _sdpa
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    if position_embeddings is None:  # transformers always passes them; anything else is not ours
        return getattr(self, _ORIGINAL)(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                        cache=cache, use_cache=use_cache, **kwargs)
    attn = self.self_attn
    kw = {"position_ids": position_ids, "use_cache": use_cache, **kwargs}
    b, s = hidden_states.shape[:2]
    hd = attn.head_dim
    q, k, v = _qkv(attn, _rms(hidden_states, self.input_layernorm))
    nq = q.shape[-1] // hd
    qk = torch.cat((q, k), -1).view(b, s, -1, hd).transpose(1, 2)  # queries and keys: one rotary pass
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = hd // 2
    qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), -1) * sin
    q, k = qk[:, :nq], qk[:, nq:]
    v = v.view(b, s, -1, hd).transpose(1, 2)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx, kwargs=kw)
    dropout = attn.attention_dropout if attn.training else 0.0
    out, _ = attend(attn, q, k, v, attention_mask, dropout=dropout, scaling=attn.scaling, **kw)
    h = hidden_states + attn.o_proj(out.reshape(b, s, -1).contiguous())
    gate, up = _gate_up(self.mlp, _rms(h, self.post_attention_layernorm))
    return h + self.mlp.down_proj(self.mlp.act_fn(gate) * up)


def _known_class(module: Any) -> bool:
    """A class defined by one of :data:`FAMILIES`' transformers modules, named ``<Family><Part>``."""
    cls = type(module)
    family = cls.__module__.removeprefix("transformers.models.").split(".")[0]
    if not cls.__module__.startswith("transformers.models.") or family not in FAMILIES:
        return False
    return any(cls.__name__.endswith(part) for part in _CLASSES)


def fits(model: Any, block: Any) -> bool:
    """Whether ``block`` has exactly the Llama-style structure :func:`lean_forward` computes.

    The block, its attention, MLP and norms are transformers' own classes of :data:`FAMILIES` (an
    allow-list: a short equality check cannot see code that depends on the position or the layer);
    the children are exactly those (attention, gated MLP, two RMSNorms with ``variance_epsilon``);
    SDPA attention, no gradient checkpointing, and a forward nobody replaced per instance
    (accelerate's ``device_map`` hooks do). Equality is then checked by :func:`install`.
    """
    if "forward" in block.__dict__ or hasattr(block, "_hf_hook"):  # accelerate's device_map hooks wrap
        return False  # the forward per instance (moving inputs between GPUs): keep theirs
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    if attn is None or mlp is None or {n for n, _ in block.named_children()} != _BLOCK_CHILDREN:
        return False
    for module in (block, attn, mlp, block.input_layernorm, block.post_attention_layernorm):
        if not _known_class(module):
            return False
    if not {n for n, _ in attn.named_children()} <= _ATTN_CHILDREN:
        return False
    if not {n for n, _ in mlp.named_children()} <= _MLP_CHILDREN:
        return False
    norms = (block.input_layernorm, block.post_attention_layernorm)
    if not all(type(n).__name__.endswith("RMSNorm") and hasattr(n, "variance_epsilon") for n in norms):
        return False
    config = getattr(model, "config", None)
    return (getattr(config, "_attn_implementation", None) == "sdpa" and hasattr(attn, "head_dim")
            and hasattr(attn, "scaling") and hasattr(attn, "layer_idx")
            and not getattr(block, "gradient_checkpointing", False))


@torch.inference_mode()
def _same(model: Any, block: Any, lean: Callable[..., torch.Tensor], original: Callable[..., torch.Tensor]) -> bool:
    """Bitwise-equal outputs and cache entries, lean vs ``original``, on a padded prefill of 5
    tokens (batch 2) and one decode step through a ``DynamicCache``."""
    from transformers import DynamicCache

    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None:
        return False
    p = block.input_layernorm.weight
    size = p.shape[-1]
    gen = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(2, 6, size, generator=gen).to(p.device, p.dtype)
    pos = torch.arange(6, device=p.device)[None].expand(2, 6)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool, device=p.device).tril()
    mask[1, :, :, 0] = False  # row 1: a left-padding column
    mask[1, :, 0, 0] = True  # (its own query keeps one key: no all-masked row)
    steps = [(h[:, :5], pos[:, :5], mask), (h[:, 5:], pos[:, 5:], None)]
    outs = []
    for fn in (original, lean):
        cache = DynamicCache()
        got = []
        for x, ids, m in steps:
            emb = rotary(x, ids)
            got.append(fn(x, attention_mask=m, position_ids=ids, cache=cache, use_cache=True,
                          position_embeddings=emb))
        layer = cache.layers[block.self_attn.layer_idx] if hasattr(cache, "layers") else None
        got += [layer.keys, layer.values] if layer is not None else []
        outs.append(got)
    return len(outs[0]) == len(outs[1]) == 4 and all(torch.equal(a, b) for a, b in zip(*outs))


def install(model: Any, blocks: torch.nn.ModuleList) -> int:
    """Give every block of ``model`` the lean forward, if all fit and each passes the equality check.

    Returns the number of blocks switched: ``len(blocks)`` or 0 (a model is switched whole or not
    at all). Call again after the blocks' weights change shape or kind (e.g. after quantising):
    the check is repeated. Never raises for an unknown architecture; it keeps transformers' forward.
    """
    uninstall(blocks)
    if not len(blocks) or not all(fits(model, b) for b in blocks):
        return 0
    kinds = [[(name, type(m)) for name, m in b.named_modules()] for b in blocks]
    if any(k != kinds[0] for k in kinds):  # one block unlike the others: not a plain stack
        return 0
    leans = [types.MethodType(lean_forward, b) for b in blocks]
    try:
        for b in blocks:
            object.__setattr__(b, _ORIGINAL, b.forward)
        # Every block has the same module types (above), so the first and the last stand for all:
        # two checks, not one per block (a 7B model on a CPU would read its weights 4x per block).
        ok = all(_same(model, blocks[i], leans[i], getattr(blocks[i], _ORIGINAL)) for i in {0, len(blocks) - 1})
    except Exception as exc:  # a transformers version this code does not know: keep its forward
        log.info("lean blocks not used: %s: %s", type(exc).__name__, exc)
        ok = False
    if not ok:
        uninstall(blocks)
        return 0
    for b, lean in zip(blocks, leans):
        b.forward = lean
    return len(blocks)


def uninstall(blocks: torch.nn.ModuleList) -> None:
    """Give the blocks back transformers' forward (no-op for blocks without the lean one)."""
    for b in blocks:
        if _ORIGINAL in b.__dict__:
            if "forward" in b.__dict__:
                del b.forward
            del b.__dict__[_ORIGINAL]


def installed(blocks: torch.nn.ModuleList) -> bool:
    """True when the blocks run :func:`lean_forward`."""
    return len(blocks) > 0 and all(_ORIGINAL in b.__dict__ and "forward" in b.__dict__ for b in blocks)
