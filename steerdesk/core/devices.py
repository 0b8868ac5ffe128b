"""Device names: which this machine has, and a one-line refusal for one it lacks (``--device``)."""

from __future__ import annotations

import torch

from .errors import SteerdeskError


def available_devices() -> list[str]:
    """The devices this machine can run on: ``cpu``, ``cuda:N`` per GPU, ``mps`` where present."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def _plugin_available(kind: str) -> bool:
    """Whether transformers finds the out-of-tree torch backend ``kind`` (``npu``, ``hpu``, ...): its
    ``is_torch_<kind>_available`` imports the plugin, after which torch parses the device name."""
    import transformers.utils as hf_utils

    probe = getattr(hf_utils, f"is_torch_{kind}_available", None) if kind.isidentifier() else None
    try:
        return bool(probe()) if callable(probe) else False
    except Exception:  # a broken plugin install: not available
        return False


def check_device(device: str) -> str:
    """``device`` (e.g. ``cpu``, ``cuda``, ``cuda:1``, ``mps``) if this machine has it.

    Raises ``SteerdeskError`` for a name torch does not know and for a device this machine lacks
    (see ``models.pick_device``), naming the devices there are.
    """
    try:
        dev = torch.device(device.strip())
    except (RuntimeError, ValueError):
        if _plugin_available(device.strip().split(":")[0]):  # npu / hpu: torch knows them once imported
            return device.strip()
        raise SteerdeskError(f"Unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps "
                             f"(this machine has {', '.join(available_devices())}).") from None
    if dev.type == "cpu":
        return device.strip()
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count and (dev.index is None or dev.index < count):
            return device.strip()
        why = "no CUDA GPU (or a torch built without CUDA)" if not count else f"{count} CUDA GPU(s)"
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return device.strip()
        why = "no Apple GPU (mps)"
    else:
        module = getattr(torch, dev.type, None)
        available = getattr(module, "is_available", None)
        if (callable(available) and available()) or _plugin_available(dev.type):
            return device.strip()
        why = f"no {dev.type} device"
    raise SteerdeskError(f"Device {device!r} is not available: this machine has {why}; "
                         f"use one of {', '.join(available_devices())} (or auto).")
