"""What the GUI hands to the model worker (a job Spec with an id and a stop Event) and gets back on failure."""

from __future__ import annotations

import threading
import traceback
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class JobRequest:
    """One submitted job: ``spec`` is any Spec in :data:`steerdesk.jobs.JOBS`.

    ``kind`` is the job's name (``load``, ``generate``, ``sweep`` ...): a newer request of the
    same kind supersedes an older one; different kinds run one after the other.
    """

    id: int
    spec: Any
    kind: str
    title: str = "Job failed"
    cancel: threading.Event = field(default_factory=threading.Event, compare=False)


@dataclass(frozen=True)
class ErrorInfo:
    """A failure reported to the GUI: a sentence for the dialog, details for the expander."""

    title: str
    message: str
    details: str = ""
    user_error: bool = True

    @classmethod
    def from_exception(cls, exc: BaseException, title: str) -> ErrorInfo:
        """A user error (``SteerdeskError``) as its sentence; anything else as a bug with its traceback."""
        from ..core.errors import SteerdeskError

        details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        if isinstance(exc, SteerdeskError):
            return cls(title, str(exc), details, True)
        return cls(title, f"Unexpected error (a bug in steerdesk): {type(exc).__name__}: {exc}", details, False)
