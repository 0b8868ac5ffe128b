"""Opt-in int8 weight-only linears for fast CPU decoding (issue 11, item 3).

Decoding one token reads every weight once, so on a CPU its speed is set by bytes per token:
the embedded SmolLM2-135M in float32 reads ~540 MB per token (≈40 tok/s at ~22 GB/s here),
while llama.cpp reads its Q4_1 file (~0.6 byte per weight). :func:`quantize_int8` stores the
weights of every ``nn.Linear`` in the decoder blocks and of the LM head as int8 with one float
scale per output channel (symmetric, ``scale = max|w_row| / 127``: the per-channel weight-only
scheme of LLM.int8()/torchao's ``Int8WeightOnlyConfig`` without outlier handling), a quarter of
the bytes. The product runs in ATen's ``_weight_int8pack_mm`` kernel with bfloat16 activations
(the CPU kernel torchao itself lowers to; torchao's eager int8 path measured 25x slower on this
CPU, see docs/decisions.md). Everything else (embeddings, norms, attention, the residual
stream and the steering hooks) stays in the model's dtype, so steering is applied exactly as
in the unquantised model; only the linears' outputs change, by the rounding of the weights.

This is a lossy, opt-in speed mode (``--quantize int8``), like choosing a quantised GGUF in
llama.cpp; it is never chosen automatically.
"""

from __future__ import annotations

import torch

from .errors import SteerdeskError

QUANTIZATIONS = ("none", "int8")


class Int8Linear(torch.nn.Module):
    """``y = x W^T + b`` with ``W`` stored as int8 ``[out, in]`` and a scale per output channel.

    ``forward`` accepts ``x`` of shape ``[..., in]`` in any float dtype and returns ``[..., out]``
    in that dtype; the product itself is computed with bfloat16 activations.
    """

    weight_int8: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # [out]
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16),
                                      self.weight_int8, self.scale)
        y = y.to(x.dtype).reshape(*lead, self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


#: Sibling linears that transformers' attention and MLP modules call with the same input tensor
#: (``q = q_proj(h); k = k_proj(h); v = v_proj(h)``; ``down(act(gate(x)) * up(x))``). Llama, Mistral,
#: Qwen2/3, Gemma, OLMo, Granite, ... share these names; a family that calls them with different
#: inputs still gets right answers (see :class:`Int8Group`), only no saving.
FUSED_SIBLINGS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class Int8Group(torch.nn.Module):
    """One int8 product for sibling linears that read the same input (q/k/v, gate/up).

    Holds the members' int8 weights stacked ``[sum(out_i), in]`` with their per-channel scales
    (and biases, zeros for a member without one). The first member called with an input ``x``
    computes the whole product once and keeps it; the other members called with the *same tensor
    object*, unmodified since (``x._version``), take their column slice of it. Any other call
    (another input, a member called twice, an in-place change of ``x``) recomputes, so the result is
    always ``x W_i^T + b_i``: the product of each output column does not depend on which other
    columns are computed with it (``_weight_int8pack_mm`` gives bit-identical columns, tested), so
    a member's output equals its own :class:`Int8Linear` exactly. Saves per decode step, per group,
    ``len(members) - 1`` kernel calls and activation conversions (211 -> 121 calls per token on
    SmolLM2). The cache is cleared once every member has taken its slice.
    """

    weight_int8: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, members: list[Int8Linear]) -> None:
        super().__init__()
        self.in_features = members[0].in_features
        if any(m.in_features != self.in_features for m in members):
            raise ValueError("fused linears must share their input size")
        self.register_buffer("weight_int8", torch.cat([m.weight_int8 for m in members]))
        self.register_buffer("scale", torch.cat([m.scale for m in members]))
        if any(m.bias is not None for m in members):
            self.register_buffer("bias", torch.cat([
                m.bias if m.bias is not None else torch.zeros(m.out_features) for m in members]))
        else:
            self.bias = None
        edges = [0]
        for m in members:
            edges.append(edges[-1] + m.out_features)
        self.slices = [(edges[i], edges[i + 1]) for i in range(len(members))]
        self._x: torch.Tensor | None = None
        self._version = -1
        self._y: torch.Tensor | None = None
        self._pending: set[int] = set()

    def member_output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Member ``index``'s ``x W^T + b``: ``[..., in]`` -> ``[..., out_index]`` in ``x``'s dtype."""
        y = self._y
        version = -1 if x.is_inference() else x._version
        if y is None or self._x is not x or version != self._version or index not in self._pending:
            lead = x.shape[:-1]
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16),
                                          self.weight_int8, self.scale)
            y = y.to(x.dtype).reshape(*lead, -1)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
            self._x, self._version, self._y = x, version, y
            self._pending = set(range(len(self.slices)))
        self._pending.discard(index)
        if not self._pending:
            self._x = self._y = None
        a, b = self.slices[index]
        return y[..., a:b]


class Int8GroupMember(torch.nn.Module):
    """Stands where one of an :class:`Int8Group`'s linears stood; same input and output as it."""

    group: Int8Group

    def __init__(self, group: Int8Group, index: int, out_features: int) -> None:
        super().__init__()
        object.__setattr__(self, "group", group)  # not a submodule: the parent owns it once
        self.index = index
        self.in_features = group.in_features
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.member_output(self.index, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int8 weight-only, fused slice {self.index}")


def _fuse_siblings(block: torch.nn.Module) -> None:
    """Replace each complete :data:`FUSED_SIBLINGS` set of :class:`Int8Linear` under one parent."""
    for parent in list(block.modules()):
        for names in FUSED_SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            if not all(isinstance(m, Int8Linear) for m in members):
                continue
            linears = [m for m in members if isinstance(m, Int8Linear)]
            if len({m.in_features for m in linears}) != 1:
                continue
            group = Int8Group(linears)
            parent.add_module("int8_fused_" + "_".join(names), group)
            for i, (n, m) in enumerate(zip(names, linears)):
                setattr(parent, n, Int8GroupMember(group, i, m.out_features))


def quantize_int8(model: torch.nn.Module, blocks: torch.nn.ModuleList, *, fuse: bool = True) -> int:
    """Replace every ``nn.Linear`` inside ``blocks`` and the output embedding by :class:`Int8Linear`.

    ``fuse`` (default): sibling linears that read the same input (:data:`FUSED_SIBLINGS`) then share
    one :class:`Int8Group` product, bit-identical to their separate products.
    In place; returns the number of linears replaced. A tied LM head is untied first (the input
    embedding keeps its float weights). Raises ``SteerdeskError`` off the CPU (the kernel is a
    CPU speed mode; on a GPU load the model in bfloat16 instead) or when nothing was found.
    """
    param = next(model.parameters())
    if param.device.type != "cpu":
        raise SteerdeskError("int8 quantisation is a CPU decode mode; on a GPU load the model in bfloat16 instead.")
    count = 0
    for block in blocks:
        for name, child in list(block.named_modules()):
            if isinstance(child, torch.nn.Linear) and name:
                parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
                setattr(parent, name.rpartition(".")[2], Int8Linear(child))
                count += 1
        if fuse:
            _fuse_siblings(block)
    if count == 0:
        raise SteerdeskError("int8 quantisation found no nn.Linear in the decoder blocks "
                             "(Conv1D-based models such as GPT-2 are not supported).")
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if get_out is not None else None
    set_out = getattr(model, "set_output_embeddings", None)
    if isinstance(head, torch.nn.Linear) and set_out is not None:
        config = getattr(model, "config", None)
        if config is not None:
            config.tie_word_embeddings = False  # the input embedding keeps its float weights
        set_out(Int8Linear(head))
        count += 1
    return count
