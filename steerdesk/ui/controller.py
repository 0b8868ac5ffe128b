"""GUI-thread facade over the model worker: job Specs in, per-job handles out.

Kept from before the jobs layer (``docs/decisions.md``): request ids, one stop ``Event`` per
request set directly from the GUI thread, stale results dropped (a newer job of the same kind,
or any new model load, supersedes a running one), and streamed text / steps coalesced to ~30
updates a second.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

from PySide6.QtCore import QObject, QThread, QTimer, Signal, Slot

from .requests import ErrorInfo, JobRequest
from .worker import ModelWorker

log = logging.getLogger(__name__)

FLUSH_MS = 33  # token updates are coalesced to ~30 repaints a second


class JobHandle(QObject):
    """The GUI-side view of one submitted job; only results still wanted are emitted.

    Exactly one of ``finished`` / ``cancelled`` / ``failed`` ends a job the user still wants;
    a superseded job ends silently.
    """

    progress = Signal(int, int, str)
    """``(done, total, message)``; ``total`` 0 means unknown."""
    partial = Signal(object)
    """A partial result (sweep cell, grid row)."""
    text = Signal(int, str)
    """Coalesced streamed text for batch row ``row``."""
    steps = Signal(object)
    """Coalesced generation steps: list of dicts (``step``, ``ids``, ``texts``, ``proj``)."""
    finished = Signal(object)
    """The job's result."""
    failed = Signal(object)
    """The job failed: an ``ErrorInfo``."""
    cancelled = Signal()
    """The job stopped on request."""
    ended = Signal()
    """The job is over, whatever the outcome (also when superseded): the last signal of a handle."""

    def __init__(self, request: JobRequest, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.request = request
        self.loads_model = False  # a load: its result is the new model's ModelInfo

    @property
    def id(self) -> int:
        """The request id."""
        return self.request.id

    @property
    def kind(self) -> str:
        """The job's name (``generate``, ``sweep`` ...)."""
        return self.request.kind

    @property
    def spec(self) -> Any:
        """The Spec submitted."""
        return self.request.spec


class ModelController(QObject):
    """What panels submit Specs to. All signals arrive on the GUI thread; stale results never do."""

    submit_request = Signal(object)
    """Internal: hands a request to the worker thread (queued)."""
    model_loading = Signal(str)
    """A model load started (its spec)."""
    model_ready = Signal(object)
    """The current model is loaded: its ``ModelInfo``."""
    progress = Signal(str, int, int, str)
    """Progress of the current job of ``kind``: done, total, message."""
    partial = Signal(str, object)
    """A partial result of the current job of ``kind``."""
    text_generated = Signal(int, str)
    """Coalesced streamed text for batch row ``row``."""
    tokens_generated = Signal(object)
    """Coalesced generation steps: list of dicts (``step``, ``ids``, ``texts``, ``proj``)."""
    finished = Signal(str, object)
    """The current job of ``kind`` finished with a result (a load: the ``ModelInfo``)."""
    record_ready = Signal(object)
    """A ``RunRecord`` of a finished or stopped run."""
    job_cancelled = Signal(str)
    """The current job of ``kind`` stopped on request."""
    failed = Signal(object)
    """The current job failed: an ``ErrorInfo``."""
    busy_changed = Signal(bool)
    """True while a job runs."""
    model_kept = Signal(object)
    """A model load failed and the model loaded before it is still there and working: its ``ModelInfo``."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._ids = itertools.count(1)
        self._current: dict[str, JobHandle] = {}  # kind -> the job whose results are wanted
        self._running: dict[int, JobHandle] = {}  # id -> submitted and not yet ended
        self._text: dict[int, dict[int, str]] = {}  # id -> row -> text not yet shown
        self._steps: dict[int, list[dict]] = {}
        self.model_info: Any = None
        self._kept_info: Any = None  # the model the worker still holds while another one loads
        self._thread = QThread()
        self._thread.setObjectName("steerdesk-model")
        self._worker = ModelWorker()
        self._worker.moveToThread(self._thread)
        self.submit_request.connect(self._worker.run)
        w = self._worker
        w.progress.connect(self._on_progress)
        w.partial.connect(self._on_partial)
        w.text.connect(self._on_text)
        w.step.connect(self._on_step)
        w.finished.connect(self._on_finished)
        w.cancelled.connect(self._on_cancelled)
        w.failed.connect(self._on_failed)
        w.record_ready.connect(self.record_ready)
        self._thread.finished.connect(self._worker.deleteLater)
        self._flush_timer = QTimer(self)
        self._flush_timer.setInterval(FLUSH_MS)
        self._flush_timer.timeout.connect(self._flush)
        self._thread.start()

    # -- submitting ----------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """True while any submitted job has not ended."""
        return bool(self._running)

    def submit(self, spec: Any) -> JobHandle:
        """Run ``spec`` (any job Spec) in the worker; connect to the returned handle for its results.

        A running job of the same kind is stopped and its results dropped; a model load stops
        every running job (their results would belong to the old model).
        """
        from .. import jobs

        module = jobs.job_for(spec)
        request = JobRequest(id=next(self._ids), spec=spec, kind=module.NAME,
                             title=getattr(module, "TITLE", "Job failed"))
        handle = JobHandle(request, self)
        handle.loads_model = isinstance(spec, jobs.LoadSpec)
        old = self._current.get(request.kind)
        if old is not None and old.id in self._running:
            old.request.cancel.set()  # superseded: stop it, its results will be dropped
        if isinstance(spec, jobs.LoadSpec):
            for other in self._running.values():
                other.request.cancel.set()
            self._current.clear()
            if self.model_info is not None:
                self._kept_info = self.model_info  # the worker keeps that model until the new one loads
            self.model_info = None
            self.model_loading.emit(spec.spec)
        was_busy = self.busy
        self._current[request.kind] = handle
        self._running[request.id] = handle
        self.submit_request.emit(request)
        if not was_busy:
            self.busy_changed.emit(True)
        return handle

    def load_model(self, spec: str, **kwargs: Any) -> JobHandle:
        """Load ``spec`` (a :class:`~steerdesk.jobs.LoadSpec`); stops running work and frees the old model."""
        from ..jobs import LoadSpec

        return self.submit(LoadSpec(spec=spec, **kwargs))

    def stop(self, kind: str | None = None) -> None:
        """Stop the current job (of ``kind``, or all) now: sets its Event directly; nothing streamed is shown after."""
        for k, handle in list(self._current.items()):
            if kind is None or k == kind:
                handle.request.cancel.set()
                self._text.pop(handle.id, None)
                self._steps.pop(handle.id, None)

    def is_current(self, handle_or_id: JobHandle | int) -> bool:
        """True while the job's results are still wanted (not superseded, not stopped)."""
        handle = self._running.get(handle_or_id) if isinstance(handle_or_id, int) else handle_or_id
        return (handle is not None and self._current.get(handle.kind) is handle
                and not handle.request.cancel.is_set())

    def current(self, kind: str) -> JobHandle | None:
        """The job of ``kind`` whose results are wanted (running or last submitted)."""
        return self._current.get(kind)

    # -- worker signals (GUI thread) ---------------------------------------------------
    def _end(self, req_id: int) -> tuple[JobHandle | None, bool]:
        """Forget a job that ended; (its handle, whether its outcome is still wanted)."""
        handle = self._running.get(req_id)
        wanted = handle is not None and self._current.get(handle.kind) is handle
        if wanted and not handle.request.cancel.is_set():
            self._flush()  # the last chunks go before the result
        self._running.pop(req_id, None)
        self._text.pop(req_id, None)
        self._steps.pop(req_id, None)
        if not self._text and not self._steps and not self._running:
            self._flush_timer.stop()
        if not self._running:
            self.busy_changed.emit(False)
        return handle, wanted

    @staticmethod
    def _close(handle: JobHandle | None) -> None:
        if handle is not None:
            handle.ended.emit()
            handle.deleteLater()

    @Slot(int, int, int, str)
    def _on_progress(self, req_id: int, done: int, total: int, message: str) -> None:
        if self.is_current(req_id):
            handle = self._running[req_id]
            handle.progress.emit(done, total, message)
            self.progress.emit(handle.kind, done, total, message)

    @Slot(int, object)
    def _on_partial(self, req_id: int, item: Any) -> None:
        if self.is_current(req_id):
            handle = self._running[req_id]
            handle.partial.emit(item)
            self.partial.emit(handle.kind, item)

    @Slot(int, int, str)
    def _on_text(self, req_id: int, row: int, chunk: str) -> None:
        if self.is_current(req_id):
            rows = self._text.setdefault(req_id, {})
            rows[row] = rows.get(row, "") + chunk
            self._start_flushing()

    @Slot(int, object)
    def _on_step(self, req_id: int, step: dict) -> None:
        if self.is_current(req_id):
            self._steps.setdefault(req_id, []).append(step)
            self._start_flushing()

    def _start_flushing(self) -> None:
        if not self._flush_timer.isActive():
            self._flush_timer.start()

    @Slot()
    def _flush(self) -> None:
        """Hand the buffered text and steps of wanted jobs to the GUI (one update per row)."""
        text, self._text = self._text, {}
        steps, self._steps = self._steps, {}
        for req_id, rows in text.items():
            if self.is_current(req_id):
                handle = self._running[req_id]
                for row, chunk in sorted(rows.items()):
                    handle.text.emit(row, chunk)
                    self.text_generated.emit(row, chunk)
        for req_id, items in steps.items():
            if self.is_current(req_id):
                self._running[req_id].steps.emit(items)
                self.tokens_generated.emit(items)

    @Slot(int, object)
    def _on_finished(self, req_id: int, result: Any) -> None:
        handle, wanted = self._end(req_id)
        if handle is not None and handle.loads_model and not wanted:
            self._kept_info = result  # a superseded load that finished: the worker holds this model now
        if handle is not None and wanted:
            if handle.loads_model:
                self.model_info, self._kept_info = result, None
            handle.finished.emit(result)
            self.finished.emit(handle.kind, result)
            if handle.loads_model:
                self.model_ready.emit(result)
        self._close(handle)

    @Slot(int)
    def _on_cancelled(self, req_id: int) -> None:
        handle, wanted = self._end(req_id)
        if handle is not None and wanted:
            handle.cancelled.emit()
            self.job_cancelled.emit(handle.kind)
            if handle.loads_model and self._kept_info is not None:  # stopped before loading: the old one stays
                self.model_info, self._kept_info = self._kept_info, None
                self.model_kept.emit(self.model_info)
        self._close(handle)

    @Slot(int, object)
    def _on_failed(self, req_id: int, error: ErrorInfo) -> None:
        handle, wanted = self._end(req_id)
        if handle is not None and wanted:
            kept = handle.loads_model and self._kept_info is not None
            if kept:  # the worker still holds the previous model: it is the current one again
                self.model_info, self._kept_info = self._kept_info, None
            handle.failed.emit(error)
            self.failed.emit(error)
            if kept:
                self.model_kept.emit(self.model_info)
        self._close(handle)

    # -- shutdown ----------------------------------------------------------------------
    def shutdown(self, timeout_ms: int = 2500) -> bool:
        """Stop every job and the thread; True if the thread ended within ``timeout_ms``."""
        self._flush_timer.stop()
        for handle in list(self._running.values()):
            handle.request.cancel.set()
        self._thread.quit()
        finished = self._thread.wait(timeout_ms)
        if not finished:
            log.warning("The model thread is still busy after %d ms.", timeout_ms)
        return finished

    @property
    def thread(self) -> QThread:
        """The model thread."""
        return self._thread
