"""Vector panel: compute steering vectors, list the session's sets, inspect them per layer."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from ..layout import Reflow
from ..vector_sets import NamedVectors, VectorSets
from ..widgets.heatmap import HeatmapView
from .inputs import PairsSource, Refused, checked
from .optimize_box import LossPlot, OptimizeBox, optimize_layout

__all__ = ["NamedVectors", "VectorPanel"]


class VectorPanel(QWidget):
    """Method, read position, Compute/Cancel with progress; per-layer diagnostics of the selected set."""

    vectors_ready = Signal(object)
    """A computed set was added to the session: its ``NamedVectors``."""
    error_occurred = Signal(str, str)
    """A file problem to show: (title, message)."""
    status_message = Signal(str)
    """A short message for the status bar."""

    def __init__(self, controller: Any = None, vector_sets: VectorSets | None = None,
                 pairs: PairsSource | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.controller = controller  # a ModelController (None: a panel that only shows sets)
        self.vector_sets = vector_sets if vector_sets is not None else VectorSets(self)
        self.pairs = pairs
        self._job: Any = None

        self.method = QComboBox()
        self.method.addItem("Mean difference", "mean-diff")
        self.method.addItem("PCA of paired differences", "pca")
        self.method.addItem("Optimized (trained on the pairs)", "optimized")
        self.method.setToolTip("Mean difference: v = mean(h_target) - mean(h_base).\n"
                               "PCA: first principal axis of the paired differences, signed so target is positive.\n"
                               "Optimized: start from the mean difference at the chosen layers and train the vector "
                               "(BiPO preference loss + KL on neutral text, norm bound, early stopping).")
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
        self.optimize = OptimizeBox()
        self.loss_plot = LossPlot()
        self.optimize_area = optimize_layout(self.optimize, self.loss_plot)
        cl.addWidget(self.optimize_area)
        self.optimize_area.setVisible(False)

        self.list = QListWidget()
        self.list.setObjectName("vectorList")
        self.list.setToolTip("Vector sets held in this session. Greyed sets were made for another model.")
        self.save_button = QPushButton("Save…")
        self.load_button = QPushButton("Load…")
        self.export_button = QPushButton("Export GGUF…")
        self.export_button.setToolTip("llama.cpp control vector (--control-vector): direction.N = output of block N.")
        self.remove_button = QPushButton("Remove")
        row = QGridLayout()  # 2 x 2: the panel stays narrow enough for a laptop's dock
        for i, b in enumerate((self.load_button, self.save_button, self.export_button, self.remove_button)):
            row.addWidget(b, i // 2, i % 2)
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
        self._reflow = Reflow(self, top, 560)  # stacked in a narrow dock (it scrolls), side by side otherwise
        plots = QSplitter(Qt.Orientation.Horizontal)
        plots.addWidget(self.diag)
        plots.addWidget(self.norm_plot)
        plots.setSizes([420, 220])
        plots.setChildrenCollapsible(False)
        self.norm_plot.setMinimumSize(200, 160)
        self._reflow_plots = Reflow(self, plots, 560)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(top)
        layout.addWidget(plots, 1)

        self.method.currentIndexChanged.connect(
            lambda _i: self.optimize_area.setVisible(self.method.currentData() == "optimized"))
        self.compute_button.clicked.connect(self.compute)
        self.cancel_button.clicked.connect(self.cancel)
        self.list.currentRowChanged.connect(self._on_row_changed)
        self.vector_sets.changed.connect(self._on_sets_changed)
        self.vector_sets.selected_changed.connect(self._on_selected)
        self.save_button.clicked.connect(self._on_save)
        self.load_button.clicked.connect(self._on_load)
        self.export_button.clicked.connect(self._on_export)
        self.remove_button.clicked.connect(self._on_remove)
        self._update_buttons()

    # -- state -------------------------------------------------------------------------
    def sets(self) -> list[NamedVectors]:
        """The session's sets (held by :class:`~steerdesk.ui.vector_sets.VectorSets`)."""
        return self.vector_sets.sets()

    def current(self) -> NamedVectors | None:
        """The set selected in the list."""
        row = self.list.currentRow()
        sets = self.vector_sets.sets()
        return sets[row] if 0 <= row < len(sets) else None

    def find(self, name: str) -> NamedVectors | None:
        """The set called ``name``, or None."""
        return self.vector_sets.find(name)

    def add_vectors(self, vs: Any, name: str | None = None) -> NamedVectors:
        """Hold ``vs`` in the session under a unique name and select it."""
        item = self.vector_sets.add(vs, name)
        self.vector_sets.select(item.name)
        return item

    def _on_sets_changed(self) -> None:
        """Rebuild the list, keeping the selected set (or the row where it was)."""
        sets = self.vector_sets.sets()
        selected = self.vector_sets.selected()
        row = next((i for i, x in enumerate(sets) if x is selected), min(self.list.currentRow(), len(sets) - 1))
        self._refresh_list(select=row)
        item = self.current()
        if item is not None and item is not selected:
            self.vector_sets.select(item.name)

    def _on_selected(self, name: str) -> None:
        names = [s.name for s in self.vector_sets.sets()]
        if name in names and self.list.currentRow() != names.index(name):
            self.list.setCurrentRow(names.index(name))

    def _refresh_list(self, select: int = -1) -> None:
        sets = self.vector_sets.sets()
        self.list.blockSignals(True)
        self.list.clear()
        for s in sets:
            m = s.vectors.metadata
            label = f"{s.name}  —  {m.get('method', '?')}, {m.get('model', '?')}"
            it = QListWidgetItem(label if s.usable else f"{label}  [unusable]")
            it.setToolTip(s.reason or f"{s.vectors.num_layers} layers x {s.vectors.hidden_size}")
            if not s.usable:
                it.setForeground(Qt.GlobalColor.gray)
            self.list.addItem(it)
        if sets:
            self.list.setCurrentRow(max(0, min(select, len(sets) - 1)))
        self.list.blockSignals(False)
        self._show(self.current())
        self._update_buttons()

    def _update_buttons(self) -> None:
        has = self.current() is not None
        for b in (self.save_button, self.export_button, self.remove_button):
            b.setEnabled(has)

    def set_busy(self, busy: bool) -> None:
        """Compute disabled and Cancel enabled while busy."""
        self.compute_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
        if not busy:
            self.progress.setRange(0, 100)

    def set_progress(self, done: int, total: int, message: str) -> None:
        """Show ``done`` of ``total`` (a busy bar when ``total`` is 0) with ``message``."""
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
        self.vector_sets.select(item.name if item else "")

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

    def restore_settings(self, s: Any) -> None:
        """Method and read position from ``QSettings``."""
        self.method.setCurrentIndex(max(0, self.method.findData(s.value("compute/method", "mean-diff"))))
        self.optimize.layers.setText(str(s.value("compute/optimize_layers", "") or ""))
        self.read.setCurrentIndex(max(0, self.read.findData(s.value("compute/read", "last"))))

    def save_settings(self, s: Any) -> None:
        """Store what :meth:`restore_settings` reads."""
        s.setValue("compute/method", self.method.currentData())
        s.setValue("compute/optimize_layers", self.optimize.layers.text())
        s.setValue("compute/read", self.read.currentData())

    # -- actions -----------------------------------------------------------------------
    def build_spec(self) -> Any:
        """The :class:`~steerdesk.jobs.ComputeSpec` of the controls (``SteerdeskError`` with a sentence).

        The whole dataset goes in with the panel's held-out fraction: the job computes from the
        training part (the same deterministic split the other panels use) and records both.
        """
        from ...jobs import ComputeSpec

        assert self.pairs is not None, "a computing VectorPanel needs a PairsSource"
        train, _held = self.pairs.train_and_heldout()
        train.validate()
        method = self.method.currentData()
        layers = settings = None
        if method == "optimized":
            info = self.vector_sets.model_info()
            layers = self.optimize.chosen_layers(info.num_layers if info is not None else None)
            settings = self.optimize.settings()
        return ComputeSpec(dataset=self.pairs.dataset(), method=method,
                           read=self.read.currentData(), batch_size=self.batch.value(),
                           heldout=self.pairs.heldout_fraction(),
                           name=self.name_edit.text().strip() or self.pairs.display_name(),
                           layers=layers, optimize=settings)

    def compute(self) -> None:
        """Compute (the Compute button, Ctrl+K): submit the Spec, show progress, add the set."""
        try:
            spec = checked(self.controller, self.build_spec, "Dataset problem")
        except Refused as exc:
            self.error_occurred.emit(exc.title, str(exc))
            return
        self.set_busy(True)
        self._job = job = self.controller.submit(spec)
        job.progress.connect(self.set_progress)
        if spec.method == "optimized":
            self.loss_plot.reset()
            job.partial.connect(self.loss_plot.add)
        job.finished.connect(self._on_computed)
        job.ended.connect(lambda: self.set_busy(False) if self._job is job else None)

    def cancel(self) -> None:
        """Stop the running computation."""
        if self.controller is not None:
            self.controller.stop("compute")

    def _on_computed(self, result: Any) -> None:
        self.set_busy(False)
        self.progress.setValue(100)
        vs = result.vectors
        item = self.add_vectors(vs)
        self.progress.setFormat(f"Done: {item.name} ({vs.num_layers} layers)")  # not the last step's count
        self.vectors_ready.emit(item)
        cut = int(vs.metadata.get("truncated_examples", "0") or 0)
        if cut:
            self.error_occurred.emit("Long examples were cut",
                                     f"{cut} example(s) were longer than the model's context and were cut from the "
                                     f"left (the end of each reply, which is what is read, was kept).")
        self.status_message.emit(f"Vectors ready: {item.name}")

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
            info = self.vector_sets.model_info()
            layers = info.num_layers if info is not None else None
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
        item = self.current()
        if item is not None:
            self.vector_sets.remove(item.name)
