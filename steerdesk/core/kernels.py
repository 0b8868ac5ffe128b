"""Faster linear layers on the CPU: oneDNN's matmul where it beats the default one.

``nn.Linear`` runs through ``aten::linear``, which on x86 CPU builds of torch calls MKL.
On the AMD EPYC machines steerdesk is developed on, MKL's single-row product (one per
weight matrix per decoded token) reads weights at 17 GB/s and does not use the second
core, while oneDNN -- also inside every x86 torch build, as ``torch.ops.mkldnn`` -- reads
them at 47 GB/s: token-by-token generation is 1.6x faster, extraction 1.7x
(docs/benchmarks.md). On a 2-core Intel Xeon it was the other way round (oneDNN decoded at
half MKL's speed). Products of many rows go through it in fixed-size blocks: see
``MAX_ROWS`` below for why.

Which kernel wins depends on the CPU, so :func:`linear_choice` decides once per machine and
keeps the decision: it times both kernels, interleaved, on decode-shaped products (one row
times weights larger than the caches), decides with :func:`decide` (aten, the stock kernel,
unless oneDNN wins clearly and consistently), and stores the result in the user cache folder
(``cpu-linear.json``) keyed by CPU model, torch version and thread count, so the same machine
makes the same choice in every later process. ``STEERDESK_CPU_LINEAR=aten|onednn`` forces a
kernel, ``=probe`` measures again and replaces the stored decision;
``STEERDESK_CPU_LINEAR_CACHE`` names another decision file (tests use a temporary one).

Only exact ``nn.Linear`` modules with CPU float32 weights (the probe measures float32) are
switched (their class becomes :class:`OneDNNLinear`), never ones wrapped by accelerate
(offloading); under autograd or autocast, or once the weights move, the stock forward runs.
The weights themselves are untouched (no copies, no repacking).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

ENV = "STEERDESK_CPU_LINEAR"
CACHE_ENV = "STEERDESK_CPU_LINEAR_CACHE"
CACHE_FILE = "cpu-linear.json"

# Decision rule (see decide()): oneDNN only when the median per-pair speedup is at least
# MARGIN *and* oneDNN is faster by at least CONSISTENT in at least SHARE of the pairs (with 12
# pairs: all but two), over at least MIN_PAIRS interleaved pairs. Anything less clear keeps aten.
MARGIN = 1.25
CONSISTENT = 1.10
SHARE = 5 / 6
MIN_PAIRS = 6
PAIRS = 12  # interleaved (aten, oneDNN) pairs timed by the probe
# A decision measured while other processes used more than this share of the CPUs is used by
# this process but not stored: under load oneDNN's two OpenMP threads wait on each other
# (measured here: 10-50x slower products at load average 4 on 2 cores, while MKL's one thread
# was not), so such a probe says nothing about the quiet machine the choice is kept for.
BUSY = 0.25
# Decode-shaped probe: one row times three weights of a 2048-wide transformer block
# (attention output, MLP up and down: 16 + 64 + 64 MiB float32, far larger than the caches).
PROBE_SHAPES = ((2048, 2048), (8192, 2048), (2048, 8192))


@dataclass(frozen=True)
class KernelChoice:
    """The CPU linear kernel of this process and why.

    ``backend``: ``"onednn"`` or ``"aten"``. ``how``: ``"forced"`` (``STEERDESK_CPU_LINEAR``),
    ``"cached"`` (decision stored for this machine), ``"probed"`` (measured by this process and
    stored), ``"probed-busy"`` (measured while other processes loaded the CPUs: used by this
    process only, not stored) or ``"unavailable"`` (no working oneDNN in this torch). ``ratio``: the measured median
    speedup of oneDNN over aten on the probe (aten time / oneDNN time; > 1 means oneDNN is
    faster), ``None`` when nothing was measured. ``detail``: one line of human-readable reason.
    """

    backend: str
    how: str
    ratio: float | None = None
    detail: str = ""

    def describe(self) -> str:
        """One line for ``steerdesk info``: kernel, how it was chosen and the measured ratio."""
        ratio = f", oneDNN/aten speed {self.ratio:.2f}x" if self.ratio is not None else ""
        head = f"{self.backend} ({self.how}{ratio})"
        return f"{head}: {self.detail}" if self.detail else head


def decide(aten: Sequence[float], onednn: Sequence[float], *, margin: float = MARGIN,
           consistent: float = CONSISTENT, share: float = SHARE,
           min_pairs: int = MIN_PAIRS) -> tuple[str, float | None, str]:
    """Pick the kernel from interleaved timings; pure (no clock, no I/O).

    ``aten[i]`` and ``onednn[i]`` (seconds, > 0) are the times of the same product measured one
    right after the other (pair ``i``), so a burst of load on the machine hits both members of a
    pair. The speedup of pair ``i`` is ``aten[i] / onednn[i]``. oneDNN is chosen only when the
    median speedup is ``>= margin`` and at least ``share`` of the pairs have a speedup
    ``>= consistent``; otherwise aten, the stock kernel -- ties, noise and too few pairs all keep
    it. One outlier pair (in either direction) moves neither statistic much.

    Returns ``(backend, median speedup or None, reason)``. Raises ``ValueError`` when the two
    sequences differ in length or hold a time that is not > 0.
    """
    if len(aten) != len(onednn):
        raise ValueError(f"{len(aten)} aten times but {len(onednn)} oneDNN times")
    if any(not t > 0 for t in (*aten, *onednn)):
        raise ValueError("times must be > 0 seconds")
    if len(aten) < min_pairs:
        return "aten", None, f"only {len(aten)} timing pairs (need {min_pairs}): stock kernel kept"
    ratios = sorted(a / o for a, o in zip(aten, onednn))
    median = statistics.median(ratios)
    clear = sum(r >= consistent for r in ratios)
    stats = (f"median of {len(ratios)} interleaved pairs; oneDNN >= {consistent:.2f}x faster in "
             f"{clear} of {len(ratios)}")
    if median >= margin and clear >= share * len(ratios):
        return "onednn", median, f"oneDNN {median:.2f}x faster ({stats})"
    if median <= 1 / margin:
        return "aten", median, f"aten {1 / median:.2f}x faster ({stats})"
    return "aten", median, f"no clear winner, stock kernel kept (oneDNN {median:.2f}x; {stats})"


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux; ``platform`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_key() -> str:
    """Key of the stored decision: CPU model, torch version and torch's intra-op thread count."""
    return f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def decision_file() -> Path:
    """Where decisions are stored: ``$STEERDESK_CPU_LINEAR_CACHE`` or ``<cache>/cpu-linear.json``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env)
    from .models import cache_dir

    return cache_dir() / CACHE_FILE


def _read_decisions(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("Ignoring unreadable CPU kernel decisions in %s (%s).", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def load_decision(path: Path, key: str) -> KernelChoice | None:
    """The stored choice for ``key`` in ``path`` (``how="cached"``), or None if absent or invalid."""
    entry = _read_decisions(path).get(key)
    if not isinstance(entry, dict) or entry.get("backend") not in ("aten", "onednn"):
        return None
    ratio = entry.get("ratio")
    return KernelChoice(entry["backend"], "cached", float(ratio) if isinstance(ratio, (int, float)) else None,
                        str(entry.get("detail", "")))


def store_decision(path: Path, key: str, choice: KernelChoice) -> None:
    """Add or replace ``key``'s decision in ``path`` (atomic write). Failures are logged, not raised."""
    from .errors import SteerdeskError
    from .fileio import atomic_write_text

    data = _read_decisions(path)
    entry = asdict(choice)
    entry.pop("how")
    entry["measured"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    data[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    except (OSError, SteerdeskError) as exc:
        log.warning("Could not store the CPU kernel decision in %s (%s); it will be measured again.", path, exc)


def _cpu_jiffies() -> tuple[float, float] | None:
    """(busy seconds of all CPUs from /proc/stat, this process's CPU seconds), or None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields]
    busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)  # minus idle and iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def foreign_load(before: tuple[float, float] | None, after: tuple[float, float] | None, seconds: float) -> float:
    """Share of all CPUs used by other processes between two :func:`_cpu_jiffies` samples (0..1)."""
    if before is None or after is None or seconds <= 0:
        return 0.0
    other = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, min(1.0, other / (seconds * (os.cpu_count() or 1))))


def _interleaved(fns: Sequence[Callable[[], Any]], pairs: int) -> list[list[float]]:
    """Time each of ``fns`` once per round, alternating which goes first; ``pairs`` rounds."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(pairs):
        order = range(len(fns)) if i % 2 == 0 else reversed(range(len(fns)))
        for k in order:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return times


def probe(weights: Sequence[torch.Tensor] | None = None, pairs: int = PAIRS,
          budget_s: float = 3.0) -> KernelChoice:
    """Measure both kernels on this machine and decide with :func:`decide`.

    Each timing is one decode step's worth of products: one row times each of ``weights``
    (``[out, in]`` float32; :func:`use_cpu_linear` passes the model's own linear weights, so the
    step is exactly the model's decode step), or of random weights of ``PROBE_SHAPES`` (144 MiB).
    ``pairs`` interleaved pairs are timed, fewer (but at least ``MIN_PAIRS``) once ``budget_s``
    seconds have gone. Returns ``how="probed"``, or ``how="unavailable"`` (aten) when this torch
    has no oneDNN linear or it disagrees with aten's numbers.
    """
    if not torch.backends.mkldnn.is_available():
        return KernelChoice("aten", "unavailable", None, "this torch build has no oneDNN")
    try:
        gen = torch.Generator().manual_seed(0)
        w, x, b = (torch.randn(256, 512, generator=gen), torch.randn(3, 512, generator=gen),
                   torch.randn(256, generator=gen))
        if not torch.allclose(_onednn_linear(x, w, b), torch.nn.functional.linear(x, w, b),
                              rtol=1e-4, atol=1e-4):
            return KernelChoice("aten", "unavailable", None, "oneDNN linear disagrees with aten::linear here")
        # Random values, as in a model: oneDNN ran 10-200x slower on constant (torch.full)
        # weights here, a trap the first version of this probe fell into.
        if not weights:
            weights = [torch.randn(shape, generator=gen) for shape in PROBE_SHAPES]
        rows = [torch.randn((1, m.shape[1]), generator=gen) for m in weights]

        def step_aten() -> None:
            for r, m in zip(rows, weights):
                torch.nn.functional.linear(r, m)

        def step_onednn() -> None:
            for r, m in zip(rows, weights):
                _onednn_linear(r, m, None)

        with torch.inference_mode():
            _interleaved([step_aten, step_onednn], 2)  # warm-up: kernel selection, allocations, JIT
            aten: list[float] = []
            onednn: list[float] = []
            start = time.perf_counter()
            sample = _cpu_jiffies()
            while len(aten) < pairs and (len(aten) < MIN_PAIRS or time.perf_counter() - start < budget_s):
                a, o = _interleaved([step_aten, step_onednn] if len(aten) % 2 == 0 else [step_onednn, step_aten], 1)
                if len(aten) % 2:
                    a, o = o, a
                aten += a
                onednn += o
            busy = foreign_load(sample, _cpu_jiffies(), time.perf_counter() - start)
    except (RuntimeError, AttributeError, NotImplementedError) as exc:  # op missing in this build
        return KernelChoice("aten", "unavailable", None, f"oneDNN linear unavailable ({exc})")
    backend, ratio, reason = decide(aten, onednn)
    if busy > BUSY:
        return KernelChoice(backend, "probed-busy", ratio,
                            f"{reason}; other processes used {busy:.0%} of the CPUs: not stored, "
                            "measured again next time")
    log.info("CPU linear: aten %.2f ms, oneDNN %.2f ms per probe step (medians) -> %s",
             statistics.median(aten) * 1e3, statistics.median(onednn) * 1e3, backend)
    return KernelChoice(backend, "probed", ratio, reason)


_choice: KernelChoice | None = None


def linear_choice(weights: Sequence[torch.Tensor] | None = None) -> KernelChoice:
    """The CPU linear kernel this process uses, and why (decided once per process).

    Order: ``STEERDESK_CPU_LINEAR=aten|onednn`` (forced; ``onednn`` only where torch has it),
    then the decision stored for :func:`machine_key` in :func:`decision_file`, else a
    :func:`probe` (on ``weights`` when given) whose result is stored.
    ``STEERDESK_CPU_LINEAR=probe`` skips the stored one.
    """
    global _choice
    forced = os.environ.get(ENV, "").strip().lower()
    if forced == "aten" or (forced == "onednn" and torch.backends.mkldnn.is_available()):
        return KernelChoice(forced, "forced", None, f"{ENV}={forced}")
    if _choice is None:
        path, key = decision_file(), machine_key()
        cached = None if forced == "probe" else load_decision(path, key)
        if cached is not None:
            _choice = cached
        else:
            _choice = probe(weights)
            if _choice.how == "probed":
                store_decision(path, key, _choice)
    return _choice


def current_choice() -> KernelChoice | None:
    """The choice already made in this process (forced ones included), or None if none yet."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced == "aten" or (forced == "onednn" and torch.backends.mkldnn.is_available()):
        return KernelChoice(forced, "forced", None, f"{ENV}={forced}")
    return _choice


def linear_backend() -> str:
    """``"onednn"`` or ``"aten"``: the CPU linear kernel this process uses (see :func:`linear_choice`)."""
    return linear_choice().backend


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
        """``x @ W.T + b`` through oneDNN (same result as ``nn.Linear``)."""
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


def _probe_slice(weights: Sequence[torch.Tensor], max_bytes: int = 128 << 20) -> list[torch.Tensor]:
    """The model's first weights up to ``max_bytes`` (at least one): a decode step's products in
    the model's own shapes, with a bounded probe time whatever the model's size."""
    out: list[torch.Tensor] = []
    total = 0
    for w in weights:
        if out and total + w.numel() * w.element_size() > max_bytes:
            break
        out.append(w)
        total += w.numel() * w.element_size()
    return out


def use_cpu_linear(model: torch.nn.Module, backend: str | None = None) -> str:
    """Route the model's CPU ``nn.Linear`` layers through ``backend`` (default: measured).

    Returns the backend in use (``""`` when the model has no eligible layer). Calling it
    with ``"aten"`` restores every layer this module switched, wherever its weights are now.
    """
    if backend not in (None, "onednn", "aten"):
        raise ValueError(f"unknown CPU linear backend {backend!r}")
    if backend == "aten":
        restored: list[torch.nn.Module] = [m for m in model.modules() if type(m) is OneDNNLinear]
        for m in restored:
            m.__class__ = torch.nn.Linear
        return "aten" if restored or any(_eligible(m) for m in model.modules()) else ""
    modules = [m for m in model.modules() if _eligible(m)]
    switched = any(type(m) is OneDNNLinear for m in model.modules())
    if not modules and not switched:
        return ""
    weights = [m.weight.detach() for m in modules if isinstance(m.weight, torch.Tensor)]
    backend = backend or linear_choice(_probe_slice(weights)).backend
    if backend == "aten":
        return use_cpu_linear(model, "aten")
    for m in modules:
        m.__class__ = OneDNNLinear
    return "onednn"
