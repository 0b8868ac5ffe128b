"""Immutable job descriptions the GUI hands to the model worker (plain data, no Qt)."""

from __future__ import annotations

import threading
import traceback
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LoadRequest:
    """Load a model (``spec``: default, hub id, folder or .gguf)."""

    id: int
    spec: str
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    cancel: threading.Event = field(default_factory=threading.Event, compare=False)
    kind: str = "load"


@dataclass(frozen=True)
class ComputeRequest:
    """Compute a vector set from a dataset."""

    id: int
    dataset: Any
    method: str = "mean-diff"
    read: str = "last"
    batch_size: int = 8
    name: str = "vectors"
    cancel: threading.Event = field(default_factory=threading.Event, compare=False)
    kind: str = "compute"


@dataclass(frozen=True)
class GenerateRequest:
    """Generate for ``prompts`` with per-row steering (a list of ``Steer`` per row)."""

    id: int
    prompts: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    sampling: Any
    system: str | None = None
    watch: Any = None  # [num_layers, hidden] directions whose projections are reported per token
    vectors: Any = None  # the VectorSet used, checked against the model before running
    cancel: threading.Event = field(default_factory=threading.Event, compare=False)
    kind: str = "generate"


@dataclass(frozen=True)
class TaskRequest:
    """Any other model job: ``fn(lm, cancel, emit) -> result`` runs in the worker thread.

    ``emit(payload)`` streams partial results (e.g. sweep cells) back to the GUI thread.
    Tasks with the same ``name`` supersede each other; different names do not.
    """

    id: int
    name: str
    fn: Any
    title: str = "Task failed"
    cancel: threading.Event = field(default_factory=threading.Event, compare=False)

    @property
    def kind(self) -> str:
        return f"task:{self.name}"


@dataclass(frozen=True)
class ErrorInfo:
    """A failure reported to the GUI: a sentence for the dialog, details for the expander."""

    title: str
    message: str
    details: str = ""
    user_error: bool = True

    @classmethod
    def from_exception(cls, exc: BaseException, title: str) -> "ErrorInfo":
        from ..core.errors import SteerdeskError

        details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        if isinstance(exc, SteerdeskError):
            return cls(title, str(exc), details, True)
        return cls(title, f"Unexpected error (a bug in steerdesk): {type(exc).__name__}: {exc}", details, False)
