"""Opt-in int8 / int4 weight-only linears for fast CPU decoding (issue 11, item 3).

Decoding one token reads every weight once, so on a CPU its speed is set by bytes per token:
the embedded SmolLM2-135M in float32 reads ~540 MB per token (≈40 tok/s at ~22 GB/s here),
while llama.cpp reads its Q4_1 file (~0.6 byte per weight). :func:`quantize_weights` stores the
weights of every ``nn.Linear`` in the decoder blocks either as int8 with one float scale per
output channel (``--quantize int8``; symmetric, ``scale = max|w_row| / 127``: the per-channel
weight-only scheme of LLM.int8()/torchao's ``Int8WeightOnlyConfig`` without outlier handling), a
quarter of the bytes, or as 4-bit codes in llama.cpp's Q4_1 blocks (``--quantize int4``; 32
weights share a scale and a minimum), an eighth; the LM head is int8 in both (the embedded GGUF
keeps its head in Q8_0 too). The products run in ATen's ``_weight_int8pack_mm`` /
``_weight_int4pack_mm_for_cpu`` kernels with bfloat16 activations (the CPU kernels torchao itself
lowers to; torchao's eager int8 path measured 25x slower on this CPU, see docs/decisions.md).
Sibling linears that read the same input share one product (:class:`FusedGroup`). Everything else
(embeddings, norms, attention, the residual stream and the steering hooks) stays in the model's
dtype, so steering is applied exactly as in the unquantised model; only the linears' outputs
change, by the rounding of the weights.

These are lossy, opt-in speed modes, like choosing a quantised GGUF in llama.cpp; never chosen
automatically.
"""

from __future__ import annotations

import torch

from .errors import SteerdeskError

QUANTIZATIONS = ("none", "int8", "int4")


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
#: inputs still gets right answers (see :class:`FusedGroup`), only no saving.
FUSED_SIBLINGS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

#: Group size of the int4 scheme: Q4_1's block of 32 weights with one scale and one minimum.
INT4_GROUP = 32


class Int4Linear(torch.nn.Module):
    """``y = x W^T + b`` with ``W`` stored as 4-bit codes, one scale and minimum per 32 weights.

    The scheme is llama.cpp's Q4_1 (ggml ``block_q4_1``: ``w = d * q + m``, ``q`` in 0..15, per
    block of 32 consecutive input weights of one output row), ``d = (max - min) / 15`` and
    ``m = min`` per block, stored in bfloat16 as ATen's packed int4 CPU kernel
    (``_weight_int4pack_mm_for_cpu``, the one torchao's ``Int4WeightOnlyConfig`` lowers to on a
    CPU) takes them: ``scales_and_zeros[k_block, n] = (d, m + 8 d)`` for codes centred on 8.
    Needs ``in_features % 32 == 0`` and ``out_features % 16 == 0`` (:func:`int4_fits`).
    ``forward`` accepts ``[..., in]`` in any float dtype and returns ``[..., out]`` in that dtype.
    """

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        if not int4_fits(linear):
            raise ValueError(f"int4 needs in % {INT4_GROUP} == 0 and out % 16 == 0, got {tuple(linear.weight.shape)}")
        w = linear.weight.detach().float()
        n, k = w.shape
        blocks = w.reshape(n, k // INT4_GROUP, INT4_GROUP)
        low = blocks.amin(-1, keepdim=True)
        step = ((blocks.amax(-1, keepdim=True) - low) / 15).clamp_min(1e-12)
        codes = torch.clamp(torch.round((blocks - low) / step), 0, 15).to(torch.int32).reshape(n, k)
        self.in_features, self.out_features = k, n
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        zeros = low + 8 * step
        self.register_buffer("scales_and_zeros", torch.stack([step.squeeze(-1).t(), zeros.squeeze(-1).t()], -1)
                             .contiguous().to(torch.bfloat16))
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).to(torch.bfloat16),
                                                       self.packed, INT4_GROUP, self.scales_and_zeros)
        y = y.to(x.dtype).reshape(*lead, self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 weight-only (Q4_1 blocks)"


def int4_fits(linear: torch.nn.Linear) -> bool:
    """Whether the packed int4 kernel takes ``linear``'s shape (``in % 32 == 0``, ``out % 16 == 0``)."""
    out_features, in_features = linear.weight.shape
    return in_features % INT4_GROUP == 0 and out_features % 16 == 0


def quantized_linear(linear: torch.nn.Linear, bits: int) -> torch.nn.Module:
    """``linear`` as :class:`Int4Linear` (``bits`` 4, when its shape fits) or :class:`Int8Linear`."""
    if bits == 4 and int4_fits(linear):
        return Int4Linear(linear)
    return Int8Linear(linear)


class FusedGroup(torch.nn.Module):
    """One quantised product for sibling linears that read the same input (q/k/v, gate/up).

    Holds the members' weights stacked ``[sum(out_i), in]`` as one quantised linear (and biases,
    zeros for a member without one). Both schemes quantise each output row on its own, so the
    stacked quantised weight is the members' quantised weights stacked. The first member called
    with an input ``x`` computes the whole product once and keeps it; the other members called
    with the *same tensor object*, unmodified since (``x._version``; inference tensors have no
    version counter, and transformers' attention and MLP modules never change their input in place
    between the sibling calls: tested equal to unfused on several families), take their column
    slice of it. Any other call (another input, a member called twice, an in-place change of ``x``)
    recomputes, so the result is always ``x W_i^T + b_i``: each output column of the int8 and int4
    kernels does not depend on which other columns are computed with it (bit-identical, tested), so
    a member's output equals its own quantised linear exactly. Saves per decode step, per group,
    ``len(members) - 1`` kernel calls and activation conversions (211 -> 121 calls per token on
    SmolLM2). The cache is cleared once every member has taken its slice.
    """

    def __init__(self, linears: list[torch.nn.Linear], bits: int) -> None:
        super().__init__()
        self.in_features = linears[0].in_features
        if any(m.in_features != self.in_features for m in linears):
            raise ValueError("fused linears must share their input size")
        stacked = torch.nn.Linear(self.in_features, sum(m.out_features for m in linears),
                                  bias=any(m.bias is not None for m in linears), device="meta")
        stacked.weight = torch.nn.Parameter(torch.cat([m.weight.detach() for m in linears]), requires_grad=False)
        if stacked.bias is not None:
            stacked.bias = torch.nn.Parameter(torch.cat([
                m.bias.detach() if m.bias is not None else torch.zeros(m.out_features, dtype=m.weight.dtype)
                for m in linears]), requires_grad=False)
        self.product = quantized_linear(stacked, bits)
        edges = [0]
        for m in linears:
            edges.append(edges[-1] + m.out_features)
        self.slices = [(edges[i], edges[i + 1]) for i in range(len(linears))]
        self._x: torch.Tensor | None = None
        self._version = -1
        self._y: torch.Tensor | None = None
        self._pending: set[int] = set()

    def member_output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Member ``index``'s ``x W^T + b``: ``[..., in]`` -> ``[..., out_index]`` in ``x``'s dtype."""
        y = self._y
        version = -1 if x.is_inference() else x._version
        if y is None or self._x is not x or version != self._version or index not in self._pending:
            y = self.product(x)
            self._x, self._version, self._y = x, version, y
            self._pending = set(range(len(self.slices)))
        self._pending.discard(index)
        if not self._pending:
            self._x = self._y = None
        a, b = self.slices[index]
        return y[..., a:b]


class FusedMember(torch.nn.Module):
    """Stands where one of a :class:`FusedGroup`'s linears stood; same input and output as it."""

    group: FusedGroup

    def __init__(self, group: FusedGroup, index: int, out_features: int) -> None:
        super().__init__()
        object.__setattr__(self, "group", group)  # not a submodule: the parent owns it once
        self.index = index
        self.in_features = group.in_features
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.member_output(self.index, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fused slice {self.index}"


def _fuse_siblings(block: torch.nn.Module, bits: int) -> int:
    """Replace each complete :data:`FUSED_SIBLINGS` set of ``nn.Linear`` under one parent by a
    :class:`FusedGroup`; returns the number of linears replaced."""
    count = 0
    for parent in list(block.modules()):
        for names in FUSED_SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            linears = [m for m in members if isinstance(m, torch.nn.Linear)]
            if len(linears) != len(names) or len({m.in_features for m in linears}) != 1:
                continue
            group = FusedGroup(linears, bits)
            parent.add_module("fused_" + "_".join(names), group)
            for i, (n, m) in enumerate(zip(names, linears)):
                setattr(parent, n, FusedMember(group, i, m.out_features))
            count += len(names)
    return count


def quantize_weights(model: torch.nn.Module, blocks: torch.nn.ModuleList, *, bits: int = 8,
                     fuse: bool = True) -> int:
    """Store every ``nn.Linear`` inside ``blocks`` as int8 (``bits`` 8) or int4 (``bits`` 4) weights,
    and the output embedding as int8 (as the embedded GGUF stores its head in Q8_0 under Q4_1 blocks).

    ``fuse`` (default): sibling linears that read the same input (:data:`FUSED_SIBLINGS`) share one
    :class:`FusedGroup` product, bit-identical to their separate products. A linear whose shape the
    int4 kernel does not take (:func:`int4_fits`) is stored as int8. In place; returns the number of
    linears replaced. A tied LM head is untied first (the input embedding keeps its float weights).
    Raises ``SteerdeskError`` off the CPU (the kernels are a CPU speed mode; on a GPU load the model
    in bfloat16 instead) or when nothing was found; ``ValueError`` for ``bits`` other than 4 or 8.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    param = next(model.parameters())
    if param.device.type != "cpu":
        raise SteerdeskError("int8/int4 quantisation is a CPU decode mode; "
                             "on a GPU load the model in bfloat16 instead.")
    count = 0
    for block in blocks:
        if fuse:
            count += _fuse_siblings(block, bits)
        for name, child in list(block.named_modules()):
            if isinstance(child, torch.nn.Linear) and name:
                parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
                setattr(parent, name.rpartition(".")[2], quantized_linear(child, bits))
                count += 1
    if count == 0:
        raise SteerdeskError(f"int{bits} quantisation found no nn.Linear in the decoder blocks "
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


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether :func:`quantize_weights` replaced linears of ``model`` (no gradient flows through them)."""
    return any(isinstance(m, Int8Linear | Int4Linear | FusedGroup) for m in model.modules())


def quantize_int8(model: torch.nn.Module, blocks: torch.nn.ModuleList, *, fuse: bool = True) -> int:
    """:func:`quantize_weights` with int8 blocks (``--quantize int8``)."""
    return quantize_weights(model, blocks, bits=8, fuse=fuse)
