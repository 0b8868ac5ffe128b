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


def quantize_int8(model: torch.nn.Module, blocks: torch.nn.ModuleList) -> int:
    """Replace every ``nn.Linear`` inside ``blocks`` and the output embedding by :class:`Int8Linear`.

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
