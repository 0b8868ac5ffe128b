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


@dataclass(frozen=True)
class StoppedRun:
    """A run the user stopped before it returned a result (compute, sweep, diagnose, versus, grid,
    bake, search): listed in the history, marked stopped, with nothing to export or re-run
    (a stopped generation returns what it streamed and is recorded as a ``RunRecord``)."""

    kind: str
    created: str  # UTC, ISO 8601 to the second, as a RunRecord's
    seconds: float  # wall time until the stop

    @property
    def title(self) -> str:
        """A one-line summary for the history list."""
        return f"{self.kind} (stopped after {self.seconds:.1f} s)"

    def to_json(self) -> str:
        """What the history's details pane shows."""
        import json

        return json.dumps({"kind": self.kind, "stopped": True, "created": self.created,
                           "seconds": round(self.seconds, 3),
                           "note": "stopped before it returned a result: nothing to export or re-run"}, indent=1)
