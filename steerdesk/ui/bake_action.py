"""Run > Bake steering…: fold the generation pane's current steering into a checkpoint folder.

Builds a :class:`steerdesk.jobs.BakeSpec` from the pane's Steering box, asks for an output
folder, runs it through the controller with a progress dialog (Cancel stops it; nothing is left
behind until the finished folder is moved into place) and shows the result. A steering that
cannot be baked exactly (project / clamp, positions other than all, a family without a slot)
is refused by the job with one sentence, shown by the window's error dialog.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtWidgets import QFileDialog, QMessageBox, QProgressDialog, QWidget


class BakeAction(QObject):
    """Owns one bake at a time: spec from the pane, folder, progress, result."""

    done = Signal(object)
    """A bake finished: its ``BakeResult``."""
    error_occurred = Signal(str, str)
    """A problem found before submitting: (title, message)."""
    status_message = Signal(str)
    """A short message for the status bar."""

    def __init__(self, parent: QWidget, controller: Any, steering: Any) -> None:
        super().__init__(parent)
        self.window, self.controller, self.steering = parent, controller, steering
        self.progress: QProgressDialog | None = None
        self.result_box: QMessageBox | None = None
        self._job: Any = None

    def build_spec(self, out_dir: str, force: bool = False) -> Any:
        """The ``BakeSpec`` of the pane's steering; ``SteerdeskError`` with a sentence when there is none."""
        from ..core.errors import SteerdeskError
        from ..jobs import BakeSpec

        gate = getattr(self.steering, "gate_group", None)
        if gate is not None and gate.isChecked():  # a checkpoint cannot tell prompts apart: refuse, never drop
            raise SteerdeskError("Gated steering cannot be baked: a baked checkpoint steers every prompt alike "
                                 "(switch the pane's gate off to bake the steering for all prompts).")
        steering = self.steering.steering_spec()  # raises for no layer / a layer without a direction
        if steering is None:
            raise SteerdeskError("Pick a vector set and layers in the generation pane first: that is what is baked.")
        return BakeSpec(steering=steering, out_dir=out_dir, force=force)

    def ask_folder(self) -> tuple[str, bool] | None:
        """The new folder to write (and whether to replace an existing one), or None if cancelled."""
        path = QFileDialog.getSaveFileName(self.window, "Bake the steering into a new model folder",
                                           "baked-model", "Model folder (*)")[0]
        if not path:
            return None
        p = Path(path)
        if p.exists():
            answer = QMessageBox.question(self.window, "Replace folder", f"{p} exists. Replace it with the baked "
                                          "model (only once the new one is complete)?")
            if answer != QMessageBox.StandardButton.Yes:
                return None
            return str(p), True
        return str(p), False

    def start(self, out_dir: str | None = None, force: bool = False) -> Any:
        """Bake into ``out_dir`` (asked for when None); returns the job handle, or None if refused."""
        from .panels.inputs import Refused, checked

        try:
            checked(self.controller, lambda: self.build_spec(""), "Nothing to bake")  # before asking for a folder
        except Refused as exc:
            self.error_occurred.emit(exc.title, str(exc))
            return None
        if out_dir is None:
            chosen = self.ask_folder()
            if chosen is None:
                return None
            out_dir, force = chosen
        spec = self.build_spec(out_dir, force)
        self._job = job = self.controller.submit(spec)
        self.progress = dlg = QProgressDialog(f"Baking into {out_dir}…", "Cancel", 0, 0, self.window)
        dlg.setWindowTitle("Bake steering")
        dlg.setWindowModality(Qt.WindowModality.NonModal)
        dlg.setMinimumDuration(0)
        dlg.canceled.connect(lambda: self.controller.stop("bake"))
        dlg.show()
        job.progress.connect(self._on_progress)
        job.finished.connect(self._on_finished)
        job.cancelled.connect(lambda: self.status_message.emit("Bake stopped; nothing was written."))
        job.ended.connect(self._close_progress)
        self.status_message.emit(f"Baking {spec.steering.layers} into {out_dir}…")
        return job

    def _on_progress(self, done: int, total: int, message: str) -> None:
        if self.progress is not None:
            self.progress.setRange(0, max(total, 0))
            self.progress.setValue(done if total > 0 else 0)
            if message:
                self.progress.setLabelText(message)

    def _close_progress(self) -> None:
        if self.progress is not None:
            self.progress.canceled.disconnect()
            self.progress.close()
            self.progress.deleteLater()
            self.progress = None

    def _on_finished(self, result: Any) -> None:
        self._close_progress()  # the folder and files have a new file's permissions (core.bake)
        self.result_box = box = QMessageBox(QMessageBox.Icon.Information, "Baked", result.summary(),
                                            QMessageBox.StandardButton.Ok, self.window)
        box.setWindowModality(Qt.WindowModality.NonModal)
        box.show()
        self.status_message.emit(f"Baked into {result.out_dir} in {result.seconds:.1f} s.")
        self.done.emit(result)


__all__ = ["BakeAction"]
