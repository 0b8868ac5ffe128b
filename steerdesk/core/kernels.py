"""Faster linear layers on the CPU: oneDNN's matmul where it beats the default one.

``nn.Linear`` runs through ``aten::linear``, which on x86 CPU builds of torch calls MKL.
On the AMD EPYC machines steerdesk is developed on, MKL's single-row product (one per
weight matrix per decoded token) reads weights at 17 GB/s and does not use the second
core, while oneDNN -- also inside every x86 torch build, as ``torch.ops.mkldnn`` -- reads
them at 47 GB/s: token-by-token generation is 1.6x faster, extraction 1.7x
(docs/benchmarks.md). Products of many rows go through it in fixed-size blocks: see
``MAX_ROWS`` below for why.

Which kernel wins depends on the CPU, so :func:`linear_backend` measures both once per
process on a weight larger than the caches and picks oneDNN only when it is clearly faster
and gives the same numbers. ``STEERDESK_CPU_LINEAR=onednn|aten`` overrides the choice.

Only exact ``nn.Linear`` modules with CPU float32 weights (the probe measures float32) are
switched (their class becomes :class:`OneDNNLinear`), never ones wrapped by accelerate
(offloading); under autograd or autocast, or once the weights move, the stock forward runs.
The weights themselves are untouched (no copies, no repacking).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

log = logging.getLogger(__name__)

ENV = "STEERDESK_CPU_LINEAR"
_choice: str | None = None


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")


def _best_of(fn: Any, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _probe() -> str:
    """Time both kernels on a 64 MiB weight, one row at a time (the decode case)."""
    if not torch.backends.mkldnn.is_available():
        return "aten"
    try:
        gen = torch.Generator().manual_seed(0)
        w, x, b = (torch.randn(256, 512, generator=gen), torch.randn(3, 512, generator=gen),
                   torch.randn(256, generator=gen))
        if not torch.allclose(_onednn_linear(x, w, b), torch.nn.functional.linear(x, w, b),
                              rtol=1e-4, atol=1e-4):
            log.warning("oneDNN linear disagrees with aten::linear here; keeping aten.")
            return "aten"
        big = torch.full((16384, 1024), 0.5)
        row = torch.full((1, 1024), 0.25)
        with torch.inference_mode():
            for fn in (lambda: torch.nn.functional.linear(row, big), lambda: _onednn_linear(row, big, None)):
                fn()  # first call: kernel selection, allocations
            aten = _best_of(lambda: torch.nn.functional.linear(row, big), 5)
            onednn = _best_of(lambda: _onednn_linear(row, big, None), 5)
    except (RuntimeError, AttributeError, NotImplementedError) as exc:  # op missing in this build
        log.info("oneDNN linear unavailable (%s); keeping aten.", exc)
        return "aten"
    choice = "onednn" if onednn < 0.8 * aten else "aten"
    log.info("CPU linear: aten %.2f ms, oneDNN %.2f ms per 64 MiB row product -> %s",
             aten * 1e3, onednn * 1e3, choice)
    return choice


def linear_backend() -> str:
    """``"onednn"`` or ``"aten"``: the CPU linear kernel this process uses (measured once)."""
    global _choice
    forced = os.environ.get(ENV, "").strip().lower()
    if forced == "aten" or (forced == "onednn" and torch.backends.mkldnn.is_available()):
        return forced
    if _choice is None:
        _choice = _probe()
    return _choice


# oneDNN keeps memory for every input shape it has seen (primitives, JIT code, scratch: about
# 2.4 MB per row count with SmolLM2's seven weight shapes; 830 MB after 350 prompt lengths).
# So it only ever sees a fixed set of row counts: up to MAX_ROWS as they come (decoding has at
# most a batch's worth), and larger products (prompts, extraction, sweeps) in blocks of CHUNK
# rows, the last block zero-padded to the next of SIZES (half-octave steps: at most 41 % padding
# on that block; small blocks were slower than aten, 1024-row blocks 1.7x faster). Rows are
# independent in a matrix product, so blocking changes no number beyond kernel rounding, and
# memory stays bounded however long a session runs (+100 MB over aten after 150 random shapes).
MAX_ROWS = 16
SIZES = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)  # half-octave steps
CHUNK = SIZES[-1]


def _blocked(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``linear(x, w, b)`` for any number of rows, through oneDNN in fixed-size row blocks."""
    flat = x.reshape(-1, x.shape[-1])
    parts = []
    for start in range(0, flat.shape[0], CHUNK):
        part = flat[start:start + CHUNK]
        n = part.shape[0]
        size = next((s for s in SIZES if s >= n), CHUNK) if n > MAX_ROWS else n
        if size != n:
            padded = flat.new_zeros((size, flat.shape[1]))
            padded[:n] = part
            part = padded
        parts.append(_onednn_linear(part, w, b)[:n])  # leading rows of a contiguous result: a view
    out = parts[0] if len(parts) == 1 else torch.cat(parts)  # one block (the common case): no copy
    return out.reshape(*x.shape[:-1], w.shape[0])


class OneDNNLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose small products (decoding) run on oneDNN.

    Swapped in by class (``module.__class__``), so weights, state dicts, pickling and copies
    are those of a plain ``nn.Linear``. Anything this kernel was not measured for -- weights no
    longer float32 on the CPU (``model.to("cuda")``, ``.half()``), autograd, autocast -- takes
    the stock forward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if (x.dim() == 0 or not x.shape[-1] or w.device.type != "cpu" or w.dtype is not torch.float32
                or x.dtype is not torch.float32 or x.device != w.device
                or torch.is_autocast_enabled("cpu")
                or (torch.is_grad_enabled()
                    and (w.requires_grad or x.requires_grad or (b is not None and b.requires_grad)))):
            return super().forward(x)
        if x.numel() // x.shape[-1] <= MAX_ROWS:
            return _onednn_linear(x, w, b)
        return _blocked(x, w, b)


def _eligible(module: torch.nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return (type(module) is torch.nn.Linear and type(w) is torch.nn.Parameter and w.device.type == "cpu"
            and w.dtype == torch.float32 and not hasattr(module, "_hf_hook"))


def use_cpu_linear(model: torch.nn.Module, backend: str | None = None) -> str:
    """Route the model's CPU ``nn.Linear`` layers through ``backend`` (default: measured).

    Returns the backend in use (``""`` when the model has no eligible layer). Calling it
    with ``"aten"`` restores every layer this module switched, wherever its weights are now.
    """
    if backend not in (None, "onednn", "aten"):
        raise ValueError(f"unknown CPU linear backend {backend!r}")
    if backend == "aten":
        restored = [m for m in model.modules() if type(m) is OneDNNLinear]
        for m in restored:
            m.__class__ = torch.nn.Linear
        return "aten" if restored or any(_eligible(m) for m in model.modules()) else ""
    modules = [m for m in model.modules() if _eligible(m)]
    switched = any(type(m) is OneDNNLinear for m in model.modules())
    if not modules and not switched:
        return ""
    backend = backend or linear_backend()
    if backend == "aten":
        return use_cpu_linear(model, "aten")
    for m in modules:
        m.__class__ = OneDNNLinear
    return "onednn"
