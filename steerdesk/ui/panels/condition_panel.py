"""Conditional steering in the window (issue 15): the generation pane's gate group and the
calibration view (histogram of on- / off-condition scores with a draggable threshold).

* :class:`GateGroup` (in the generation pane): condition vectors (a file, or a set handed over by
  the calibration view), layer, threshold and side; builds the ``ConditionGate`` of a
  ``GenerateSpec``.
* :class:`ConditionPanel` (a dock): runs the calibrate job (``jobs.CalibrateSpec``) through the
  controller, shows a layer's scores as two histograms with the threshold as a draggable line, the
  confusion counts live, and "Use this gate" hands the condition vectors (in memory) and the
  chosen layer / threshold / side to the generation pane.

No torch at import: the core modules are imported inside the methods that need them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from .inputs import Refused, checked

SIDES = ("above", "below")  # the gate's sides (core.condition.SIDES, without importing torch)
POS_BRUSH, NEG_BRUSH = (214, 96, 77, 140), (67, 147, 195, 140)  # on-condition red, off-condition blue


@dataclass(frozen=True)
class GateChoice:
    """A gate picked in the calibration view: condition vectors (a ``VectorSet``), how to name them,
    the layer, threshold (a CAST score in [-1, 1]) and side (``"above"`` / ``"below"``)."""

    conditions: Any
    label: str
    layer: int
    threshold: float
    side: str


def confusion(scores: np.ndarray, labels: np.ndarray, threshold: float, side: str) -> tuple[int, int, int, int]:
    """``(TP, FP, FN, TN)`` of the gate ``score > threshold`` (``side="above"``) or ``score < threshold``
    (``"below"``) on ``scores`` ``[n]`` with ``labels`` ``[n]`` (True = on-condition), the strict
    inequality of ``ConditionGate.opens``. Raises ``ValueError`` for an unknown side."""
    if side not in SIDES:
        raise ValueError(f"unknown side {side!r}")
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    pred = s > threshold if side == "above" else s < threshold
    return int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum()), int((~pred & ~y).sum())


def rates(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """``(precision, recall, F1)`` as ``core.condition.f1_grid`` defines them (0 where undefined)."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def _load_conditions(path: str, model_info: Any) -> Any:
    """A condition ``VectorSet`` from ``path``, checked against the loaded model (``SteerdeskError``)."""
    from ...core.condition import condition_read
    from ...core.vectors import load_vectors

    vs = load_vectors(path, model_layers=model_info.num_layers if model_info is not None else None)
    condition_read(vs)  # refuses steering vectors
    if model_info is not None:
        vs.check_compatible(model_info)
    return vs


# ------------------------------------------------------------------------------- the pane's gate

class GateGroup(QGroupBox):
    """The generation pane's gate: checkable group (unchecked: no gate) with the condition vectors,
    layer, threshold and side."""

    error_occurred = Signal(str, str)
    """A problem to show: (title, message)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Gate: steer only prompts that match a condition", parent)
        self.setObjectName("gateGroup")
        self.setCheckable(True)
        self.setChecked(False)
        self.setToolTip("CAST: a row is steered only when its unsteered prompt's score at the condition layer "
                        "is above (or below) the threshold; decided once, before generation.")
        self.model_info: Any = None  # set by the pane when a model is ready (checks the vector file)
        self._conditions: Any = None
        self._source = ""  # what the loaded conditions came from (a path, or a calibration)
        self.file = QLineEdit()
        self.file.setObjectName("gateFile")
        self.file.setPlaceholderText("condition vectors (.safetensors) or Calibrate → Use this gate")
        self.browse = QToolButton()
        self.browse.setText("…")
        self.browse.setToolTip("Pick a condition vector file (steerdesk calibrate --compute -o, or Save in Calibrate)")
        self.layer = QSpinBox()
        self.layer.setObjectName("gateLayer")
        self.layer.setRange(0, 0)
        self.threshold = QDoubleSpinBox()
        self.threshold.setObjectName("gateThreshold")
        self.threshold.setRange(-1.0, 1.0)
        self.threshold.setDecimals(4)
        self.threshold.setSingleStep(0.01)
        self.side = QComboBox()
        self.side.setObjectName("gateSide")
        for s in SIDES:
            self.side.addItem(f"score {'>' if s == 'above' else '<'} threshold", s)
        self.body = QWidget()  # shown only while the gate is on: an unused gate takes one line
        row = QHBoxLayout(self.body)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(QLabel("Condition"))
        row.addWidget(self.file, 1)
        row.addWidget(self.browse)
        row.addWidget(QLabel("Layer"))
        row.addWidget(self.layer)
        row.addWidget(QLabel("Threshold"))
        row.addWidget(self.threshold)
        row.addWidget(self.side)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(6, 2, 6, 2)
        outer.addWidget(self.body)
        self.body.setVisible(False)
        self.toggled.connect(self.body.setVisible)
        self.browse.clicked.connect(self._on_browse)
        self.file.editingFinished.connect(self._on_file_edited)

    def set_num_layers(self, n: int) -> None:
        """Layers ``0..n-1`` (the loaded model's)."""
        self.layer.setRange(0, max(0, n - 1))

    def conditions(self) -> Any:
        """The condition ``VectorSet`` in use, or None."""
        return self._conditions

    def load_file(self, path: str) -> bool:
        """Use the condition vectors in ``path``; a bad file is one line (``error_occurred``), the
        text stays. Returns whether they loaded."""
        from ...core.errors import SteerdeskError

        self.file.setText(path)
        try:
            vs = _load_conditions(path, self.model_info)
        except SteerdeskError as exc:
            self._conditions, self._source = None, ""
            self.error_occurred.emit("Cannot use these condition vectors", str(exc))
            return False
        self._conditions, self._source = vs, path
        return True

    def use(self, choice: GateChoice) -> None:
        """Fill the group from the calibration view and switch the gate on."""
        self._conditions, self._source = choice.conditions, choice.label
        self.file.setText(choice.label)
        self.layer.setMaximum(max(self.layer.maximum(), choice.layer))
        self.layer.setValue(choice.layer)
        self.threshold.setValue(choice.threshold)
        self.side.setCurrentIndex(max(0, self.side.findData(choice.side)))
        self.setChecked(True)

    def gate(self) -> Any:
        """The ``ConditionGate`` (None when the group is unchecked). Raises ``SteerdeskError`` without
        condition vectors, for vectors that are not conditions or a layer without a direction."""
        from ...core.condition import ConditionGate, condition_read
        from ...core.errors import SteerdeskError

        if not self.isChecked():
            return None
        text = self.file.text().strip()
        if text and text != self._source:  # typed or pasted, not yet loaded
            self._conditions, self._source = _load_conditions(text, self.model_info), text
        vs = self._conditions
        if vs is None:
            raise SteerdeskError("The gate is on but has no condition vectors: pick a file, or calibrate "
                                 "in the Condition dock and press 'Use this gate'.")
        layer = self.layer.value()
        vs.require_layers([layer])
        return ConditionGate(layer=layer, direction=vs.directions[layer].float().clone(),
                             threshold=round(self.threshold.value(), 4), side=self.side.currentData(),
                             read=condition_read(vs))

    def _on_browse(self) -> None:
        path = QFileDialog.getOpenFileName(self, "Condition vectors", "", "Vector sets (*.safetensors)")[0]
        if path:
            self.load_file(path)

    def _on_file_edited(self) -> None:
        text = self.file.text().strip()
        if text and text != self._source:
            self.load_file(text)


# -------------------------------------------------------------------------- the calibration view

class ConditionPanel(QWidget):
    """Calibrate a gate on a condition set and pick its threshold on the score histogram."""

    gate_chosen = Signal(object)
    """'Use this gate': a :class:`GateChoice`."""
    finished = Signal(object)
    """A calibration this panel started finished: its ``CalibrateResult``."""
    status_message = Signal(str)
    """A short message for the status bar."""
    error_occurred = Signal(str, str)
    """A problem to show: (title, message)."""

    def __init__(self, controller: Any = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.controller = controller
        self._job: Any = None
        self._result: Any = None
        self._scores = np.zeros((0, 0))
        self._labels = np.zeros(0, dtype=bool)

        self.dataset = QComboBox()
        self.dataset.setObjectName("conditionDataset")
        self.dataset.setEditable(True)
        self.dataset.setToolTip("A bundled condition set, or a JSONL file: {\"prompt\", \"on\": true/false, "
                                "\"split\": train/heldout} per line")
        self.dataset.lineEdit().setPlaceholderText("bundled set or .jsonl file")
        self.dataset_browse = QToolButton()
        self.dataset_browse.setText("…")
        self.vectors_file = QLineEdit()
        self.vectors_file.setObjectName("conditionVectorsFile")
        self.vectors_file.setPlaceholderText("empty: compute from the set's train split")
        self.vectors_browse = QToolButton()
        self.vectors_browse.setText("…")
        self.read = QComboBox()
        self.read.addItem("mean over prompt", "mean")
        self.read.addItem("last prompt token", "last")
        self.read.setToolTip("How prompts are read when condition vectors are computed here")
        self.calibrate_button = QPushButton("Calibrate")
        self.calibrate_button.setObjectName("calibrateButton")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.summary = QLabel("Calibrate to see the scores.")
        self.summary.setObjectName("calibrationSummary")
        self.summary.setWordWrap(True)

        self.layer = QComboBox()
        self.layer.setObjectName("calibrationLayer")
        self.side = QComboBox()
        self.side.setObjectName("calibrationSide")
        for s in SIDES:
            self.side.addItem(f"gate opens {s}", s)
        self.threshold = QDoubleSpinBox()
        self.threshold.setObjectName("calibrationThreshold")
        self.threshold.setRange(-1.0, 1.0)
        self.threshold.setDecimals(4)
        self.threshold.setSingleStep(0.005)
        self.plot = pg.PlotWidget()
        self.plot.setObjectName("calibrationPlot")
        self.plot.setMenuEnabled(False)
        self.plot.setMinimumSize(260, 160)
        # the plot takes the height that is left (its own size hint is 480 px: the dock would scroll)
        self.plot.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Ignored)
        self.plot.setLabel("bottom", "CAST score")
        self.plot.getAxis("bottom").enableAutoSIPrefix(False)  # scores as they are, not in thousandths
        self.plot.setLabel("left", "prompts")
        self.plot.getAxis("left").enableAutoSIPrefix(False)  # counts, never "prompts (x0.001)"
        self.plot.setXRange(-1.0, 1.0, padding=0.02)  # before a calibration: the score's whole range ...
        self.plot.setYRange(0, 1, padding=0)  # ... and no fractional prompt counts
        self.plot.addLegend(offset=(5, 5))
        self.plot.hideButtons()  # no auto-range "A": the ranges follow the shown layer
        self.plot.getViewBox().setMouseEnabled(x=False, y=False)
        self.pos_curve = self.plot.plot([0.0, 1.0], [0.0], stepMode="center", fillLevel=0, brush=POS_BRUSH,
                                        pen=pg.mkPen(POS_BRUSH[:3]), name="on-condition")
        self.neg_curve = self.plot.plot([0.0, 1.0], [0.0], stepMode="center", fillLevel=0, brush=NEG_BRUSH,
                                        pen=pg.mkPen(NEG_BRUSH[:3]), name="off-condition")
        self.line = pg.InfiniteLine(pos=0.0, angle=90, movable=True, pen=pg.mkPen((40, 40, 40), width=2),
                                    hoverPen=pg.mkPen((230, 126, 34), width=3))
        self.line.setToolTip("Drag: the gate's threshold")
        self.plot.addItem(self.line)
        self.counts = QLabel("")
        self.counts.setObjectName("confusionCounts")
        self.counts.setWordWrap(True)
        self.use_button = QPushButton("Use this gate")
        self.use_button.setObjectName("useGateButton")
        self.use_button.setToolTip("Fill the generation pane's gate with these condition vectors, layer, "
                                   "threshold and side")
        self.save_button = QPushButton("Save vectors…")
        self.save_button.setToolTip("Save the condition vectors (a file for the gate or 'generate --condition')")
        for w in (self.use_button, self.save_button, self.layer, self.side, self.threshold):
            w.setEnabled(False)

        form = QGridLayout()
        form.addWidget(QLabel("Condition set"), 0, 0)
        form.addWidget(self.dataset, 0, 1)
        form.addWidget(self.dataset_browse, 0, 2)
        form.addWidget(QLabel("Vectors"), 1, 0)
        form.addWidget(self.vectors_file, 1, 1)
        form.addWidget(self.vectors_browse, 1, 2)
        form.addWidget(QLabel("Read"), 2, 0)
        form.addWidget(self.read, 2, 1, 1, 2)
        form.setColumnStretch(1, 1)
        run_row = QHBoxLayout()
        run_row.addWidget(self.calibrate_button)
        run_row.addWidget(self.stop_button)
        run_row.addWidget(self.progress, 1)
        pick = QHBoxLayout()
        pick.addWidget(QLabel("Layer"))
        pick.addWidget(self.layer)
        pick.addWidget(self.side)
        pick.addWidget(self.threshold)
        pick.addStretch(1)
        use_row = QHBoxLayout()
        use_row.addWidget(self.use_button)
        use_row.addWidget(self.save_button)
        use_row.addStretch(1)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(run_row)
        layout.addWidget(self.summary)
        layout.addLayout(pick)
        layout.addWidget(self.counts)
        layout.addLayout(use_row)
        layout.addWidget(self.plot, 1)  # last: on a short screen the plot gives, the counts stay in view

        self.calibrate_button.clicked.connect(self.calibrate)
        self.stop_button.clicked.connect(lambda: self.controller.stop("calibrate") if self.controller else None)
        self.dataset_browse.clicked.connect(self._browse_dataset)
        self.vectors_browse.clicked.connect(self._browse_vectors)
        self.layer.currentIndexChanged.connect(self._layer_changed)
        self.side.currentIndexChanged.connect(self._update_counts)
        self.threshold.valueChanged.connect(self._threshold_typed)
        self.line.sigPositionChanged.connect(self._line_moved)
        self.use_button.clicked.connect(self.use_gate)
        self.save_button.clicked.connect(self._save_vectors)
        if controller is not None:
            controller.model_ready.connect(lambda _info: self._offer_bundled())

    # -- inputs --------------------------------------------------------------------------
    def _offer_bundled(self) -> None:
        from ...core.condition import bundled_conditions

        current = self.dataset.currentText()
        names = sorted(bundled_conditions())
        if [self.dataset.itemText(i) for i in range(self.dataset.count())] == names:
            return
        self.dataset.clear()
        self.dataset.addItems(names)
        self.dataset.setCurrentText(current or (names[0] if names else ""))

    def _browse_dataset(self) -> None:
        path = QFileDialog.getOpenFileName(self, "Condition set", "", "Condition sets (*.jsonl)")[0]
        if path:
            self.dataset.setCurrentText(path)

    def _browse_vectors(self) -> None:
        path = QFileDialog.getOpenFileName(self, "Condition vectors", "", "Vector sets (*.safetensors)")[0]
        if path:
            self.vectors_file.setText(path)

    def build_spec(self) -> Any:
        """The ``CalibrateSpec`` of the panel. Raises ``SteerdeskError`` for a missing or bad set or vector file."""
        from ...core.condition import load_condition_set
        from ...core.errors import SteerdeskError
        from ...jobs import CalibrateSpec

        name = self.dataset.currentText().strip()
        if not name:
            raise SteerdeskError("Pick a condition set (a bundled one or a .jsonl file).")
        dataset = load_condition_set(name)
        path = self.vectors_file.text().strip()
        info = self.controller.model_info if self.controller is not None else None
        conditions = _load_conditions(path, info) if path else None
        return CalibrateSpec(dataset=dataset, conditions=conditions, read=self.read.currentData())

    def calibrate(self) -> None:
        """Calibrate (the Calibrate button): submit the Spec; the result fills the histogram."""
        try:
            spec = checked(self.controller, self.build_spec, "Cannot calibrate")
        except Refused as exc:
            self.error_occurred.emit(exc.title, str(exc))
            return
        self.calibrate_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self.progress.setRange(0, 0)
        self._job = job = self.controller.submit(spec)
        job.progress.connect(self._on_progress)
        job.finished.connect(self.show_result)
        job.ended.connect(lambda: self._idle() if self._job is job else None)

    def _idle(self) -> None:
        self.calibrate_button.setEnabled(True)
        self.stop_button.setEnabled(False)
        self.progress.setRange(0, 1)
        self.progress.setValue(1 if self._result is not None else 0)
        self.progress.setFormat("done" if self._result is not None else "")

    def _on_progress(self, done: int, total: int, message: str) -> None:
        self.progress.setRange(0, max(total, 0))
        self.progress.setValue(done if total > 0 else 0)
        self.progress.setFormat(f"{message} %v/%m" if total > 0 else message)

    # -- result --------------------------------------------------------------------------
    def show_result(self, result: Any) -> None:
        """Show a ``CalibrateResult``: summary, the best layer's histogram and threshold."""
        self._result = result
        cal = result.calibration
        self._scores = cal.scores.float().numpy()
        self._labels = cal.labels.bool().numpy()
        op = ">" if cal.side == "above" else "<"
        origin = "computed from the train split" if result.computed else "from the file"
        self.summary.setText(f"Best: layer {cal.layer}, score {op} {cal.threshold:.4f} — F1 {cal.f1:.3f} "
                             f"(precision {cal.precision:.3f}, recall {cal.recall:.3f}) on {result.num_prompts} "
                             f"prompts; condition vectors {origin}, read: {cal.read}.")
        self.layer.blockSignals(True)
        self.layer.clear()
        for layer in cal.layers:
            self.layer.addItem(str(layer), layer)
        self.layer.setCurrentIndex(max(0, self.layer.findData(cal.layer)))
        self.layer.blockSignals(False)
        for w in (self.use_button, self.save_button, self.layer, self.side, self.threshold):
            w.setEnabled(True)
        self._layer_changed()
        self.status_message.emit(f"Calibrated in {result.seconds:.1f} s: layer {cal.layer}, F1 {cal.f1:.3f}.")
        self.finished.emit(result)

    def current_layer(self) -> int:
        """The layer whose scores are shown."""
        return int(self.layer.currentData())

    def _row(self) -> int:
        return list(self._result.calibration.layers).index(self.current_layer())

    def _layer_changed(self, *_: Any) -> None:
        """Another layer: its histogram, and its own best threshold and side from the calibration table."""
        if self._result is None or self.layer.currentIndex() < 0:
            return
        _layer, thr, side, _f1, _p, _r = self._result.calibration.table[self._row()]
        scores = self._scores[self._row()]
        lo, hi = float(scores.min()), float(scores.max())
        pad = max((hi - lo) * 0.05, 1e-3)
        edges = np.linspace(lo - pad, hi + pad, 31)
        pos, neg = np.histogram(scores[self._labels], edges)[0], np.histogram(scores[~self._labels], edges)[0]
        self.pos_curve.setData(edges, pos)
        self.neg_curve.setData(edges, neg)
        self.plot.setXRange(float(edges[0]), float(edges[-1]), padding=0.02)
        self.plot.setYRange(0, max(int(pos.max()), int(neg.max()), 1) * 1.15, padding=0)
        self.line.setBounds((lo - pad, hi + pad))
        self.side.blockSignals(True)
        self.side.setCurrentIndex(max(0, self.side.findData(side)))
        self.side.blockSignals(False)
        self.set_threshold(thr)

    def set_threshold(self, value: float) -> None:
        """Move the threshold (line and box) to ``value``; the counts follow."""
        self.line.setValue(value)  # -> _line_moved

    def threshold_value(self) -> float:
        """The threshold the line marks."""
        return float(self.line.value())

    def _line_moved(self, *_: Any) -> None:
        value = float(self.line.value())
        self.threshold.blockSignals(True)
        self.threshold.setValue(value)
        self.threshold.blockSignals(False)
        self._update_counts()

    def _threshold_typed(self, value: float) -> None:
        if abs(float(self.line.value()) - value) > 1e-9:
            self.line.setValue(value)

    def confusion_now(self) -> tuple[int, int, int, int]:
        """``(TP, FP, FN, TN)`` of the shown layer at the line's threshold and the chosen side."""
        return confusion(self._scores[self._row()], self._labels, self.threshold_value(), self.side.currentData())

    def _update_counts(self, *_: Any) -> None:
        if self._result is None:
            return
        tp, fp, fn, tn = self.confusion_now()
        p, r, f1 = rates(tp, fp, fn)
        self.counts.setText(f"TP {tp}   FP {fp}   FN {fn}   TN {tn}   ·   precision {p:.3f}   recall {r:.3f}   "
                            f"F1 {f1:.3f}")

    def choice(self) -> GateChoice | None:
        """The gate shown now (None before a calibration)."""
        if self._result is None:
            return None
        cal = self._result.calibration
        name = self._result.conditions.metadata.get("dataset_name", "") or "condition"
        label = self.vectors_file.text().strip() if not self._result.computed else f"{name} (calibrated, {cal.read})"
        return GateChoice(self._result.conditions, label, self.current_layer(), round(self.threshold_value(), 4),
                          self.side.currentData())

    def use_gate(self) -> None:
        """'Use this gate': hand the gate to the generation pane (``gate_chosen``)."""
        choice = self.choice()
        if choice is not None:
            self.gate_chosen.emit(choice)
            op = ">" if choice.side == "above" else "<"
            self.status_message.emit(f"Gate set in the generation pane: layer {choice.layer}, "
                                     f"score {op} {choice.threshold:g}.")

    def _save_vectors(self) -> None:
        from ...core.errors import SteerdeskError
        from ...core.vectors import save_vectors

        if self._result is None:
            return
        path = QFileDialog.getSaveFileName(self, "Save condition vectors", "condition.safetensors",
                                           "Vector sets (*.safetensors)")[0]
        if not path:
            return
        try:
            save_vectors(self._result.conditions, Path(path))
        except (SteerdeskError, OSError) as exc:
            self.error_occurred.emit("Could not save the condition vectors", str(exc))
            return
        self.status_message.emit(f"Saved {path}")


__all__ = ["ConditionPanel", "GateChoice", "GateGroup", "confusion", "rates"]
