"""The model worker: lives in one QThread, owns the model, runs one job at a time."""

from __future__ import annotations

import gc
import logging
from typing import Any

from PySide6.QtCore import QObject, Signal, Slot

from .requests import ComputeRequest, ErrorInfo, GenerateRequest, LoadRequest

log = logging.getLogger(__name__)


class ModelWorker(QObject):
    """Runs core functions off the GUI thread and emits plain data (never live tensors)."""

    progress = Signal(int, int, int, str)
    """Progress of request ``id``: ``done`` of ``total`` with a message."""
    model_loaded = Signal(int, object)
    """A model finished loading: its ``ModelInfo``."""
    vectors_ready = Signal(int, object)
    """A vector set was computed (CPU tensors)."""
    text_generated = Signal(int, int, str)
    """A chunk of streamed text for batch row ``row``."""
    step_ready = Signal(int, object)
    """One generation step: dict with ``step``, ``ids`` and ``texts`` per row, ``proj`` ``[rows, layers]`` or None."""
    generation_finished = Signal(int, object)
    """Generation ended: list of ``GenerationResult``."""
    task_event = Signal(int, object)
    """A task streamed a partial result."""
    task_finished = Signal(int, object)
    """A task returned its result."""
    record_ready = Signal(object)
    """A finished run's ``RunRecord`` (for the history panel)."""
    cancelled = Signal(int)
    """Request ``id`` was stopped on request."""
    failed = Signal(int, object)
    """Request ``id`` failed: an ``ErrorInfo``."""

    def __init__(self) -> None:
        super().__init__()
        self.lm: Any = None

    @Slot(object)
    def run(self, request: Any) -> None:
        """Dispatch one request; every outcome is reported by a signal."""
        from ..core.errors import Cancelled

        handler = {"load": self._load, "compute": self._compute, "generate": self._generate}.get(
            request.kind, self._task)
        titles = {"load": "Could not load the model", "compute": "Could not compute vectors",
                  "generate": "Generation failed"}
        title = titles.get(request.kind) or getattr(request, "title", "Task failed")
        if request.cancel.is_set():
            self.cancelled.emit(request.id)
            return
        try:
            handler(request)
        except Cancelled:
            self.cancelled.emit(request.id)
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the GUI
            self._recover_memory(exc)
            self.failed.emit(request.id, ErrorInfo.from_exception(exc, title))

    def _task(self, req: Any) -> None:
        lm = self._need_model()
        result = req.fn(lm, req.cancel, lambda payload: self.task_event.emit(req.id, payload))
        if req.cancel.is_set():
            from ..core.errors import Cancelled

            raise Cancelled("Stopped.")
        self.task_finished.emit(req.id, result)

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

    def _load(self, req: LoadRequest) -> None:
        from ..core.models import load_model

        old, self.lm = self.lm, None
        if old is not None:  # free the previous model before loading the next
            del old
            self._free_memory()  # (this used to pass a MemoryError the check ignored: nothing was freed)
        self.progress.emit(req.id, 0, 0, f"Loading {req.spec}")
        self.lm = load_model(req.spec, device=req.device, dtype=req.dtype,
                             trust_remote_code=req.trust_remote_code,
                             progress=lambda msg: self.progress.emit(req.id, 0, 0, msg))
        self.model_loaded.emit(req.id, self.lm.info)

    def _need_model(self) -> Any:
        from ..core.errors import SteerdeskError

        if self.lm is None:
            raise SteerdeskError("No model is loaded yet.")
        return self.lm

    def _compute(self, req: ComputeRequest) -> None:
        from ..core.extract import compute_vectors

        lm = self._need_model()
        vs = compute_vectors(
            lm, req.dataset, method=req.method, read=req.read, batch_size=req.batch_size,
            progress=lambda done, total: self.progress.emit(req.id, done, total, "Extracting activations"),
            cancel=req.cancel,
        )
        vs.metadata["name"] = req.name
        self.vectors_ready.emit(req.id, vs)
        from ..core.records import record_compute

        self._record(lambda: record_compute(lm, req.dataset, vs, batch_size=req.batch_size))

    def _generate(self, req: GenerateRequest) -> None:
        from ..core.generate import generate

        lm = self._need_model()
        if req.vectors is not None:
            req.vectors.check_compatible(lm.info)

        decode = lm.tokenizer.decode

        def on_step(step: int, ids: list[int], proj: Any) -> None:
            self.step_ready.emit(req.id, {
                "step": step, "ids": list(ids), "texts": [decode([i], skip_special_tokens=True) for i in ids],
                "proj": None if proj is None else proj.numpy().copy(),
            })

        results = generate(
            lm, list(req.prompts), [list(r) for r in req.rows], sampling=req.sampling, system=req.system,
            on_text=lambda row, chunk: self.text_generated.emit(req.id, row, chunk),
            on_step=on_step, stop=req.cancel, watch=req.watch,
        )
        if req.cancel.is_set():
            self.cancelled.emit(req.id)
        self.generation_finished.emit(req.id, results)
        if not req.cancel.is_set():
            from ..core.records import record_generation

            steered = [bool(r) for r in req.rows]
            steers = next((list(r) for r in req.rows if r), [])
            self._record(lambda: record_generation(lm, list(req.prompts), results, steers=steers,
                                                   steered_rows=steered, sampling=req.sampling,
                                                   system=req.system, vectors=req.vectors))

    def _record(self, make: Any) -> None:
        """Emit a run record; a failure to record never fails the run itself."""
        try:
            self.record_ready.emit(make())
        except Exception:  # noqa: BLE001
            log.exception("Could not record the run")
