"""The main window: composes the panels, menus and status bar; the controller does the work."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QByteArray, Qt, QTimer, Slot
from PySide6.QtGui import QCloseEvent, QIcon
from PySide6.QtWidgets import QDockWidget, QFileDialog, QLabel, QMainWindow, QMessageBox, QProgressBar, QWidget

from . import menus
from .bake_action import BakeAction
from .controller import ModelController
from .dialogs import show_error
from .layout import clamp_to_screen, full_dock_tab_labels, scrolled
from .panels.analysis_panel import AnalysisPanel
from .panels.condition_panel import ConditionPanel
from .panels.dataset_panel import DatasetPanel
from .panels.generation_panel import GenerationPanel
from .panels.search_panel import SearchPanel, window_inputs
from .panels.sweep_panel import SweepPanel
from .panels.vector_panel import VectorPanel
from .recovery import RecoveryStore
from .requests import ErrorInfo
from .resources import icon_path
from .settings import push_recent, settings
from .vector_sets import VectorSets

EMBEDDED = menus.EMBEDDED


class MainWindow(QMainWindow):
    """Composes the panels (each submits its own jobs), menus, status bar and shutdown."""

    def __init__(self, controller: ModelController | None = None, *, recovery: RecoveryStore | None = None,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("steerdeskMainWindow")
        self.setWindowIcon(QIcon(str(icon_path())))
        self.resize(1600, 1000)
        self.controller = controller or ModelController(self)
        self._settings = settings()
        self._model_spec = ""
        self._pending_model: str | None = None
        self._closing = False
        self._dialogs: list[Any] = []
        self._progress_text = ""  # the status line on_progress last showed

        c = self.controller
        self.vector_sets = VectorSets(self)  # the one home of the session's vector sets
        self.dataset_panel = dp = DatasetPanel(recovery=recovery or RecoveryStore())
        self.vector_panel = VectorPanel(c, self.vector_sets, pairs=dp)
        self.sweep_panel = SweepPanel(c, self.vector_sets, pairs=dp)
        self.generation_panel = GenerationPanel(c, self.vector_sets)
        self.analysis_panel = AnalysisPanel(c, self.vector_sets, pairs=dp, steering=self.generation_panel)
        self.search_panel = SearchPanel(c.submit, lambda: c.stop("search"), window_inputs(c, self.vector_sets, dp))
        self.setCentralWidget(self.generation_panel)
        self.baker = BakeAction(self, c, self.generation_panel)  # Run > Bake steering…
        self.dataset_dock = self._dock("Dataset", "datasetDock", self.dataset_panel)
        self.vector_dock = self._dock("Vectors", "vectorDock", self.vector_panel)
        self.sweep_dock = self._dock("Sweep", "sweepDock", self.sweep_panel)
        self.tabifyDockWidget(self.dataset_dock, self.vector_dock)
        self.analysis_dock = self._dock("Analysis", "analysisDock", self.analysis_panel)
        self.tabifyDockWidget(self.vector_dock, self.sweep_dock)
        self.tabifyDockWidget(self.sweep_dock, self.analysis_dock)
        self.search_dock = self._dock("Search", "searchDock", self.search_panel)
        self.tabifyDockWidget(self.analysis_dock, self.search_dock)
        self.condition_panel = ConditionPanel(c)  # calibrate a CAST gate; 'Use this gate' fills the pane's gate
        self.condition_dock = self._dock("Condition", "conditionDock", self.condition_panel)
        self.tabifyDockWidget(self.search_dock, self.condition_dock)
        self.dataset_dock.raise_()
        self.resizeDocks([self.dataset_dock], [640], Qt.Orientation.Horizontal)

        self.model_label = QLabel("no model")
        self.model_label.setObjectName("modelLabel")
        self.busy_bar = QProgressBar()
        self.busy_bar.setMaximumWidth(160)
        self.busy_bar.setRange(0, 0)
        self.busy_bar.hide()
        self.statusBar().addPermanentWidget(self.busy_bar)
        self.statusBar().addPermanentWidget(self.model_label)

        menus.build(self)
        self._connect()
        self._update_title()
        self._restore()

    # -- construction ------------------------------------------------------------------
    def _dock(self, title: str, name: str, widget: QWidget,
              area: Qt.DockWidgetArea = Qt.DockWidgetArea.LeftDockWidgetArea) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(name)
        dock.setWidget(scrolled(widget))  # below its minimum size a panel scrolls; it never resizes the dock
        f = QDockWidget.DockWidgetFeature
        dock.setFeatures(f.DockWidgetMovable | f.DockWidgetFloatable | f.DockWidgetClosable)  # View menu toggles
        self.addDockWidget(area, dock)
        # A dock moved, floated back or tabified gets a tab bar Qt makes anew: name its tabs in full.
        later = lambda *_: QTimer.singleShot(0, lambda: full_dock_tab_labels(self))
        dock.dockLocationChanged.connect(later)
        dock.topLevelChanged.connect(later)
        return dock

    def _connect(self) -> None:
        c, sets = self.controller, self.vector_sets
        c.model_loading.connect(self.on_model_loading)
        c.model_ready.connect(self.on_model_ready)
        c.model_loading.connect(lambda _spec: sets.set_model_info(None))
        c.model_ready.connect(sets.set_model_info)
        c.model_kept.connect(sets.set_model_info)
        c.model_kept.connect(self.on_model_kept)
        c.progress.connect(self.on_progress)
        for ended in (c.finished, c.job_cancelled, c.failed):  # a job's last step count is not left standing
            ended.connect(self._clear_progress_text)
        c.job_cancelled.connect(lambda kind: self.show_status(f"{kind.capitalize()} stopped."))
        c.failed.connect(self.on_failed)
        c.busy_changed.connect(self.on_busy_changed)
        dp, vp, sp, ap, gp = (self.dataset_panel, self.vector_panel, self.sweep_panel, self.analysis_panel,
                              self.generation_panel)
        dp.modified_changed.connect(lambda _m: self._update_title())
        dp.dataset_changed.connect(self._update_title)
        dp.path_changed.connect(self._update_title)
        for panel in (dp, vp, sp, ap, gp, self.baker, self.search_panel, self.condition_panel):
            panel.error_occurred.connect(self.show_user_error)
            if hasattr(panel, "status_message"):
                panel.status_message.connect(self.show_status)
        vp.vectors_ready.connect(lambda _item: self.vector_dock.raise_())
        sp.started.connect(self.sweep_dock.raise_)
        sp.cell_chosen.connect(lambda c: gp.set_gate(c.gate))  # first: the cell's gate (or none), then generate
        sp.cell_chosen.connect(lambda c: gp.try_steering(c.name, c.layers, c.scale, c.mode, c.normalize, c.positions))
        ap.shown.connect(self.analysis_dock.raise_)
        self.search_panel.started.connect(self.search_dock.raise_)
        self.condition_panel.gate_chosen.connect(gp.use_gate)
        self.search_panel.settings_chosen.connect(
            lambda d: gp.try_steering("", list(d["layers"]), d["scale"], d["mode"], d["normalize"], d["positions"]))

    # -- settings ----------------------------------------------------------------------
    def _restore(self) -> None:
        s = self._settings
        geometry = s.value("window/geometry")
        if isinstance(geometry, QByteArray):
            self.restoreGeometry(geometry)
        state = s.value("window/state")
        if isinstance(state, QByteArray):
            self.restoreState(state)
        clamp_to_screen(self)  # a geometry saved on a larger screen
        self.generation_panel.restore_settings(s)
        self.vector_panel.restore_settings(s)
        full_dock_tab_labels(self)

    def save_settings(self) -> None:
        """Window geometry and the panels' settings."""
        s = self._settings
        s.setValue("window/geometry", self.saveGeometry())
        s.setValue("window/state", self.saveState())
        self.generation_panel.save_settings(s)
        self.vector_panel.save_settings(s)
        s.sync()

    def _refresh_recent(self) -> None:
        menus.refresh_recent(self)

    # -- start / model -----------------------------------------------------------------
    def start(self) -> None:
        """After the first paint: offer recovered edits, load the last model or the embedded one."""
        self.dataset_panel.offer_recovery(self)
        if len(self.dataset_panel.dataset()) == 0:
            self.dataset_panel.load_bundled("neutral_rude")
        last = self._settings.value("models/last", EMBEDDED)
        self.load_model(str(last) if last else EMBEDDED)

    def load_model(self, spec: str) -> None:
        """Load ``spec`` (a ``LoadSpec`` job); the model label and the panels follow the controller."""
        self._pending_model = spec
        self.controller.load_model(spec)

    def _open_model(self, spec: str) -> None:
        if spec:  # empty when a dialog was cancelled
            self.load_model(spec)

    @Slot(str)
    def on_model_loading(self, spec: str) -> None:
        """A load started: say so in the status bar."""
        self.model_label.setText(f"loading {spec if spec != EMBEDDED else 'SmolLM2-135M-Instruct'}…")

    @Slot(object)
    def on_model_ready(self, info: Any) -> None:
        """Remember the model (last / recent) and describe it in the status bar."""
        self._model_spec = self._pending_model or info.name
        self._settings.setValue("models/last", self._model_spec)
        push_recent(self._settings, self._model_spec)
        self._refresh_recent()
        self._describe_model(info)
        self.show_status(f"Model ready: {info.name}")

    def _describe_model(self, info: Any) -> None:
        from pathlib import Path

        shown = Path(info.name).name if ("/" in info.name and Path(info.name).exists()) else info.name
        self.model_label.setText(f"{shown} · {info.device} · {info.dtype} · {info.num_layers} layers")
        self.model_label.setToolTip(f"{info.architecture}, hidden size {info.hidden_size}, "
                                    f"chat template: {'yes' if info.has_chat_template else 'no'}")

    @Slot(object)
    def on_model_kept(self, info: Any) -> None:
        """A model switch failed; the model loaded before is still there and working."""
        self._pending_model = self._model_spec
        self._describe_model(info)
        self.show_status(f"Kept {info.name}: the new model could not be loaded.")

    @Slot(str, int, int, str)
    def on_progress(self, kind: str, done: int, total: int, message: str) -> None:
        """Any job's progress in the status bar; a load's steps and % also next to the model."""
        pct = f" ({100 * done // total}%)" if total > 0 else ""
        if kind == "load":
            self.model_label.setText(f"{message}{pct}" if message else self.model_label.text())
            self.show_status(f"{message}{pct}")
        else:
            self.show_status(message if total <= 0 else f"{message} {done}/{total}")
        self._progress_text = self.statusBar().currentMessage()
        self.busy_bar.setRange(0, max(total, 0))  # 0..0: busy without a known amount
        self.busy_bar.setValue(done if total > 0 else 0)

    def _clear_progress_text(self, *_: Any) -> None:
        """A job ended: clear its progress line ("Searching 3/3") unless a panel has since said more
        (its own message, e.g. "Vectors ready: ..."), so the next job never shows the last one's count."""
        if self._progress_text and self.statusBar().currentMessage() == self._progress_text:
            self.statusBar().clearMessage()
        self._progress_text = ""

    @Slot(object)
    def on_failed(self, error: ErrorInfo) -> None:
        """A job failed: its error in a dialog."""
        if self.controller.model_info is None:
            self.model_label.setText("no model")
        self._dialogs.append(show_error(self, error))

    @Slot(bool)
    def on_busy_changed(self, busy: bool) -> None:
        """The busy bar and Stop follow whether any job runs."""
        self.busy_bar.setRange(0, 0)
        self.busy_bar.setVisible(busy)
        self.act_stop.setEnabled(busy)

    def bake(self) -> None:
        """Run > Bake steering…: the pane's steering into a new model folder (see ``BakeAction``)."""
        self.baker.start()

    def show_user_error(self, title: str, message: str) -> None:
        """A user error in a non-blocking dialog."""
        self._dialogs.append(show_error(self, ErrorInfo(title, message)))

    def show_status(self, text: str) -> None:
        """A message in the status bar for 8 s."""
        self.statusBar().showMessage(text, 8000)

    def on_export_heatmap(self) -> None:
        """File > Export heatmap: a failed write is shown, not dropped."""
        path = QFileDialog.getSaveFileName(self, "Export heatmap", "heatmap.png", "PNG images (*.png)")[0]
        if path and not self.generation_panel.heatmap.export_png(path):
            self.show_user_error("Could not export the heatmap", f"Could not write {path}.")

    def _update_title(self) -> None:
        name = self.dataset_panel.display_name()
        star = "*" if self.dataset_panel.is_modified() else ""
        self.setWindowTitle(f"{name}{star} — steerdesk")

    # -- closing -----------------------------------------------------------------------
    def _confirm_close(self) -> bool:
        """Ask about unsaved dataset edits; True to go on closing."""
        if not self.dataset_panel.is_modified():
            self.dataset_panel.discard_recovery()
            return True
        answer = QMessageBox.question(
            self, "Unsaved dataset", "The dataset has unsaved edits. Save them before closing?",
            QMessageBox.StandardButton.Save | QMessageBox.StandardButton.Discard
            | QMessageBox.StandardButton.Cancel, QMessageBox.StandardButton.Save)
        if answer == QMessageBox.StandardButton.Cancel:
            return False
        if answer == QMessageBox.StandardButton.Save:
            return self.dataset_panel.save()
        self.dataset_panel.discard_recovery()
        return True

    def closeEvent(self, event: QCloseEvent) -> None:
        if not self._closing and not self._confirm_close():
            event.ignore()
            return
        self._closing = True
        self.save_settings()
        self.controller.shutdown()
        event.accept()
