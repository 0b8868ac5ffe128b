"""Analysis: vector diagnostics, prompt versus vector, the generation grid, and the run history."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QTextEdit,
    QVBoxLayout,
    QWidget,
)

from ..layout import Reflow
from ..vector_sets import VectorSets
from ..widgets.heatmap import HeatmapView, _match_palette
from .inputs import PairsSource, Refused, need_heldout, need_model, need_vectors
from .methods_tab import MethodsTab

WRITE_ERRORS = (OSError,)  # with SteerdeskError (imported lazily): a failed write is shown, never lost


class SteeringSource(Protocol):
    """The generation pane's prompt, steering and sampling (versus and the grid reuse them)."""

    def build_spec(self) -> Any:
        """The pane's ``GenerateSpec`` (``SteerdeskError`` with a sentence)."""

    def sampling(self) -> Any:
        """The pane's ``SamplingSettings``."""

    def selected_layers(self) -> list[int]:
        """The layers picked in the pane."""

    def steering_options(self) -> tuple[str, bool]:
        """``(mode, normalize)``."""


class DiagnosticsTab(QWidget):
    """Per-layer separation (AUC, d'), consistency, relative norm; layer x layer cosine matrix."""

    run_requested = Signal()
    """The user pressed Diagnose (the analysis panel submits the job)."""

    def __init__(self) -> None:
        super().__init__()
        _match_palette()
        self.run_button = QPushButton("Diagnose on held-out pairs")
        self.run_button.setObjectName("diagnoseButton")
        self.summary = QLabel("Separation of base and target along each layer's direction, on pairs the vector "
                              "was not computed from.")
        self.summary.setWordWrap(True)
        self.lines = pg.PlotWidget(title="per layer")
        self.legend = self.lines.addLegend(offset=(5, 5), colCount=3)  # one row across the top
        self.lines.getViewBox().sigResized.connect(lambda *_: self._fit_lines())
        self.lines.setLabel("bottom", "layer")
        self.lines.setMenuEnabled(False)
        self.curves = {
            "auc": self.lines.plot([], [], pen=pg.mkPen((214, 96, 77), width=2), name="ROC-AUC"),
            "consistency": self.lines.plot([], [], pen=pg.mkPen((67, 147, 195), width=2), name="consistency"),
            "relative_norm": self.lines.plot([], [], pen=pg.mkPen((120, 120, 120), width=2, style=Qt.PenStyle.DashLine),
                                             name="|v|/|h|"),
        }
        self.cosine = HeatmapView("cosine between layer directions", row_label="layer", col_label="layer")
        self.table = QTableWidget(0, 6)
        self.table.setHorizontalHeaderLabels(["layer", "AUC", "d'", "consistency", "|v|/|h|", "alignment"])
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.verticalHeader().hide()
        self.lines.setMinimumSize(220, 180)
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(self.lines)
        split.addWidget(self.cosine)
        split.setChildrenCollapsible(False)
        self._reflow = Reflow(self, split, 540)  # one above the other in a narrow dock (it scrolls)
        layout = QVBoxLayout(self)
        top = QHBoxLayout()
        top.addWidget(self.run_button)
        top.addWidget(self.summary, 1)
        layout.addLayout(top)
        layout.addWidget(split, 2)
        layout.addWidget(self.table, 1)
        self.run_button.clicked.connect(self.run_requested)

    def show_diagnostics(self, d: Any) -> None:
        """Render a ``Diagnostics`` result."""
        layers = np.array(d.layers, dtype=float)
        for key, curve in self.curves.items():
            values = np.array([np.nan if v is None else v for v in getattr(d, key)], dtype=float)
            curve.setData(layers, values, connect="finite")  # gaps, never 0, where there is no value
        cos = np.array([[np.nan if v is None else v for v in row] for row in d.cosine], dtype=np.float32)
        self.cosine.set_data(cos, levels=(-1.0, 1.0))
        self.table.setRowCount(len(d.layers))
        absent = set(getattr(d, "no_vector", []) or [])
        for i, layer in enumerate(d.layers):
            values = [layer, d.auc[i], d.d_prime[i], d.consistency[i], d.relative_norm[i], d.alignment[i]]
            for j, v in enumerate(values):
                text = "—" if v is None else (str(v) if j == 0 else f"{v:.3f}")
                if layer in absent and j == 1:
                    text = "no vector"
                self.table.setItem(i, j, QTableWidgetItem(text))
        self.summary.setText(f"{d.n_base} base / {d.n_target} target held-out examples. "
                             f"{best_separation(d.layers, d.auc)}")
        self._fit_lines(d)

    def _fit_lines(self, d: Any = None) -> None:
        """Room above the curves for the legend (its height in pixels), so it never covers them."""
        if d is not None:
            values = [v for key in self.curves for v in getattr(d, key) if v is not None and np.isfinite(v)]
            self._y_span = (min([0.0, *values]), max([1.0, *values]) * 1.02)
        span = getattr(self, "_y_span", None)
        if span is None:
            return
        px = max(self.lines.getViewBox().height(), 1.0)
        share = min(0.6, (self.legend.boundingRect().height() + 12) / px)  # of the plot's height
        lo, hi = span
        self.lines.setYRange(lo, lo + (hi - lo) / (1 - share), padding=0)


def best_separation(layers: list[int], aucs: list[float | None]) -> str:
    """The best layer by ROC-AUC, or the honest list of layers that tie at the best value (3 decimals)."""
    scored = [(round(a, 3), layer) for a, layer in zip(aucs, layers) if a is not None and np.isfinite(a)]
    if not scored:
        return "No layer could be scored."
    best = max(a for a, _ in scored)
    tied = sorted(layer for a, layer in scored if a == best)
    if len(tied) == 1:
        return f"Best separation: layer {tied[0]} (AUC {best:.3f})."
    runs: list[list[int]] = []
    for layer in tied:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    text = ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
    return f"Best separation: layers {text} tie at AUC {best:.3f} ({len(tied)} of {len(scored)} layers)."


class VersusTab(QWidget):
    """A system-prompt instruction, the vector, and both — scored and generated side by side."""

    run_requested = Signal()
    """The user pressed Compare (the analysis panel submits the job)."""

    def __init__(self) -> None:
        super().__init__()
        self.instruction = QLineEdit("Reply rudely.")
        self.instruction.setObjectName("instructionEdit")
        self.run_button = QPushButton("Compare prompt vs vector")
        self.run_button.setObjectName("versusButton")
        self.note = QLabel("Uses the generation pane's prompt, vector, layers, scale and mode; scores are deltas "
                           "versus the plain model on held-out pairs (nats per token).")
        self.note.setWordWrap(True)
        grid = QGridLayout()
        self.views: dict[str, tuple[QLabel, QTextEdit]] = {}
        for i, name in enumerate(("unsteered", "prompt", "vector", "both")):
            label = QLabel(f"<b>{name}</b>")
            view = QTextEdit()
            view.setReadOnly(True)
            grid.addWidget(label, 0, i)
            grid.addWidget(view, 1, i)
            self.views[name] = (label, view)
        form = QFormLayout()
        form.addRow("Instruction (system message)", self.instruction)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        row = QHBoxLayout()
        row.addWidget(self.run_button)
        row.addWidget(self.note, 1)
        layout.addLayout(row)
        layout.addLayout(grid, 1)
        self.run_button.clicked.connect(self.run_requested)

    def show_result(self, v: Any) -> None:
        """Render a ``Versus`` result."""
        for c in v.conditions:
            label, view = self.views[c.name]
            label.setText(f"<b>{c.name}</b><br>margin {c.margin_delta:+.3f} · fluency {c.fluency_delta:+.3f}")
            view.setPlainText(c.text)


class GridTab(QWidget):
    """Layers x scales x prompts of generated text, with an optional keyword/regex count column."""

    run_requested = Signal()
    """The user pressed Generate grid (the analysis panel submits the job)."""
    error_occurred = Signal(str, str)
    """A failed export: (title, message)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[Any] = []
        self.layers = QLineEdit("")
        self.layers.setPlaceholderText("layers, e.g. 8,12,16 (default: the generation pane's)")
        self.scales = QLineEdit("0.5,1,2")
        self.prompts = QPlainTextEdit("How do I boil an egg?\nWhat is the capital of France?")
        self.prompts.setMaximumHeight(70)
        self.pattern = QLineEdit("ugh, seriously, obviously")
        self.regex = QCheckBox("regex")
        self.tokens = QSpinBox()
        self.tokens.setRange(1, 512)
        self.tokens.setValue(32)
        self.run_button = QPushButton("Generate grid")
        self.run_button.setObjectName("gridButton")
        self.export_button = QPushButton("Export CSV/JSON…")
        self.export_button.setEnabled(False)
        self.table = QTableWidget(0, 5)
        self.table.setHorizontalHeaderLabels(["layer", "scale", "prompt", "text", "matches"])
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(3, QHeaderView.ResizeMode.Stretch)
        self.table.setWordWrap(True)
        form = QFormLayout()
        form.addRow("Layers", self.layers)
        form.addRow("Scales", self.scales)
        form.addRow("Prompts (one a line)", self.prompts)
        pat = QHBoxLayout()
        pat.addWidget(self.pattern)
        pat.addWidget(self.regex)
        form.addRow("Count matches of", pat)
        form.addRow("Max new tokens", self.tokens)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.export_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.table, 1)
        self.run_button.clicked.connect(self.run_requested)
        self.export_button.clicked.connect(self._export)

    def prompt_list(self) -> list[str]:
        """The non-empty prompt lines."""
        return [p.strip() for p in self.prompts.toPlainText().splitlines() if p.strip()]

    def start(self) -> None:
        """Empty the table for a new grid."""
        self.rows = []
        self.table.setRowCount(0)
        self.export_button.setEnabled(False)

    def add_row(self, r: Any) -> None:
        """Show one ``GridRow`` (called as the grid goes)."""
        self.rows.append(r)
        i = self.table.rowCount()
        self.table.insertRow(i)
        no_vector = bool(getattr(r, "no_vector", False))
        values = ["unsteered" if r.layer is None else str(r.layer), f"{r.scale:g}", r.prompt,
                  "no vector for this layer (not generated)" if no_vector else r.text,
                  "" if r.matches is None else str(r.matches)]
        for j, v in enumerate(values):
            item = QTableWidgetItem(v)
            item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
            if no_vector:
                item.setForeground(Qt.GlobalColor.gray)
                item.setToolTip("The vector set has no direction for this layer: nothing to steer with.")
            self.table.setItem(i, j, item)

    def finish(self, rows: list[Any]) -> None:
        """All rows: the table is made to match them, export enabled."""
        if len(rows) != len(self.rows):
            self.start()
            for r in rows:
                self.add_row(r)
        self.table.resizeRowsToContents()
        self.export_button.setEnabled(bool(rows))

    def export_to(self, path: str) -> None:
        """Write the rows as JSON (``.json``) or CSV (anything else); raises on a failed write."""
        from ...core.fileio import atomic_write_text
        from ...core.textgrid import grid_to_csv, grid_to_json

        atomic_write_text(path, grid_to_json(self.rows) if path.lower().endswith(".json") else grid_to_csv(self.rows))

    def _export(self) -> None:
        from ...core.errors import SteerdeskError

        path = QFileDialog.getSaveFileName(self, "Export grid", "grid.csv", "CSV (*.csv);;JSON (*.json)")[0]
        if path:
            try:
                self.export_to(path)
            except (*WRITE_ERRORS, SteerdeskError) as exc:
                self.error_occurred.emit("Could not export the grid", f"{path}: {exc}")


class HistoryTab(QWidget):
    """Every generation, compute and sweep of the session; each exports as a JSON recipe."""

    error_occurred = Signal(str, str)
    """A failed export: (title, message)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[Any] = []
        self.list = QListWidget()
        self.list.setObjectName("historyList")
        self.details = QPlainTextEdit()
        self.details.setReadOnly(True)
        self.export_button = QPushButton("Export recipe…")
        self.export_button.setToolTip("Save as JSON; `steerdesk run RECIPE.json` re-runs it.")
        self.export_button.setEnabled(False)
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(self.list)
        split.addWidget(self.details)
        layout = QVBoxLayout(self)
        layout.addWidget(split, 1)
        layout.addWidget(self.export_button)
        self.list.currentRowChanged.connect(self._show)
        self.export_button.clicked.connect(self._export)

    def add(self, record: Any) -> None:
        """List a ``RunRecord`` (a stopped generation is marked so) or a ``StoppedRun`` and select it."""
        self.records.append(record)
        rows = (getattr(record, "outputs", None) or {}).get("rows") or []
        stopped = "  (stopped)" if any(r.get("finish_reason") == "stopped" for r in rows) else ""
        self.list.addItem(f"{record.created[11:19] if record.created else ''}  {record.title}{stopped}")
        self.list.setCurrentRow(self.list.count() - 1)

    def _show(self, row: int) -> None:
        ok = 0 <= row < len(self.records)
        self.export_button.setEnabled(ok and hasattr(self.records[row], "save"))  # a StoppedRun has no recipe
        self.details.setPlainText(self.records[row].to_json() if ok else "")

    def export_to(self, path: str, row: int | None = None) -> None:
        """Save record ``row`` (default: the selected one) as a recipe; raises on a failed write."""
        rec = self.records[self.list.currentRow() if row is None else row]
        rec.save(path)

    def _export(self) -> None:
        from ...core.errors import SteerdeskError

        path = QFileDialog.getSaveFileName(self, "Export recipe", "recipe.json", "JSON (*.json)")[0]
        if path:
            try:
                self.export_to(path)
            except (*WRITE_ERRORS, SteerdeskError) as exc:
                self.error_occurred.emit("Could not export the recipe", f"{path}: {exc}")


class AnalysisPanel(QTabWidget):
    """Tabs: Diagnostics, Prompt vs vector, Methods, Generation grid, History; builds and submits their jobs."""

    shown = Signal()
    """A result arrived (the window brings this panel to the front)."""
    error_occurred = Signal(str, str)
    """A problem to show: (title, message)."""

    def __init__(self, controller: Any = None, vector_sets: VectorSets | None = None,
                 pairs: PairsSource | None = None, steering: SteeringSource | None = None,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.controller = controller  # a ModelController (None: tabs that only render)
        self._job: Any = None  # the last job submitted here (its end clears the busy state)
        self.vector_sets = vector_sets if vector_sets is not None else VectorSets(self)
        self.pairs = pairs
        self.steering = steering
        self.diagnostics = DiagnosticsTab()
        self.versus = VersusTab()
        self.grid = GridTab()
        self.history = HistoryTab()
        self.methods = MethodsTab()
        self.addTab(self.diagnostics, "Diagnostics")
        self.addTab(self.versus, "Prompt vs vector")
        self.addTab(self.methods, "Methods")
        self.addTab(self.grid, "Generation grid")
        self.addTab(self.history, "History")
        self.diagnostics.run_requested.connect(self.run_diagnose)
        self.versus.run_requested.connect(self.run_versus)
        self.grid.run_requested.connect(self.run_grid)
        self.methods.run_requested.connect(self.run_methods)
        self.grid.error_occurred.connect(self.error_occurred)
        self.history.error_occurred.connect(self.error_occurred)
        if controller is not None:
            controller.record_ready.connect(self.history.add)

    def set_busy(self, busy: bool) -> None:
        """The three Run buttons disabled while busy."""
        for b in (self.diagnostics.run_button, self.versus.run_button, self.grid.run_button, self.methods.run_button):
            b.setEnabled(not busy)

    # -- building Specs ----------------------------------------------------------------
    def diagnose_spec(self) -> Any:
        """``DiagnoseSpec``: the analysis vector set on the held-out pairs (``Refused`` if one is missing)."""
        from ...jobs import DiagnoseSpec

        need_model(self.controller)
        item = need_vectors(self.vector_sets)
        return DiagnoseSpec(vectors=item.vectors, dataset=need_heldout(self.pairs))

    def versus_spec(self) -> Any:
        """``VersusSpec``: the instruction vs the generation pane's prompt, steering and sampling."""
        from ...core.errors import SteerdeskError
        from ...jobs import VersusSpec

        need_model(self.controller)
        need_vectors(self.vector_sets)
        heldout = need_heldout(self.pairs)
        assert self.steering is not None, "comparing needs the generation pane"
        try:
            gen = self.steering.build_spec()
        except SteerdeskError as exc:
            raise Refused("Cannot compare", str(exc)) from None
        if gen.steering is None:
            raise Refused("Cannot compare", "Pick a vector set and layers in the generation pane first.")
        return VersusSpec(heldout=heldout, steering=gen.steering, instruction=self.versus.instruction.text(),
                          prompt=gen.prompts[0], sampling=gen.sampling)

    def grid_spec(self) -> Any:
        """``GridSpec``: the grid tab's layers (default: the generation pane's), scales, prompts and pattern;
        mode, normalize, positions (token windows too) and gate from the generation pane."""
        from dataclasses import replace

        from ...core.errors import SteerdeskError
        from ...core.parsing import parse_layers, parse_scales
        from ...core.textgrid import compile_pattern
        from ...jobs import GridSpec

        need_model(self.controller)
        item = need_vectors(self.vector_sets)
        assert self.steering is not None, "the grid needs the generation pane"
        grid = self.grid
        try:
            text = grid.layers.text()
            layers = parse_layers(text, item.vectors.num_layers) if text.strip() else self.steering.selected_layers()
            if not layers:
                raise SteerdeskError("Give layers for the grid.")
            scales = parse_scales(grid.scales.text())
            prompts = grid.prompt_list()
            if not prompts:
                raise SteerdeskError("Give at least one prompt (one a line).")
            compile_pattern(grid.pattern.text(), grid.regex.isChecked())
            positions, gate = self.steering.steering_conditions()  # the pane's window and gate
        except SteerdeskError as exc:
            raise Refused("Cannot run the grid", str(exc)) from None
        mode, normalize = self.steering.steering_options()
        sampling = replace(self.steering.sampling(), max_new_tokens=grid.tokens.value())
        return GridSpec(vectors=item.vectors, layers=tuple(layers), scales=tuple(scales), prompts=tuple(prompts),
                        mode=mode, normalize=normalize, sampling=sampling, pattern=grid.pattern.text(),
                        regex=grid.regex.isChecked(), positions=positions, gate=gate)

    # -- running -----------------------------------------------------------------------
    def run_diagnose(self) -> None:
        """Diagnose (the tab's button)."""
        self._submit(self.diagnose_spec, self.diagnostics, self.diagnostics.show_diagnostics)

    def run_versus(self) -> None:
        """Compare prompt vs vector (the tab's button)."""
        self._submit(self.versus_spec, self.versus, self.versus.show_result)

    def run_methods(self) -> None:
        """Compare mean-diff, PCA, optimized (and the analysis set) with the prompt (the tab's button)."""
        vs = self.vector_sets
        job = self._submit(lambda: self.methods.build_spec(self.controller, self.pairs, vs.for_analysis()),
                           self.methods, self.methods.show_result)
        if job is not None:
            job.progress.connect(self.methods.set_progress)
            job.partial.connect(self.methods.show_epoch)

    def run_grid(self) -> None:
        """Generate the grid (the tab's button); rows appear as they are done."""
        job = self._submit(self.grid_spec, self.grid, self.grid.finish, before=self.grid.start)
        if job is not None:
            job.partial.connect(self.grid.add_row)
            job.cancelled.connect(lambda: self.grid.finish(list(self.grid.rows)))  # a stopped grid: its rows export

    def _submit(self, build: Any, tab: QWidget, show: Any, before: Any = None) -> Any:
        try:
            spec = build()
        except Refused as exc:
            self.error_occurred.emit(exc.title, str(exc))
            return None
        if before is not None:
            before()
        self.set_busy(True)
        self._job = job = self.controller.submit(spec)

        def finished(result: Any) -> None:
            self.set_busy(False)
            self.shown.emit()
            self.setCurrentWidget(tab)
            show(result)

        job.finished.connect(finished)
        job.ended.connect(lambda: self.set_busy(False) if self._job is job else None)
        return job
