"""GUI-thread facade over the model worker: request ids, stop events, stale-result dropping."""

from __future__ import annotations

import itertools
import logging
from typing import Any

from PySide6.QtCore import QObject, QThread, QTimer, Signal, Slot

from .requests import ComputeRequest, ErrorInfo, GenerateRequest, LoadRequest, TaskRequest
from .worker import ModelWorker

log = logging.getLogger(__name__)

FLUSH_MS = 33  # token updates are coalesced to ~30 repaints a second


class ModelController(QObject):
    """What panels talk to. All signals arrive on the GUI thread; stale results never do."""

    submit = Signal(object)
    """Internal: hands a request to the worker thread (queued)."""
    model_loading = Signal(str)
    """A model load started (its spec)."""
    model_ready = Signal(object)
    """The current model is loaded: its ``ModelInfo``."""
    progress = Signal(str, int, int, str)
    """Progress of the current job of ``kind``: done, total, message."""
    vectors_ready = Signal(object)
    """A computed ``VectorSet``."""
    text_generated = Signal(int, str)
    """Coalesced streamed text for batch row ``row``."""
    tokens_generated = Signal(object)
    """Coalesced generation steps: list of dicts (``step``, ``ids``, ``texts``, ``proj``)."""
    generation_finished = Signal(object)
    """Results of the current generation."""
    task_event = Signal(str, object)
    """A partial result of the current task ``name``."""
    task_finished = Signal(str, object)
    """The current task ``name`` finished with a result."""
    record_ready = Signal(object)
    """A ``RunRecord`` of a finished run."""
    job_cancelled = Signal(str)
    """The current job of ``kind`` stopped on request."""
    failed = Signal(object)
    """The current job failed: an ``ErrorInfo``."""
    busy_changed = Signal(bool)
    """True while a job runs."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._ids = itertools.count(1)
        self._current: dict[str, Any] = {}  # kind -> request whose results are wanted
        self._running: dict[int, Any] = {}  # id -> request submitted and not yet finished
        self._text: dict[int, str] = {}
        self._steps: list[dict] = []
        self.model_info: Any = None
        self._thread = QThread()
        self._thread.setObjectName("steerdesk-model")
        self._worker = ModelWorker()
        self._worker.moveToThread(self._thread)
        self.submit.connect(self._worker.run)
        self._worker.progress.connect(self._on_progress)
        self._worker.model_loaded.connect(self._on_model_loaded)
        self._worker.vectors_ready.connect(self._on_vectors)
        self._worker.text_generated.connect(self._on_text)
        self._worker.step_ready.connect(self._on_step)
        self._worker.generation_finished.connect(self._on_generation_finished)
        self._worker.task_event.connect(self._on_task_event)
        self._worker.task_finished.connect(self._on_task_finished)
        self._worker.cancelled.connect(self._on_cancelled)
        self._worker.record_ready.connect(self._on_record)
        self._worker.failed.connect(self._on_failed)
        self._thread.finished.connect(self._worker.deleteLater)
        self._flush_timer = QTimer(self)
        self._flush_timer.setInterval(FLUSH_MS)
        self._flush_timer.timeout.connect(self._flush)
        self._thread.start()

    # -- requests ----------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self._running)

    def _send(self, request: Any) -> int:
        old = self._current.get(request.kind)
        if old is not None and old.id in self._running:
            old.cancel.set()  # superseded: stop it, its results will be dropped
        if request.kind == "load":  # a new model makes every other running job stale
            for other in self._running.values():
                other.cancel.set()
            for kind in list(self._current):
                if kind != "load":
                    self._current.pop(kind, None)
        was_busy = self.busy
        self._current[request.kind] = request
        self._running[request.id] = request
        if request.kind == "generate":
            self._text.clear()
            self._steps.clear()
            self._flush_timer.start()
        self.submit.emit(request)
        if not was_busy:
            self.busy_changed.emit(True)
        return request.id

    def load_model(self, spec: str, **kwargs: Any) -> int:
        """Load ``spec``; cancels running work and frees the old model."""
        self.model_info = None
        self.model_loading.emit(spec)
        return self._send(LoadRequest(id=next(self._ids), spec=spec, **kwargs))

    def compute(self, dataset: Any, **kwargs: Any) -> int:
        """Compute vectors for ``dataset`` (method, read, batch_size, name)."""
        return self._send(ComputeRequest(id=next(self._ids), dataset=dataset, **kwargs))

    def generate(self, prompts: list[str], rows: list[list[Any]], sampling: Any, **kwargs: Any) -> int:
        """Generate with per-row steering; streams via ``text_generated``."""
        return self._send(GenerateRequest(id=next(self._ids), prompts=tuple(prompts),
                                          rows=tuple(tuple(r) for r in rows), sampling=sampling, **kwargs))

    def run_task(self, name: str, fn: Any, title: str = "Task failed") -> int:
        """Run ``fn(lm, cancel, emit)`` in the worker; results arrive as ``task_event``/``task_finished``."""
        return self._send(TaskRequest(id=next(self._ids), name=name, fn=fn, title=title))

    def stop(self, kind: str | None = None) -> None:
        """Stop the current job (of ``kind``, or all) now: sets its Event directly."""
        for k, req in list(self._current.items()):
            if kind is None or k == kind:
                req.cancel.set()
                if k == "generate":
                    self._text.clear()  # nothing is shown after Stop
                    self._steps.clear()

    def is_current(self, kind: str, req_id: int) -> bool:
        req = self._current.get(kind)
        return req is not None and req.id == req_id and not req.cancel.is_set()

    def current_id(self, kind: str) -> int | None:
        req = self._current.get(kind)
        return None if req is None else req.id

    # -- worker signals (GUI thread) ---------------------------------------------------
    def _finish(self, req_id: int) -> None:
        req = self._running.pop(req_id, None)
        if req is not None and req.kind == "generate":
            self._flush()
            self._flush_timer.stop()
        if not self._running:
            self.busy_changed.emit(False)

    def _kind_of(self, req_id: int) -> str | None:
        req = self._running.get(req_id)
        return None if req is None else req.kind

    @Slot(int, int, int, str)
    def _on_progress(self, req_id: int, done: int, total: int, message: str) -> None:
        kind = self._kind_of(req_id)
        if kind and self.is_current(kind, req_id):
            self.progress.emit(kind, done, total, message)

    @Slot(int, object)
    def _on_model_loaded(self, req_id: int, info: Any) -> None:
        current = self.is_current("load", req_id)
        self._finish(req_id)
        if current:
            self.model_info = info
            self.model_ready.emit(info)

    @Slot(int, object)
    def _on_vectors(self, req_id: int, vs: Any) -> None:
        current = self.is_current("compute", req_id)
        self._finish(req_id)
        if current:
            self.vectors_ready.emit(vs)

    @Slot(int, int, str)
    def _on_text(self, req_id: int, row: int, chunk: str) -> None:
        if self.is_current("generate", req_id):
            self._text[row] = self._text.get(row, "") + chunk

    @Slot(int, object)
    def _on_step(self, req_id: int, step: dict) -> None:
        if self.is_current("generate", req_id):
            self._steps.append(step)

    @Slot()
    def _flush(self) -> None:
        if self._text:
            text, self._text = self._text, {}
            for row, chunk in sorted(text.items()):
                self.text_generated.emit(row, chunk)
        if self._steps:
            steps, self._steps = self._steps, []
            self.tokens_generated.emit(steps)

    @Slot(int, object)
    def _on_generation_finished(self, req_id: int, results: Any) -> None:
        req = self._running.get(req_id)
        wanted = req is not None and self._current.get("generate") is req
        stopped = req is not None and req.cancel.is_set()
        if wanted and not stopped:
            self._flush()
        self._finish(req_id)
        if wanted and not stopped:
            self.generation_finished.emit(results)
        elif wanted:
            self.job_cancelled.emit("generate")

    @Slot(object)
    def _on_record(self, record: Any) -> None:
        self.record_ready.emit(record)

    @Slot(int, object)
    def _on_task_event(self, req_id: int, payload: Any) -> None:
        req = self._running.get(req_id)
        if req is not None and self.is_current(req.kind, req_id):
            self.task_event.emit(req.name, payload)

    @Slot(int, object)
    def _on_task_finished(self, req_id: int, result: Any) -> None:
        req = self._running.get(req_id)
        wanted = req is not None and self.is_current(req.kind, req_id)
        self._finish(req_id)
        if wanted:
            self.task_finished.emit(req.name, result)

    @Slot(int)
    def _on_cancelled(self, req_id: int) -> None:
        req = self._running.get(req_id)
        wanted = req is not None and self._current.get(req.kind) is req
        if req is not None and req.kind == "generate":
            return  # generation_finished follows and closes the request
        self._finish(req_id)
        if wanted:
            self.job_cancelled.emit(req.kind)

    @Slot(int, object)
    def _on_failed(self, req_id: int, error: ErrorInfo) -> None:
        req = self._running.get(req_id)
        wanted = req is not None and self._current.get(req.kind) is req
        self._finish(req_id)
        if wanted:
            if req.kind == "load":
                self.model_info = None
            self.failed.emit(error)

    # -- shutdown ----------------------------------------------------------------------
    def shutdown(self, timeout_ms: int = 2500) -> bool:
        """Stop every job and the thread; True if the thread ended within ``timeout_ms``."""
        self._flush_timer.stop()
        for req in list(self._running.values()):
            req.cancel.set()
        self._thread.quit()
        finished = self._thread.wait(timeout_ms)
        if not finished:
            log.warning("The model thread is still busy after %d ms.", timeout_ms)
        return finished

    @property
    def thread(self) -> QThread:
        return self._thread
