"""The model worker: lives in one QThread, owns the model, runs one job Spec at a time."""

from __future__ import annotations

import gc
import inspect
import logging
import time
from typing import Any

from PySide6.QtCore import QObject, Signal, Slot

from .requests import ErrorInfo, JobRequest

log = logging.getLogger(__name__)


class ModelWorker(QObject):
    """Runs any job Spec through :func:`steerdesk.jobs.run` off the GUI thread.

    Every signal carries the request id first and plain data (never the live model). A load
    keeps the model here and reports its ``ModelInfo``; other jobs report their result.
    """

    progress = Signal(int, int, int, str)
    """``(id, done, total, message)``; ``total`` 0 means unknown."""
    partial = Signal(int, object)
    """``(id, item)``: a partial result (sweep cell, grid row)."""
    text = Signal(int, int, str)
    """``(id, row, chunk)``: streamed text of batch row ``row``."""
    step = Signal(int, object)
    """``(id, step)``: dict with ``step``, ``ids`` and ``texts`` per row, ``proj`` ``[rows, layers]`` or None."""
    finished = Signal(int, object)
    """``(id, result)``: the job's result (a load's ``ModelInfo``)."""
    record_ready = Signal(object)
    """A finished run's ``RunRecord`` (a stopped generation's too), or a ``StoppedRun`` (for the history)."""
    cancelled = Signal(int)
    """Request ``id`` was stopped on request."""
    failed = Signal(int, object)
    """Request ``id`` failed: an ``ErrorInfo``."""

    def __init__(self) -> None:
        super().__init__()
        self.lm: Any = None

    @Slot(object)
    def run(self, request: JobRequest) -> None:
        """Run one job; every outcome is reported by exactly one of finished / cancelled / failed."""
        from .. import jobs
        from ..core.errors import Cancelled

        if request.cancel.is_set():
            self.cancelled.emit(request.id)
            return
        rid = request.id
        ctx = jobs.JobContext(
            cancel=request.cancel,
            on_progress=lambda done, total, message: self.progress.emit(rid, done, total, message),
            on_partial=lambda item: self.partial.emit(rid, item),
            on_text=lambda row, chunk: self.text.emit(rid, row, chunk),
            on_step=self._step_emitter(rid),
        )
        lm: Any = None  # the model a recorded run ran on (None for a load)
        t0 = time.perf_counter()
        try:
            if isinstance(request.spec, jobs.LoadSpec):
                # The model loaded so far stays until the new one has loaded: a failed switch (a hub
                # id without network, a wrong folder) leaves the user with the model that worked.
                ctx.progress(0, 0, f"Loading {request.spec.spec}")
                new = jobs.run(None, request.spec, ctx)
                self._drop_model()
                self.lm = new
                result: Any = self.lm.info
            else:
                lm = self._need_model()
                result = jobs.run(lm, request.spec, ctx)
        except Cancelled:
            self.cancelled.emit(rid)
            if lm is not None:  # every run the user starts is in the history, a stopped one too
                self._record_stopped(request.spec, time.perf_counter() - t0)
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the GUI
            self._recover_memory(exc)
            self.failed.emit(rid, ErrorInfo.from_exception(exc, request.title))
        else:
            if request.cancel.is_set() and lm is not None:  # a job that returns what it had when stopped
                # (generate); a finished load always reports its model: the worker now holds it
                self.cancelled.emit(rid)
            else:
                self.finished.emit(rid, result)
            if lm is not None:  # after the result, as before: the record never delays it
                self._record(lm, request.spec, result, time.perf_counter() - t0)

    def _step_emitter(self, rid: int) -> Any:
        def on_step(step: int, ids: list[int], proj: Any) -> None:
            decode = self.lm.tokenizer.decode
            self.step.emit(rid, {"step": step, "ids": list(ids),
                                 "texts": [decode([i], skip_special_tokens=True) for i in ids],
                                 "proj": None if proj is None else proj.numpy().copy()})
        return on_step

    def _need_model(self) -> Any:
        from ..core.errors import SteerdeskError

        if self.lm is None:
            raise SteerdeskError("No model is loaded yet.")
        return self.lm

    def _drop_model(self) -> None:
        """Free the previous model (once the next one has loaded)."""
        old, self.lm = self.lm, None
        if old is not None:
            del old
            self._free_memory()  # (this used to pass a MemoryError the check ignored: nothing was freed)

    def _record(self, lm: Any, spec: Any, result: Any, seconds: float) -> None:
        """Emit the run's record (also of a stopped run that returned a result); never fails the run.

        ``seconds`` (the wall time of the run) goes to jobs whose result carries no time of its own
        (their ``record`` takes ``seconds=``); the others record the time their result measured.
        """
        from .. import jobs

        try:
            make = getattr(jobs.job_for(spec), "record", None)
            wants_time = make is not None and "seconds" in inspect.signature(make).parameters
            record = jobs.record(lm, spec, result, **({"seconds": seconds} if wants_time else {}))
        except Exception:  # noqa: BLE001
            log.exception("Could not record the run")
            return
        if record is not None:
            self.record_ready.emit(record)

    def _record_stopped(self, spec: Any, seconds: float) -> None:
        """Emit a :class:`~steerdesk.ui.requests.StoppedRun` for a job stopped before its result."""
        from datetime import datetime, timezone

        from .. import jobs
        from .requests import StoppedRun

        kind = getattr(jobs.job_for(spec), "NAME", type(spec).__name__)
        self.record_ready.emit(StoppedRun(kind=kind, seconds=seconds,
                                          created=datetime.now(timezone.utc).isoformat(timespec="seconds")))

    def _recover_memory(self, exc: BaseException) -> None:
        import torch

        if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
            self._free_memory()

    @staticmethod
    def _free_memory() -> None:
        """Collect garbage and hand the accelerator's cached blocks back to the driver."""
        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
