"""Vector panel: compute steering vectors, keep several named sets, inspect them per layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
                               QLineEdit, QListWidget, QListWidgetItem, QProgressBar, QPushButton,
                               QSpinBox, QSplitter, QVBoxLayout, QWidget)

from ..widgets.heatmap import HeatmapView


@dataclass
class NamedVectors:
    """A vector set held in the session, and whether it fits the loaded model."""

    name: str
    vectors: Any
    usable: bool = True
    reason: str = ""


class VectorPanel(QWidget):
    """Method, read position, Compute/Cancel with progress; per-layer diagnostics of the selected set."""

    compute_requested = Signal(str, str, int, str)
    """Compute with (method, read position, batch size, name)."""
    cancel_requested = Signal()
    """Stop the running computation."""
    vectors_changed = Signal()
    """Sets were added, removed or re-checked."""
    selection_changed = Signal(str)
    """The selected set's name."""
    error_occurred = Signal(str, str)
    """A file problem to show: (title, message)."""
    status_message = Signal(str)
    """A short message for the status bar."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._sets: list[NamedVectors] = []
        self._model_info: Any = None
        self._counter = 0

        self.method = QComboBox()
        self.method.addItem("Mean difference", "mean-diff")
        self.method.addItem("PCA of paired differences", "pca")
        self.method.setToolTip("Mean difference: v = mean(h_target) - mean(h_base).\n"
                               "PCA: first principal axis of the paired differences, signed so target is positive.")
        self.read = QComboBox()
        self.read.addItem("Last reply token", "last")
        self.read.addItem("Mean over reply tokens", "mean")
        self.read.setToolTip("Where hidden states are read: the last real token of each example, or the mean over "
                             "its reply tokens. Padding is never read.")
        self.batch = QSpinBox()
        self.batch.setRange(1, 256)
        self.batch.setValue(8)
        self.batch.setToolTip("Examples per forward pass (lower it if memory runs out).")
        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("name (default: dataset name)")
        self.compute_button = QPushButton("Compute")
        self.compute_button.setObjectName("computeButton")
        self.compute_button.setToolTip("Compute per-layer steering vectors from the training rows of the dataset.")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.progress.setValue(0)

        form = QFormLayout()
        form.addRow("Method", self.method)
        form.addRow("Read at", self.read)
        form.addRow("Batch size", self.batch)
        form.addRow("Name", self.name_edit)
        buttons = QHBoxLayout()
        buttons.addWidget(self.compute_button)
        buttons.addWidget(self.cancel_button)
        compute_box = QGroupBox("Compute vectors")
        cl = QVBoxLayout(compute_box)
        cl.addLayout(form)
        cl.addLayout(buttons)
        cl.addWidget(self.progress)

        self.list = QListWidget()
        self.list.setObjectName("vectorList")
        self.list.setToolTip("Vector sets held in this session. Greyed sets were made for another model.")
        self.save_button = QPushButton("Save…")
        self.load_button = QPushButton("Load…")
        self.export_button = QPushButton("Export GGUF…")
        self.export_button.setToolTip("llama.cpp control vector (--control-vector): direction.N = output of block N.")
        self.remove_button = QPushButton("Remove")
        row = QHBoxLayout()
        for b in (self.load_button, self.save_button, self.export_button, self.remove_button):
            row.addWidget(b)
        sets_box = QGroupBox("Vector sets")
        sl = QVBoxLayout(sets_box)
        sl.addWidget(self.list)
        sl.addLayout(row)
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        sl.addWidget(self.summary)

        self.diag = HeatmapView("Example projections on v (centred)", row_label="layer",
                                col_label="base | target examples")
        self.diag.setToolTip("Each cell: one training example's projection on that layer's direction, centred "
                             "between the base and target means. Blue base and red target = good separation.")
        self.diag.describe = self._describe_diag
        from ..widgets.heatmap import _match_palette

        _match_palette()
        self.norm_plot = pg.PlotWidget(title="|v| / typical |h|")
        self.norm_plot.setLabel("bottom", "layer")
        self.norm_plot.setMenuEnabled(False)
        self.norm_curve = self.norm_plot.plot([], [], pen=pg.mkPen(width=2), symbol="o", symbolSize=5)

        top = QHBoxLayout()
        top.addWidget(compute_box, 1)
        top.addWidget(sets_box, 1)
        plots = QSplitter(Qt.Orientation.Horizontal)
        plots.addWidget(self.diag)
        plots.addWidget(self.norm_plot)
        plots.setSizes([420, 220])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(top)
        layout.addWidget(plots, 1)

        self.compute_button.clicked.connect(self._on_compute)
        self.cancel_button.clicked.connect(self.cancel_requested)
        self.list.currentRowChanged.connect(self._on_row_changed)
        self.save_button.clicked.connect(self._on_save)
        self.load_button.clicked.connect(self._on_load)
        self.export_button.clicked.connect(self._on_export)
        self.remove_button.clicked.connect(self._on_remove)
        self._update_buttons()

    # -- state -------------------------------------------------------------------------
    def sets(self) -> list[NamedVectors]:
        return list(self._sets)

    def current(self) -> NamedVectors | None:
        row = self.list.currentRow()
        return self._sets[row] if 0 <= row < len(self._sets) else None

    def find(self, name: str) -> NamedVectors | None:
        return next((s for s in self._sets if s.name == name), None)

    def _unique(self, name: str) -> str:
        base, n = name or "vectors", 2
        while self.find(name or base):
            name = f"{base} ({n})"
            n += 1
        return name or base

    def add_vectors(self, vs: Any, name: str | None = None) -> NamedVectors:
        """Hold ``vs`` in the session under a unique name and select it."""
        name = self._unique(name or vs.metadata.get("name") or vs.metadata.get("dataset_name") or "vectors")
        vs.metadata["name"] = name
        item = NamedVectors(name, vs)
        self._sets.append(item)
        self._check(item)
        self._refresh_list(select=len(self._sets) - 1)
        self.vectors_changed.emit()
        return item

    def set_model_info(self, info: Any) -> None:
        """Re-check every set against the model now loaded (None while loading)."""
        self._model_info = info
        for item in self._sets:
            self._check(item)
        self._refresh_list(select=self.list.currentRow())
        self.vectors_changed.emit()

    def _check(self, item: NamedVectors) -> None:
        from ...core.errors import SteerdeskError

        if self._model_info is None:
            item.usable, item.reason = False, "no model loaded"
            return
        try:
            item.vectors.check_compatible(self._model_info)
            item.usable, item.reason = True, ""
        except SteerdeskError as exc:
            item.usable, item.reason = False, str(exc)

    def _refresh_list(self, select: int = -1) -> None:
        self.list.blockSignals(True)
        self.list.clear()
        for s in self._sets:
            m = s.vectors.metadata
            label = f"{s.name}  —  {m.get('method', '?')}, {m.get('model', '?')}"
            it = QListWidgetItem(label if s.usable else f"{label}  [unusable]")
            it.setToolTip(s.reason or f"{s.vectors.num_layers} layers x {s.vectors.hidden_size}")
            if not s.usable:
                it.setForeground(Qt.GlobalColor.gray)
            self.list.addItem(it)
        self.list.blockSignals(False)
        if self._sets:
            self.list.setCurrentRow(max(0, min(select, len(self._sets) - 1)))
        else:
            self._show(None)
        self._update_buttons()

    def _update_buttons(self) -> None:
        has = self.current() is not None
        for b in (self.save_button, self.export_button, self.remove_button):
            b.setEnabled(has)

    def set_busy(self, busy: bool) -> None:
        self.compute_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
        if not busy:
            self.progress.setRange(0, 100)

    def set_progress(self, done: int, total: int, message: str) -> None:
        if total <= 0:
            self.progress.setRange(0, 0)
        else:
            self.progress.setRange(0, total)
            self.progress.setValue(done)
        self.progress.setFormat(f"{message} %v/%m" if total > 0 else message)

    # -- display -----------------------------------------------------------------------
    def _on_row_changed(self, row: int) -> None:
        item = self.current()
        self._show(item)
        self._update_buttons()
        self.selection_changed.emit(item.name if item else "")

    def _show(self, item: NamedVectors | None) -> None:
        if item is None:
            self.diag.set_data(np.zeros((1, 1)))
            self.norm_curve.setData([], [])
            self.summary.setText("No vectors yet: pick a dataset and press Compute.")
            return
        vs = item.vectors
        from ...core.vectors import describe

        self.summary.setText(describe(vs) + ("" if item.usable else f"\nUnusable: {item.reason}"))
        rel = vs.relative_strength().numpy()
        layers = np.arange(vs.num_layers)
        self.norm_curve.setData(layers, np.nan_to_num(rel, nan=0.0))
        if vs.proj_base is not None and vs.proj_target is not None:
            pb, pt = vs.proj_base.numpy(), vs.proj_target.numpy()
            # Centre each layer on the midpoint between the group means so separation reads as colour.
            mid = (pb.mean(1, keepdims=True) + pt.mean(1, keepdims=True)) / 2
            scale = np.maximum(np.abs(np.concatenate([pb, pt], 1) - mid).max(1, keepdims=True), 1e-6)
            gap = np.full((pb.shape[0], 1), np.nan, dtype=np.float32)
            data = np.concatenate([(pb - mid) / scale, gap, (pt - mid) / scale], 1)
            self._n_base = pb.shape[1]
            self._raw = np.concatenate([pb, gap, pt], 1)
            self.diag.set_data(data, levels=(-1.0, 1.0),
                               col_ticks=[(pb.shape[1] / 2, "base"), (pb.shape[1] + 1 + pt.shape[1] / 2, "target")])
        else:
            self._raw = None
            self.diag.set_data(np.zeros((vs.num_layers, 1)))

    def _describe_diag(self, row: int, col: int, value: float) -> str:
        raw = getattr(self, "_raw", None)
        if raw is None or not np.isfinite(value):
            return f"layer {row}"
        nb = self._n_base
        side, idx = ("base", col) if col < nb else ("target", col - nb - 1)
        return f"layer {row}, {side} example {idx + 1}: projection {raw[row, col]:.3g}"

    # -- actions -----------------------------------------------------------------------
    def _on_compute(self) -> None:
        self.compute_requested.emit(self.method.currentData(), self.read.currentData(), self.batch.value(),
                                    self.name_edit.text().strip())

    def _ask_save_path(self, caption: str, filt: str, suggested: str) -> str:
        return QFileDialog.getSaveFileName(self, caption, suggested, filt)[0]

    def _ask_open_path(self, caption: str, filt: str) -> str:
        return QFileDialog.getOpenFileName(self, caption, "", filt)[0]

    def _write_current(self, caption: str, filt: str, suffix: str, writer: Any, done: str, failed: str) -> None:
        """Ask for a path (adding ``suffix``) and write the selected set with ``writer(vs, path)``."""
        from ...core.errors import SteerdeskError

        item = self.current()
        if item is None:
            return
        path = self._ask_save_path(caption, filt, f"{item.name}{suffix}")
        if not path:
            return
        if not path.lower().endswith(suffix):
            path += suffix
        try:
            writer(item.vectors, path)
            self.status_message.emit(done.format(path=path, last=item.vectors.num_layers - 1))
        except SteerdeskError as exc:
            self.error_occurred.emit(failed, str(exc))

    def _on_save(self) -> None:
        from ...core.vectors import save_vectors

        self._write_current("Save vectors", "Vector sets (*.safetensors)", ".safetensors", save_vectors,
                            "Saved {path}", "Could not save vectors")

    def _on_export(self) -> None:
        from ...core.vectors import export_gguf

        self._write_current("Export llama.cpp control vector", "GGUF control vector (*.gguf)", ".gguf", export_gguf,
                            "Exported {path} (layers 1-{last})", "Could not export")

    def load_file(self, path: str) -> NamedVectors | None:
        """Load a .safetensors or .gguf vector file into the session."""
        from ...core.errors import SteerdeskError
        from ...core.vectors import load_vectors

        try:
            layers = self._model_info.num_layers if self._model_info is not None else None
            vs = load_vectors(path, model_layers=layers)
        except SteerdeskError as exc:
            self.error_occurred.emit("Could not load vectors", str(exc))
            return None
        from pathlib import Path

        item = self.add_vectors(vs, Path(path).stem)
        if not item.usable:
            self.error_occurred.emit("Vectors do not fit this model", item.reason)
        return item

    def _on_load(self) -> None:
        path = self._ask_open_path("Load vectors", "Vector sets (*.safetensors *.gguf)")
        if path:
            self.load_file(path)

    def _on_remove(self) -> None:
        row = self.list.currentRow()
        if 0 <= row < len(self._sets):
            del self._sets[row]
            self._refresh_list(select=row)
            self.vectors_changed.emit()
