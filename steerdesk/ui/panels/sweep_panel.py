"""Sweep panel: the layers x scales heatmap of behaviour margin, filled live, click to try a cell."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QRectF, Qt, Signal
from PySide6.QtGui import QBrush, QColor, QPainterPath, QPen
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGraphicsPathItem,
    QGraphicsRectItem,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..vector_sets import VectorSets
from ..widgets.heatmap import HeatmapView
from .condition_panel import GateChoice
from .inputs import PairsSource, Refused, need_heldout, need_model, need_vectors


@dataclass(frozen=True)
class CellChoice:
    """A clicked sweep cell: steer with set ``name`` at ``layers`` x ``scale`` with the sweep's
    ``mode``, ``normalize`` and ``positions`` (the cell's full settings)."""

    name: str
    layers: list[int]
    scale: float
    mode: str
    normalize: bool = False
    positions: str = "all"
    gate: Any = None  # the sweep's gate as a condition_panel.GateChoice (None: the sweep was not gated)

    def describe(self) -> str:
        """The settings in one line (what the generation pane loads)."""
        where = f"layer {self.layers[0]}" if len(self.layers) == 1 else f"layers {','.join(map(str, self.layers))}"
        gate = "" if self.gate is None else (f", gate at layer {self.gate.layer} "
                                             f"({self.gate.side} {self.gate.threshold:g})")
        return (f"{self.name or 'the current vector set'}, {where}, scale {self.scale:g}, mode {self.mode}, "
                f"normalize {'on' if self.normalize else 'off'}, positions {self.positions}{gate}")


class SweepPanel(QWidget):
    """Controls for a scored sweep and its heatmap (colour = margin delta vs unsteered)."""

    started = Signal()
    """A sweep was submitted (the window shows this panel)."""
    cell_chosen = Signal(object)
    """A cell was clicked: a :class:`CellChoice` to try in the generation pane."""
    error_occurred = Signal(str, str)
    """A problem to show: (title, message)."""
    status_message = Signal(str)
    """A short message for the status bar."""

    def __init__(self, controller: Any = None, vector_sets: VectorSets | None = None,
                 pairs: PairsSource | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.controller = controller  # a ModelController (None: a panel that only renders)
        self._job: Any = None  # the last job submitted here (its end clears the busy state)
        self.vector_sets = vector_sets if vector_sets is not None else VectorSets(self)
        self.pairs = pairs
        self._swept = ""  # name of the vector set being swept
        self._swept_with: tuple[str, bool, str] | None = None  # (mode, normalize, positions) of the sweep
        self._swept_gate: Any = None  # the GateChoice the sweep ran with (None: not gated)
        self._built_gate: Any = None  # the GateChoice of the last Spec built
        self.result: Any = None
        self._rows: list[list[int]] = []
        self._row_labels: list[str] = []
        self._scales: list[float] = []
        self._margin = np.zeros((1, 1), dtype=np.float32)
        self._fluency = np.zeros((1, 1), dtype=np.float32)
        self._overlays: list[Any] = []
        self._no_vector: set[int] = set()  # rows the vector set has no direction for

        self.layers = QLineEdit()
        self.layers.setPlaceholderText("all layers (or e.g. 4-20, or 8,12,16)")
        self.sets = QLineEdit()
        self.sets.setPlaceholderText("optional sets, e.g. mid=12,15;late=20-24")
        self.scales = QLineEdit("0,0.5,1,1.5,2")
        self.scales.setToolTip("Comma-separated scales; 0 is the unsteered reference (delta 0).")
        self.mode = QComboBox()
        for m in ("add", "project", "clamp"):
            self.mode.addItem(m, m)
        self.budget = QDoubleSpinBox()
        self.budget.setRange(0.0, 50.0)
        self.budget.setSingleStep(0.1)
        self.budget.setValue(0.5)
        self.budget.setToolTip("Largest acceptable drop of mean log-prob per token (nats) of the replies; "
                               "cells beyond it are hatched.")
        self.max_pairs = QSpinBox()
        self.max_pairs.setRange(1, 10000)
        self.max_pairs.setValue(16)
        self.max_pairs.setToolTip("Held-out pairs scored per cell (from the dataset's held-out split).")
        self.positions = QLineEdit("all")
        self.positions.setObjectName("sweepPositions")
        self.positions.setPlaceholderText("all, prompt, generated, first:N, gen:A-B, gen:A-, prompt:A-B")
        self.positions.setToolTip("Tokens to steer: all, prompt, generated, or a window: first:N (the first N "
                                  "reply tokens), gen:A-B / gen:A- (reply tokens A..B, 0-based), prompt:A-B.")
        # Optional condition gate (CAST): steer only the pairs whose prompt opens it.
        self.condition = QLineEdit()
        self.condition.setObjectName("sweepCondition")
        self.condition.setPlaceholderText("no gate (condition vector file)")
        self.condition.setToolTip("Condition vectors (steerdesk calibrate): only pairs whose prompt opens the gate "
                                  "are steered; the others are scored unsteered. KL on neutral texts is not gated.")
        self.condition_browse = QToolButton()  # a tool button's minimum is its text, not 80 px
        self.condition_browse.setText("…")
        self.condition_browse.setToolTip("Choose a condition vector file")
        self.gate_layer = QSpinBox()
        self.gate_layer.setRange(0, 999)
        self.gate_layer.setPrefix("L ")
        self.gate_layer.setToolTip("The gate's layer")
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(-1.0, 1.0)
        self.threshold.setDecimals(4)
        self.threshold.setSingleStep(0.01)
        self.threshold.setToolTip("The gate's threshold on the CAST score (-1..1)")
        self.gate_side = QComboBox()
        for side in ("above", "below"):
            self.gate_side.addItem(side, side)
        self.gate_side.setToolTip("Open the gate when the score is above or below the threshold")
        self.run_button = QPushButton("Run sweep")
        self.run_button.setObjectName("sweepButton")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.save_button = QPushButton("Save JSON…")
        self.save_button.setEnabled(False)
        self.progress = QProgressBar()
        self.summary = QLabel("Run a sweep to see where the vector steers. Click a cell to try it.")
        self.summary.setWordWrap(True)
        self.scored = QLabel("")  # which vector set the sweep scores
        self.scored.setObjectName("sweepVector")
        self.scored.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Layers", self.layers)
        form.addRow("Layer sets", self.sets)
        form.addRow("Scales", self.scales)
        form.addRow("Mode", self.mode)
        form.addRow("Fluency budget", self.budget)
        form.addRow("Held-out pairs", self.max_pairs)
        form.addRow("Positions", self.positions)
        gate_file = QHBoxLayout()
        gate_file.setContentsMargins(0, 0, 0, 0)
        gate_file.addWidget(self.condition, 1)
        gate_file.addWidget(self.condition_browse)
        form.addRow("Gate", gate_file)
        gate_at = QHBoxLayout()
        gate_at.setContentsMargins(0, 0, 0, 0)
        gate_at.addWidget(self.gate_layer)
        gate_at.addWidget(self.threshold)
        gate_at.addWidget(self.gate_side)
        gate_at.addStretch(1)
        form.addRow("Gate opens at", gate_at)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.save_button)
        box = QGroupBox("Scored sweep (behaviour margin vs fluency)")
        bl = QVBoxLayout(box)
        bl.addWidget(self.scored)
        bl.addLayout(form)
        bl.addLayout(buttons)
        bl.addWidget(self.progress)

        self.heatmap = HeatmapView("Margin delta (target - base log-prob / token)", row_label="layer",
                                   col_label="scale")
        self.heatmap.describe = self._describe
        self.best_marker = pg.ScatterPlotItem(size=18, symbol="star", brush=pg.mkBrush(255, 215, 0),
                                              pen=pg.mkPen("k", width=1))
        self.heatmap.plot.addItem(self.best_marker)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(box)
        layout.addWidget(self.heatmap, 1)
        layout.addWidget(self.summary)

        for sig in (self.vector_sets.changed, self.vector_sets.selected_changed, self.vector_sets.steering_changed):
            sig.connect(self._show_scored)
        self._show_scored()
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.save_button.clicked.connect(self._on_save)
        self.condition_browse.clicked.connect(self._choose_condition)
        self.heatmap.cell_clicked.connect(self._on_cell_clicked)

    # -- settings ------------------------------------------------------------------------
    def settings(self, num_layers: int) -> dict[str, Any]:
        """Parsed controls; raises ``SteerdeskError`` with a sentence on bad text."""
        from ...core.parsing import parse_layers, parse_positions, parse_scales, parse_sets

        text = self.layers.text().strip()
        layers = parse_layers(text, num_layers) if text else list(range(num_layers))
        sets = parse_sets(self.sets.text(), num_layers) if self.sets.text().strip() else {}
        positions = self.positions.text().replace(" ", "") or "all"
        parse_positions(positions)  # the one parser: one line naming the accepted forms
        return {"layers": layers, "sets": sets, "scales": parse_scales(self.scales.text()),
                "mode": self.mode.currentData(), "fluency_budget": self.budget.value(),
                "max_pairs": self.max_pairs.value(), "positions": positions}

    def gate_choice(self, info: Any) -> GateChoice | None:
        """The gate controls as a :class:`GateChoice` (condition vectors loaded and checked), or None
        when no condition file is given.

        Raises ``SteerdeskError`` for a missing or unreadable file, vectors that are not conditions
        or do not fit the model ``info``, or a layer they have no direction for.
        """
        path = self.condition.text().strip()
        if not path:
            return None
        from pathlib import Path

        from ...core.condition import condition_read
        from ...core.errors import SteerdeskError
        from ...core.vectors import load_vectors

        if not Path(path).is_file():
            raise SteerdeskError(f"Condition vector file not found: {path}")
        cs = load_vectors(path, model_layers=info.num_layers)
        cs.check_compatible(info)
        condition_read(cs)  # refuses steering vectors
        layer = self.gate_layer.value()
        cs.require_layers([layer])
        return GateChoice(cs, path, layer, round(self.threshold.value(), 4), str(self.gate_side.currentData()))

    def gate(self, info: Any) -> Any:
        """The ``ConditionGate`` of the gate controls, or None when no condition file is given
        (errors: :meth:`gate_choice`)."""
        from ...core.condition import ConditionGate, condition_read

        choice = self._built_gate = self.gate_choice(info)
        if choice is None:
            return None
        cs = choice.conditions
        return ConditionGate(choice.layer, cs.directions[choice.layer], choice.threshold, choice.side,
                             condition_read(cs))

    def _choose_condition(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Condition vectors", "", "Vectors (*.safetensors *.gguf)")
        if path:
            self.condition.setText(path)

    def _show_scored(self, *_: Any) -> None:
        """Say which vector set the shown (or running) sweep scores and which one Run sweep would."""
        item = self.vector_sets.for_analysis()
        nxt = (f"Run sweep scores <b>{item.name}</b> (the generation pane's set, else the one selected in "
               "Vectors)." if item is not None else "No usable vector set: compute or load one for this model.")
        if self._swept_with is None:
            self.scored.setText(nxt)
            return
        busy = self.cancel_button.isEnabled()
        head = f"{'Scoring' if busy else 'Shown: the sweep of'} <b>{self._swept}</b> ({self._swept_with[0]}). "
        self.scored.setText(head + ("" if busy else nxt))

    def build_spec(self) -> Any:
        """The ``SweepSpec`` of the controls on the analysis vector set and the held-out pairs.

        Raises :class:`Refused` for a missing model, set or split, ``SteerdeskError`` for bad text.
        """
        from ...jobs import SweepSpec

        info = need_model(self.controller)
        item = need_vectors(self.vector_sets)
        heldout = need_heldout(self.pairs)
        assert self.pairs is not None
        st = self.settings(info.num_layers)
        return SweepSpec(vectors=item.vectors, heldout=heldout, layers=tuple(st["layers"]),
                         scales=tuple(st["scales"]), sets={k: tuple(v) for k, v in st["sets"].items()} or None,
                         mode=st["mode"], fluency_budget=st["fluency_budget"], max_pairs=st["max_pairs"],
                         positions=st["positions"], gate=self.gate(info),
                         dataset=self.pairs.dataset(), heldout_fraction=self.pairs.heldout_fraction())

    def run(self) -> None:
        """Run sweep: submit the Spec, fill the heatmap cell by cell, show the result."""
        from ...core.errors import SteerdeskError

        try:
            spec = self.build_spec()
        except Refused as exc:
            self.error_occurred.emit(exc.title, str(exc))
            return
        except SteerdeskError as exc:
            self.error_occurred.emit("Cannot run the sweep", str(exc))
            return
        item = self.vector_sets.for_analysis()
        self._swept = item.name if item is not None else str(spec.vectors.metadata.get("name", ""))
        self._swept_with = (spec.mode, spec.normalize, spec.positions)
        self._swept_gate = self._built_gate if spec.gate is not None else None
        self.start(list(spec.layers), {k: list(v) for k, v in (spec.sets or {}).items()}, list(spec.scales),
                   spec.fluency_budget, vectors=spec.vectors)  # no-vector rows show as such from the start
        self.set_busy(True)
        self._show_scored()
        self.started.emit()
        self._job = job = self.controller.submit(spec)
        job.partial.connect(lambda c: self.set_cell(c.row, c.col, c.margin_delta, c.fluency_delta))
        job.progress.connect(lambda done, total, _msg: self.set_progress(done, total))
        job.finished.connect(self._on_finished)
        job.cancelled.connect(self.stopped)
        job.ended.connect(lambda: (self.set_busy(False), self._show_scored()) if self._job is job else None)

    def cancel(self) -> None:
        """Stop the running sweep."""
        if self.controller is not None:
            self.controller.stop("sweep")

    def _on_finished(self, result: Any) -> None:
        self.set_busy(False)
        self.finish(result)
        self.status_message.emit(f"Sweep done in {result.seconds:.1f} s ({result.path} path).")

    def set_busy(self, busy: bool) -> None:
        """Run disabled and Cancel enabled while busy."""
        self.run_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)

    # -- live filling --------------------------------------------------------------------
    def start(self, layers: list[int], sets: dict[str, list[int]], scales: list[float], budget: float,
              vectors: Any = None) -> None:
        """Prepare an empty (NaN) grid for a new sweep.

        With ``vectors`` (the set being swept), rows whose layer(s) it has no direction for are
        marked "no vector" at once (they are not evaluated); otherwise they are marked at the end.
        """
        self.result = None
        self._rows = [[layer] for layer in layers] + [list(v) for v in sets.values()]
        self._row_labels = [str(layer) for layer in layers] + list(sets)
        self._scales = list(scales)
        self._budget = budget
        self._margin = np.full((len(self._rows), len(scales)), np.nan, dtype=np.float32)
        self._fluency = np.full_like(self._margin, np.nan)
        self._clear_overlays()
        self._no_vector = set()
        if vectors is not None:
            from ...core.sweep import rows_without_direction

            self._no_vector = {r for r, m in enumerate(rows_without_direction(vectors, self._rows)) if m}
        for row in sorted(self._no_vector):
            self._mark_no_vector(row)
        self.best_marker.setData([], [])
        self.progress.setRange(0, 0)
        self.save_button.setEnabled(False)
        self.summary.setText("Sweeping…")
        self._redraw()

    def set_progress(self, done: int, total: int) -> None:
        """Show ``done`` of ``total`` sweep steps."""
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(done)

    def set_cell(self, row: int, col: int, margin: float | None, fluency: float | None) -> None:
        """One finished cell (called as the sweep goes)."""
        if not (0 <= row < self._margin.shape[0] and 0 <= col < self._margin.shape[1]):
            return
        self._margin[row, col] = np.nan if margin is None else margin
        self._fluency[row, col] = np.nan if fluency is None else fluency
        if fluency is not None and -fluency > self._budget:
            self._hatch(row, col)
        self._redraw()

    def stopped(self) -> None:
        """A stopped sweep: the scored cells keep every view of a finished one (best so far starred,
        hover, click to generate); the summary says how far it got."""
        scored = np.isfinite(self._margin) & np.isfinite(self._fluency)
        total = int(self._margin.size - len(self._no_vector) * self._margin.shape[1])
        ok = scored & (-self._fluency <= self._budget)
        text = f"Stopped after {int(scored.sum())} of {total} cells."
        if ok.any():
            row, col = np.unravel_index(np.where(ok, self._margin, -np.inf).argmax(), self._margin.shape)
            self.best_marker.setData([col + 0.5], [row + 0.5])
            text += (f" Best so far within the fluency budget: {self._row_name(int(row))} at scale "
                     f"{self._scales[int(col)]:g} — margin {self._margin[row, col]:+.3f}.")
        self.summary.setText(text + " Click a scored cell to generate with it.")

    def finish(self, result: Any) -> None:
        """The full result: exact values, the best cell starred, JSON saving enabled."""
        self.result = result
        for row in range(result.n_rows):
            for col in range(len(result.scales)):
                m, f = result.cell(row, col)
                self._margin[row, col] = np.nan if m is None else m
                self._fluency[row, col] = np.nan if f is None else f
        self._clear_overlays()
        self._no_vector = {row for row in range(result.n_rows) if not result.row_has_vector(row)}
        for row in range(result.n_rows):
            if row in self._no_vector:
                self._mark_no_vector(row)
                continue
            for col in range(len(result.scales)):
                if not result.within_budget(row, col):
                    self._hatch(row, col)
        self._redraw()
        best = result.best
        if best:
            row, col = int(best["row"]), int(best["col"])
            self.best_marker.setData([col + 0.5], [row + 0.5])
            self.summary.setText(
                f"Best within the fluency budget: {self._row_name(row)} at scale {self._scales[col]:g} — margin "
                f"{self._margin[row, col]:+.3f}, fluency {self._fluency[row, col]:+.3f} nats/token. "
                f"Click any cell to generate with it.")
        else:
            self.summary.setText("No cell raised the margin within the fluency budget.")
        if self._no_vector:
            names = ", ".join(self._row_name(r) for r in sorted(self._no_vector))
            self.summary.setText(self.summary.text() + f" No vector (not evaluated): {names}.")
        gate = getattr(result, "gate", None)
        if gate:
            self.summary.setText(self.summary.text() + f" Gate open for {gate.get('n_open')} of "
                                 f"{gate.get('n_prompts')} prompts (the others scored unsteered; KL not gated).")
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        self.save_button.setEnabled(True)

    def _row_name(self, row: int) -> str:
        label = self._row_labels[row]
        return f"layer {label}" if label.isdigit() else f"set {label} ({','.join(map(str, self._rows[row]))})"

    def _redraw(self) -> None:
        finite = self._margin[np.isfinite(self._margin)]
        m = float(np.abs(finite).max()) if finite.size else 1.0
        self.heatmap.set_data(self._margin, levels=(-(m or 1.0), m or 1.0),
                              col_ticks=[(i + 0.5, f"{s:g}") for i, s in enumerate(self._scales)])
        if self._row_labels:  # rows are the swept layers (and sets), not 0..n
            step = max(1, -(-len(self._row_labels) // 16))
            ticks = [(i + 0.5, lbl) for i, lbl in enumerate(self._row_labels) if i % step == 0 or not lbl.isdigit()]
            self.heatmap.plot.getAxis("left").setTicks([ticks])

    def _hatch(self, row: int, col: int) -> None:
        """A cell beyond the fluency budget: diagonal lines drawn dark on a white halo, so they show on
        the darkest and the lightest cells alike."""
        path = QPainterPath()
        for k in (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75):  # lines x + y = k inside the unit cell
            x0, y0 = max(0.0, k - 1.0), min(1.0, k)
            x1, y1 = min(1.0, k), max(0.0, k - 1.0)
            path.moveTo(col + x0, row + y0)
            path.lineTo(col + x1, row + y1)
        for colour, width, z in (((255, 255, 255, 230), 3.2, 5), ((25, 25, 25, 240), 1.3, 5.1)):
            item = QGraphicsPathItem(path)
            pen = QPen(QColor(*colour), width)
            pen.setCosmetic(True)  # pixels, whatever the zoom
            item.setPen(pen)
            item.setZValue(z)
            self.heatmap.plot.addItem(item)
            self._overlays.append(item)

    def _mark_no_vector(self, row: int) -> None:
        """A row the vector set has no direction for: hatched across, labelled "no vector" (no value)."""
        n = max(1, len(self._scales))
        rect = QGraphicsRectItem(QRectF(0, row, n, 1))
        rect.setBrush(QBrush(QColor(120, 110, 90, 220), Qt.BrushStyle.DiagCrossPattern))
        rect.setPen(QPen(Qt.PenStyle.NoPen))
        rect.setZValue(6)
        self.heatmap.plot.addItem(rect)
        label = pg.TextItem("no vector", color=(40, 40, 40), fill=pg.mkBrush(236, 232, 220, 230), anchor=(0.5, 0.5))
        label.setPos(n / 2, row + 0.5)
        label.setZValue(7)
        self.heatmap.plot.addItem(label)
        self._overlays.extend([rect, label])

    def no_vector_rows(self) -> list[int]:
        """Rows shown as "no vector" (the set has no direction for their layer(s))."""
        return sorted(self._no_vector)

    def _clear_overlays(self) -> None:
        for item in self._overlays:
            self.heatmap.plot.removeItem(item)
        self._overlays = []

    def _describe(self, row: int, col: int, value: float) -> str:
        if not self._rows:
            return ""
        if row in self._no_vector:
            return (f"{self._row_name(row)}: no vector — the vector set has no direction for this layer, "
                    f"so it was not evaluated")
        f = self._fluency[row, col]
        over = "" if not np.isfinite(f) or -f <= self._budget else "  (beyond the fluency budget)"
        if not math.isfinite(value):
            return f"{self._row_name(row)}, scale {self._scales[col]:g}: not scored yet"
        return (f"{self._row_name(row)}, scale {self._scales[col]:g}: margin {value:+.3f}, fluency {f:+.3f}"
                f"{over} — click to generate")

    def _on_cell_clicked(self, row: int, col: int) -> None:
        if row in self._no_vector:
            self.status_message.emit(f"{self._row_name(row)}: no vector to steer with.")
            return
        if self._rows and row < len(self._rows) and col < len(self._scales):
            mode, normalize, positions = self._swept_with or self._result_settings()
            self.cell_chosen.emit(CellChoice(self._swept, list(self._rows[row]), float(self._scales[col]),
                                             mode, normalize, positions, self._swept_gate))

    def _result_settings(self) -> tuple[str, bool, str]:
        """(mode, normalize, positions) the shown result was swept with (the controls when unknown)."""
        st = dict(getattr(self.result, "settings", None) or {})
        return (str(st.get("mode", self.mode.currentData())), bool(st.get("normalize", False)),
                str(st.get("positions", "all")))

    def margin(self) -> np.ndarray:
        """The margin deltas shown, ``[rows, scales]`` (NaN where not scored)."""
        return self._margin

    def _on_save(self) -> None:
        from ...core.errors import SteerdeskError

        if self.result is None:
            return
        path = QFileDialog.getSaveFileName(self, "Save sweep", "sweep.json", "JSON (*.json)")[0]
        if path:
            try:
                self.result.save(path)
                self.status_message.emit(f"Saved {path}")
            except SteerdeskError as exc:
                self.error_occurred.emit("Could not save the sweep", str(exc))
