"""Turning out-of-memory into a user error, after freeing what can be freed."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import SteerdeskError


def free_memory() -> None:
    """Collect garbage and return cached GPU blocks to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def oom_guard(what: str, hint: str) -> Iterator[None]:
    """Re-raise ``torch.OutOfMemoryError`` (and CPU allocation failures) as ``SteerdeskError``.

    The model is untouched (hooks are removed by their own ``finally`` blocks), so it stays usable.
    """
    try:
        yield
    except torch.OutOfMemoryError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "out of memory"
        free_memory()
        raise SteerdeskError(f"Out of memory while {what} ({first[:120]}); {hint}") from None
    except RuntimeError as exc:
        if "DefaultCPUAllocator" not in str(exc) and "not enough memory" not in str(exc):
            raise
        free_memory()
        raise SteerdeskError(f"Out of memory while {what}; {hint}") from None
