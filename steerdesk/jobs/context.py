"""The one context every job runs in: cancel, progress, partial results, streamed text.

Each surface (window worker, CLI, recipe re-run, self-test) makes a :class:`JobContext` with
the callbacks it needs; a job calls ``ctx.progress`` / ``ctx.partial`` / ``ctx.text`` /
``ctx.step`` and checks ``ctx.cancel``. The same names for every job.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import Cancelled

ProgressFn = Callable[[int, int, str], None]
"""``(done, total, message)``; ``total`` 0 means "unknown" (a busy indicator)."""
PartialFn = Callable[[Any], None]
"""A partial result: a sweep cell, a grid row, a search trial..."""
TextFn = Callable[[int, str], None]
"""A chunk of generated text for batch row ``row``."""
StepFn = Callable[[int, list[int], Any], None]
"""One generation step: ``(step, token ids per row, projections [rows, layers] or None)``."""


@dataclass
class JobContext:
    """Cancel flag and callbacks of one job run. All callbacks are optional."""

    cancel: threading.Event = field(default_factory=threading.Event)
    on_progress: ProgressFn | None = None
    on_partial: PartialFn | None = None
    on_text: TextFn | None = None
    on_step: StepFn | None = None

    def progress(self, done: int, total: int, message: str = "") -> None:
        """Report ``done`` of ``total`` units with a message."""
        if self.on_progress is not None:
            self.on_progress(done, total, message)

    def partial(self, item: Any) -> None:
        """Hand a partial result to the surface (e.g. to fill a heatmap live)."""
        if self.on_partial is not None:
            self.on_partial(item)

    def check(self) -> None:
        """Raise :class:`~steerdesk.core.errors.Cancelled` if the job was asked to stop."""
        if self.cancel.is_set():
            raise Cancelled("Stopped.")

    def progress_counter(self, message: str) -> Callable[[int, int], None]:
        """A ``(done, total)`` callback for core functions, reporting with ``message``."""
        return lambda done, total: self.progress(done, total, message)
