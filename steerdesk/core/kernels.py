"""Faster linear layers on the CPU: oneDNN's matmul where it beats the default one.

``nn.Linear`` runs through ``aten::linear``, which on x86 CPU builds of torch calls MKL.
On the AMD EPYC machines steerdesk is developed on, MKL's single-row product (one per
weight matrix per decoded token) reads weights at 17 GB/s and does not use the second
core, while oneDNN -- also inside every x86 torch build, as ``torch.ops.mkldnn`` -- reads
them at 47 GB/s: token-by-token generation is 1.4x faster (docs/benchmarks.md). Only
products of at most ``MAX_ROWS`` rows (decoding) take that path: see there why.

Which kernel wins depends on the CPU, so :func:`linear_backend` measures both once per
process on a weight larger than the caches and picks oneDNN only when it is clearly faster
and gives the same numbers. ``STEERDESK_CPU_LINEAR=onednn|aten`` overrides the choice.

Only exact ``nn.Linear`` modules with CPU float32 weights (the probe measures float32) are switched, never ones
wrapped by accelerate (offloading) and never while autograd records: there the module's
own ``forward`` runs. The weights themselves are untouched (no copies, no repacking).
"""

from __future__ import annotations

import logging
import os
import time
import types
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
    if forced in ("onednn", "aten"):
        return forced
    if _choice is None:
        _choice = _probe()
    return _choice


# oneDNN keeps memory for every input shape it has seen (primitives, JIT code, scratch: about
# 2.4 MB per row count with SmolLM2's seven weight shapes, 830 MB after 350 prompt lengths).
# Decoding has at most a batch's worth of row counts, prompts and extraction batches have any
# number: those stay on aten, so memory stays bounded however long a session runs.
MAX_ROWS = 16


def _fast_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = self.weight
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    if rows > MAX_ROWS or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)) \
            or x.dtype != w.dtype or x.device != w.device:
        return torch.nn.Linear.forward(self, x)
    return _onednn_linear(x, w, self.bias)


def _eligible(module: torch.nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return (type(module) is torch.nn.Linear and w is not None and w.device.type == "cpu"
            and w.dtype == torch.float32 and not hasattr(module, "_hf_hook"))


def use_cpu_linear(model: torch.nn.Module, backend: str | None = None) -> str:
    """Route the model's CPU ``nn.Linear`` layers through ``backend`` (default: measured).

    Returns the backend in use (``""`` when the model has no eligible layer). Calling it
    again with ``"aten"`` restores the stock forward.
    """
    modules = [m for m in model.modules() if _eligible(m)]
    if not modules:
        return ""
    backend = backend or linear_backend()
    if backend not in ("onednn", "aten"):
        raise ValueError(f"unknown CPU linear backend {backend!r}")
    for m in modules:
        if backend == "onednn":
            m.forward = types.MethodType(_fast_forward, m)  # type: ignore[method-assign]
        elif "forward" in m.__dict__:
            del m.forward
    return backend
