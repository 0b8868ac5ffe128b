"""The main window: composes the panels, menus and status bar; the controller does the work."""

from __future__ import annotations

import logging
from typing import Any

from PySide6.QtCore import QByteArray, Qt, Slot
from PySide6.QtGui import QAction, QCloseEvent, QIcon, QKeySequence
from PySide6.QtWidgets import (QDockWidget, QFileDialog, QLabel, QMainWindow, QMessageBox, QProgressBar,
                               QWidget)

from .controller import ModelController
from .dialogs import ask_hub_id, show_error
from .panels.dataset_panel import DatasetPanel
from .panels.generation_panel import GenerationPanel
from .panels.analysis_panel import AnalysisPanel
from .panels.sweep_panel import SweepPanel
from .panels.vector_panel import VectorPanel
from .recovery import RecoveryStore
from .requests import ErrorInfo
from .resources import icon_path
from .settings import get_list, push_recent, settings

log = logging.getLogger(__name__)

EMBEDDED = "default"


class MainWindow(QMainWindow):
    """Dataset editor, vector panel and generation pane around one model worker."""

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

        self.dataset_panel = DatasetPanel(recovery=recovery or RecoveryStore())
        self.vector_panel = VectorPanel()
        self.sweep_panel = SweepPanel()
        self.analysis_panel = AnalysisPanel()
        self.generation_panel = GenerationPanel()
        self.setCentralWidget(self.generation_panel)
        self.dataset_dock = self._dock("Dataset", "datasetDock", self.dataset_panel,
                                       Qt.DockWidgetArea.LeftDockWidgetArea)
        self.vector_dock = self._dock("Vectors", "vectorDock", self.vector_panel,
                                      Qt.DockWidgetArea.LeftDockWidgetArea)
        self.sweep_dock = self._dock("Sweep", "sweepDock", self.sweep_panel, Qt.DockWidgetArea.LeftDockWidgetArea)
        self.tabifyDockWidget(self.dataset_dock, self.vector_dock)
        self.analysis_dock = self._dock("Analysis", "analysisDock", self.analysis_panel,
                                        Qt.DockWidgetArea.LeftDockWidgetArea)
        self.tabifyDockWidget(self.vector_dock, self.sweep_dock)
        self.tabifyDockWidget(self.sweep_dock, self.analysis_dock)
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

        self._build_actions()
        self._connect()
        self._update_title()
        self._restore()

    # -- construction ------------------------------------------------------------------
    def _dock(self, title: str, name: str, widget: QWidget, area: Qt.DockWidgetArea) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(name)
        dock.setWidget(widget)
        dock.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetMovable
                         | QDockWidget.DockWidgetFeature.DockWidgetFloatable)
        self.addDockWidget(area, dock)
        return dock

    def _action(self, text: str, slot: Any, shortcut: str | QKeySequence | None = None, tip: str = "") -> QAction:
        act = QAction(text, self)
        if shortcut:
            act.setShortcut(QKeySequence(shortcut))
            act.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
        if tip:
            act.setToolTip(tip)
            act.setStatusTip(tip)
        act.triggered.connect(slot)
        return act

    def _build_actions(self) -> None:
        self.act_generate = self._action("&Generate", self.on_generate, "Ctrl+Return",
                                         "Generate steered and unsteered text (Ctrl+Enter)")
        self.act_stop = self._action("&Stop", self.on_stop, "Esc", "Stop the running job (Esc)")
        self.act_stop.setEnabled(False)
        # Ctrl+S saves from anywhere in the window: the panel's own, focus-scoped binding is
        # removed so the two do not make the shortcut ambiguous.
        self.dataset_panel.save_action.setShortcut(QKeySequence())
        self.act_save = self._action("&Save dataset", lambda: self.dataset_panel.save(), QKeySequence.StandardKey.Save,
                                     "Save the dataset (Ctrl+S)")
        self.act_compute = self._action("&Compute vectors", self.vector_panel.compute_button.click, "Ctrl+K",
                                        "Compute steering vectors from the dataset (Ctrl+K)")
        self.act_copy = self._action("Copy generated text", self.generation_panel.copy_text, "Ctrl+Shift+C")
        self.act_export_heat = self._action("Export heatmap as PNG…", self.on_export_heatmap)
        self.act_quit = self._action("&Quit", self.close, QKeySequence.StandardKey.Quit)
        self.act_default_model = self._action("Embedded SmolLM2-135M-Instruct", lambda: self.load_model(EMBEDDED))
        self.act_hub_model = self._action("Hugging Face id…", self.on_open_hub)
        self.act_folder_model = self._action("Local folder…", self.on_open_folder)
        self.act_gguf_model = self._action(".gguf file…", self.on_open_gguf)

        menu = self.menuBar()
        file_menu = menu.addMenu("&File")
        file_menu.addAction(self.act_save)
        file_menu.addAction(self.act_export_heat)
        file_menu.addSeparator()
        file_menu.addAction(self.act_quit)
        edit_menu = menu.addMenu("&Edit")
        edit_menu.addAction(self.dataset_panel.undo_action)  # shortcuts scoped to the table
        edit_menu.addAction(self.dataset_panel.redo_action)
        edit_menu.addAction(self.act_copy)
        model_menu = menu.addMenu("&Model")
        model_menu.addAction(self.act_default_model)
        model_menu.addAction(self.act_hub_model)
        model_menu.addAction(self.act_folder_model)
        model_menu.addAction(self.act_gguf_model)
        self.recent_menu = model_menu.addMenu("Recent")
        run_menu = menu.addMenu("&Run")
        run_menu.addAction(self.act_compute)
        run_menu.addAction(self.act_generate)
        run_menu.addAction(self.act_stop)
        view_menu = menu.addMenu("&View")
        view_menu.addAction(self.dataset_dock.toggleViewAction())
        view_menu.addAction(self.vector_dock.toggleViewAction())
        view_menu.addAction(self.sweep_dock.toggleViewAction())
        view_menu.addAction(self.analysis_dock.toggleViewAction())

        tb = self.addToolBar("Main")
        tb.setObjectName("mainToolbar")
        tb.addAction(self.act_compute)
        tb.addAction(self.act_generate)
        tb.addAction(self.act_stop)
        tb.addSeparator()
        tb.addAction(self.act_save)
        self._refresh_recent()

    def _connect(self) -> None:
        c = self.controller
        c.model_loading.connect(self.on_model_loading)
        c.model_ready.connect(self.on_model_ready)
        c.progress.connect(self.on_progress)
        c.vectors_ready.connect(self.on_vectors_ready)
        c.text_generated.connect(self.generation_panel.append_text)
        c.tokens_generated.connect(self.generation_panel.add_steps)
        c.generation_finished.connect(self.on_generation_finished)
        c.job_cancelled.connect(self.on_job_cancelled)
        c.failed.connect(self.on_failed)
        c.busy_changed.connect(self.on_busy_changed)
        dp, vp, gp = self.dataset_panel, self.vector_panel, self.generation_panel
        dp.modified_changed.connect(lambda _m: self._update_title())
        dp.dataset_changed.connect(self._update_title)
        dp.path_changed.connect(self._update_title)
        dp.status_message.connect(self.show_status)
        dp.error_occurred.connect(self.show_user_error)
        vp.compute_requested.connect(self.on_compute)
        vp.cancel_requested.connect(lambda: self.controller.stop("compute"))
        vp.vectors_changed.connect(lambda: gp.set_vector_sets(vp.sets()))
        vp.selection_changed.connect(gp.select_vectors)
        vp.error_occurred.connect(self.show_user_error)
        vp.status_message.connect(self.show_status)
        sp = self.sweep_panel
        sp.run_requested.connect(self.on_sweep)
        sp.cancel_requested.connect(lambda: self.controller.stop("task:sweep"))
        sp.cell_chosen.connect(self.on_sweep_cell_chosen)
        sp.error_occurred.connect(self.show_user_error)
        sp.status_message.connect(self.show_status)
        ap = self.analysis_panel
        ap.diagnostics.run_requested.connect(self.on_diagnose)
        ap.versus.run_requested.connect(self.on_versus)
        ap.grid.run_requested.connect(self.on_grid)
        c.record_ready.connect(ap.history.add)
        c.task_event.connect(self.on_task_event)
        c.task_finished.connect(self.on_task_finished)
        gp.generate_requested.connect(self.on_generate)
        gp.stop_requested.connect(self.on_stop)
        gp.status_message.connect(self.show_status)

    # -- settings ----------------------------------------------------------------------
    def _restore(self) -> None:
        s = self._settings
        geometry = s.value("window/geometry")
        if isinstance(geometry, QByteArray):
            self.restoreGeometry(geometry)
        state = s.value("window/state")
        if isinstance(state, QByteArray):
            self.restoreState(state)
        gp = self.generation_panel
        prompt = s.value("generate/prompt")
        if isinstance(prompt, str) and prompt:
            gp.prompt.setPlainText(prompt)
        gp.scale.setValue(float(s.value("generate/scale", gp.scale.value())))
        gp.max_tokens.setValue(int(s.value("generate/max_tokens", gp.max_tokens.value())))
        gp.mode.setCurrentIndex(max(0, gp.mode.findData(s.value("generate/mode", "add"))))
        vp = self.vector_panel
        vp.method.setCurrentIndex(max(0, vp.method.findData(s.value("compute/method", "mean-diff"))))
        vp.read.setCurrentIndex(max(0, vp.read.findData(s.value("compute/read", "last"))))

    def save_settings(self) -> None:
        s = self._settings
        s.setValue("window/geometry", self.saveGeometry())
        s.setValue("window/state", self.saveState())
        gp = self.generation_panel
        s.setValue("generate/prompt", gp.prompt.toPlainText())
        s.setValue("generate/scale", gp.scale.value())
        s.setValue("generate/max_tokens", gp.max_tokens.value())
        s.setValue("generate/mode", gp.mode.currentData())
        s.setValue("generate/layers", ",".join(str(x) for x in gp.selected_layers()))
        s.setValue("compute/method", self.vector_panel.method.currentData())
        s.setValue("compute/read", self.vector_panel.read.currentData())
        s.sync()

    def _refresh_recent(self) -> None:
        self.recent_menu.clear()
        for spec in get_list(self._settings, "models/recent"):
            act = QAction(spec, self.recent_menu)
            act.triggered.connect(lambda _checked=False, sp=spec: self.load_model(sp))
            self.recent_menu.addAction(act)
        self.recent_menu.setEnabled(bool(self.recent_menu.actions()))

    # -- start / model -----------------------------------------------------------------
    def start(self) -> None:
        """After the first paint: offer recovered edits, load the last model or the embedded one."""
        self.dataset_panel.offer_recovery(self)
        if len(self.dataset_panel.dataset()) == 0:
            self.dataset_panel.load_bundled("neutral_rude")
        last = self._settings.value("models/last", EMBEDDED)
        self.load_model(str(last) if last else EMBEDDED)

    def load_model(self, spec: str) -> None:
        self._pending_model = spec
        self.controller.load_model(spec)

    def on_open_hub(self) -> None:
        spec = ask_hub_id(self)
        if spec:
            self.load_model(spec)

    def on_open_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open model folder")
        if path:
            self.load_model(path)

    def on_open_gguf(self) -> None:
        path = QFileDialog.getOpenFileName(self, "Open GGUF model", "", "GGUF models (*.gguf)")[0]
        if path:
            self.load_model(path)

    @Slot(str)
    def on_model_loading(self, spec: str) -> None:
        self.model_label.setText(f"loading {spec if spec != EMBEDDED else 'SmolLM2-135M-Instruct'}…")
        self.vector_panel.set_model_info(None)

    @Slot(object)
    def on_model_ready(self, info: Any) -> None:
        self._model_spec = self._pending_model or info.name
        self._settings.setValue("models/last", self._model_spec)
        push_recent(self._settings, self._model_spec)
        self._refresh_recent()
        from pathlib import Path

        shown = Path(info.name).name if ("/" in info.name and Path(info.name).exists()) else info.name
        self.model_label.setText(f"{shown} · {info.device} · {info.dtype} · {info.num_layers} layers")
        self.model_label.setToolTip(f"{info.architecture}, hidden size {info.hidden_size}, "
                                    f"chat template: {'yes' if info.has_chat_template else 'no'}")
        self.vector_panel.set_model_info(info)
        self.generation_panel.set_num_layers(info.num_layers)
        saved = str(self._settings.value("generate/layers", "") or "")
        layers = [int(x) for x in saved.split(",") if x.strip().isdigit() and int(x) < info.num_layers]
        if layers:
            self.generation_panel.set_layers(layers)
        self.show_status(f"Model ready: {info.name}")

    # -- jobs --------------------------------------------------------------------------
    @Slot(str, str, int, str)
    def on_compute(self, method: str, read: str, batch_size: int, name: str) -> None:
        from ..core.errors import SteerdeskError

        if self.controller.model_info is None:
            self.show_user_error("No model", "Wait for the model to load first.")
            return
        try:
            train, _held = self.dataset_panel.train_and_heldout()
            train.validate()
        except SteerdeskError as exc:
            self.show_user_error("Dataset problem", str(exc))
            return
        self.vector_panel.set_busy(True)
        self.controller.compute(train, method=method, read=read, batch_size=batch_size,
                                name=name or self.dataset_panel.display_name())

    @Slot(object)
    def on_vectors_ready(self, vs: Any) -> None:
        self.vector_panel.set_busy(False)
        item = self.vector_panel.add_vectors(vs)
        self.generation_panel.select_vectors(item.name)
        self.vector_dock.raise_()
        cut = int(vs.metadata.get("truncated_examples", "0") or 0)
        if cut:
            self.show_user_error("Long examples were cut",
                                 f"{cut} example(s) were longer than the model's context and were cut from the "
                                 f"left (the end of each reply, which is what is read, was kept).")
        self.show_status(f"Vectors ready: {item.name}")

    def on_generate(self) -> None:
        from ..core.errors import SteerdeskError

        if self.controller.model_info is None:
            self.show_user_error("No model", "Wait for the model to load first.")
            return
        try:
            request = self.generation_panel.build_request()
        except SteerdeskError as exc:
            self.show_user_error("Cannot generate", str(exc))
            return
        self.generation_panel.start()
        self.generation_panel.set_busy(True)
        self.controller.generate(request.pop("prompts"), request.pop("rows"), request.pop("sampling"), **request)

    def on_stop(self) -> None:
        self.controller.stop()

    @Slot(object)
    def on_generation_finished(self, results: Any) -> None:
        self.generation_panel.set_busy(False)
        self.generation_panel.finish(results)

    # -- sweeps ------------------------------------------------------------------------
    def _steering_vectors(self) -> Any:
        """The vector set the generation pane steers with (or the vector panel's selection)."""
        item = self.generation_panel.current_set() or self.vector_panel.current()
        return item if item is not None and item.usable else None

    def on_sweep(self) -> None:
        from ..core.errors import SteerdeskError

        got = self._analysis_inputs()
        if got is None:
            return
        item, heldout = got
        try:
            settings = self.sweep_panel.settings(self.controller.model_info.num_layers)
        except SteerdeskError as exc:
            self.show_user_error("Cannot run the sweep", str(exc))
            return
        vs = item.vectors
        self.sweep_panel.start(settings["layers"], settings["sets"], settings["scales"], settings["fluency_budget"],
                               vectors=vs)  # no-vector rows show as such from the start
        self.sweep_panel.set_busy(True)
        self.sweep_dock.raise_()

        def task(lm: Any, cancel: Any, emit: Any) -> Any:
            from ..core.sweep import sweep

            result = sweep(lm, vs, heldout, layers=settings["layers"], scales=settings["scales"],
                           sets=settings["sets"] or None, mode=settings["mode"],
                           fluency_budget=settings["fluency_budget"], max_pairs=settings["max_pairs"],
                           on_cell=lambda r, c, m, f: emit(("cell", r, c, m, f)),
                           progress=lambda d, t: emit(("progress", d, t)), cancel=cancel)
            try:
                from ..core.records import record_sweep

                emit(("record", record_sweep(lm, result, heldout, vs)))
            except Exception:  # noqa: BLE001 - a record never fails the sweep
                log.exception("Could not record the sweep")
            return result

        self.controller.run_task("sweep", task, title="Sweep failed")

    # -- analysis ----------------------------------------------------------------------
    def _analysis_inputs(self, need_heldout: bool = True) -> tuple[Any, Any] | None:
        from ..core.errors import SteerdeskError

        if self.controller.model_info is None:
            self.show_user_error("No model", "Wait for the model to load first.")
            return None
        item = self._steering_vectors()
        if item is None:
            self.show_user_error("No vectors", "Compute or load a vector set for this model first.")
            return None
        heldout = None
        if need_heldout:
            try:
                _train, heldout = self.dataset_panel.train_and_heldout()
                if len(heldout) == 0:
                    raise SteerdeskError("The held-out split is empty: set 'Held out' above 0 in the Dataset panel.")
                heldout.validate()
            except SteerdeskError as exc:
                self.show_user_error("Held-out pairs needed", str(exc))
                return None
        return item, heldout

    def on_diagnose(self) -> None:
        got = self._analysis_inputs()
        if got is None:
            return
        item, heldout = got
        vs = item.vectors
        self.analysis_panel.set_busy(True)

        def task(lm: Any, cancel: Any, emit: Any) -> Any:
            from ..core.diagnostics import diagnose

            return diagnose(lm, vs, heldout, cancel=cancel)

        self.controller.run_task("diagnose", task, title="Diagnostics failed")

    def on_versus(self) -> None:
        from ..core.errors import SteerdeskError

        got = self._analysis_inputs()
        if got is None:
            return
        _item, heldout = got
        try:
            request = self.generation_panel.build_request()
        except SteerdeskError as exc:
            self.show_user_error("Cannot compare", str(exc))
            return
        steers = next((r for r in request["rows"] if r), [])
        instruction = self.analysis_panel.versus.instruction.text()
        prompt, sampling = request["prompts"][0], request["sampling"]
        self.analysis_panel.set_busy(True)

        def task(lm: Any, cancel: Any, emit: Any) -> Any:
            from ..core.versus import prompt_vs_vector

            return prompt_vs_vector(lm, heldout, steers, instruction, prompt, sampling=sampling, cancel=cancel)

        self.controller.run_task("versus", task, title="Comparison failed")

    def on_grid(self) -> None:
        from ..core.errors import SteerdeskError
        from ..core.steering import parse_layers
        from ..core.sweep import parse_scales
        from ..core.textgrid import compile_pattern

        got = self._analysis_inputs(need_heldout=False)
        if got is None:
            return
        item, _ = got
        grid, gp = self.analysis_panel.grid, self.generation_panel
        try:
            n = item.vectors.num_layers
            layers = parse_layers(grid.layers.text(), n) if grid.layers.text().strip() else gp.selected_layers()
            if not layers:
                raise SteerdeskError("Give layers for the grid.")
            scales = parse_scales(grid.scales.text())
            prompts = grid.prompt_list()
            if not prompts:
                raise SteerdeskError("Give at least one prompt (one a line).")
            pattern = compile_pattern(grid.pattern.text(), grid.regex.isChecked())
        except SteerdeskError as exc:
            self.show_user_error("Cannot run the grid", str(exc))
            return
        from ..core.generate import SamplingSettings

        sampling = gp.sampling()
        sampling = SamplingSettings(max_new_tokens=grid.tokens.value(), temperature=sampling.temperature,
                                    top_p=sampling.top_p, seed=sampling.seed)
        vectors, mode, normalize = item.vectors, gp.mode.currentData(), gp.normalize.isChecked()
        grid.start()
        self.analysis_panel.set_busy(True)

        def task(lm: Any, cancel: Any, emit: Any) -> Any:
            from ..core.textgrid import generation_grid

            return generation_grid(lm, vectors, layers, scales, prompts, mode=mode, normalize=normalize,
                                   sampling=sampling, pattern=pattern, on_row=emit, cancel=cancel)

        self.controller.run_task("grid", task, title="Generation grid failed")

    @Slot(str, object)
    def on_task_event(self, name: str, payload: Any) -> None:
        if name == "grid":
            self.analysis_panel.grid.add_row(payload)
        if name == "sweep":
            if payload[0] == "cell":
                self.sweep_panel.set_cell(*payload[1:])
            elif payload[0] == "progress":
                self.sweep_panel.set_progress(*payload[1:])
            elif payload[0] == "record":
                self.analysis_panel.history.add(payload[1])

    @Slot(str, object)
    def on_task_finished(self, name: str, result: Any) -> None:
        if name in ("diagnose", "versus", "grid"):
            self.analysis_panel.set_busy(False)
            self.analysis_dock.raise_()
        if name == "diagnose":
            self.analysis_panel.setCurrentWidget(self.analysis_panel.diagnostics)
            self.analysis_panel.diagnostics.show_diagnostics(result)
        elif name == "versus":
            self.analysis_panel.setCurrentWidget(self.analysis_panel.versus)
            self.analysis_panel.versus.show_result(result)
        elif name == "grid":
            self.analysis_panel.setCurrentWidget(self.analysis_panel.grid)
            self.analysis_panel.grid.finish(result)
        if name == "sweep":
            self.sweep_panel.set_busy(False)
            self.sweep_panel.finish(result)
            self.show_status(f"Sweep done in {result.seconds:.1f} s ({result.path} path).")

    @Slot(object, float)
    def on_sweep_cell_chosen(self, layers: list[int], scale: float) -> None:
        """A sweep cell was clicked: steer with its layers and scale and generate a comparison."""
        gp = self.generation_panel
        item = self._steering_vectors()
        if item is not None:
            gp.select_vectors(item.name)
        gp.set_layers(layers)
        gp.set_scale(scale)
        gp.mode.setCurrentIndex(max(0, gp.mode.findData(self.sweep_panel.mode.currentData())))
        gp.compare.setChecked(True)
        self.on_generate()

    @Slot(str)
    def on_job_cancelled(self, kind: str) -> None:
        if kind == "compute":
            self.vector_panel.set_busy(False)
        if kind == "generate":
            self.generation_panel.set_busy(False)
        if kind == "task:sweep":
            self.sweep_panel.set_busy(False)
        if kind in ("task:diagnose", "task:versus", "task:grid"):
            self.analysis_panel.set_busy(False)
        self.show_status(f"{kind.replace('task:', '').capitalize()} stopped.")

    @Slot(str, int, int, str)
    def on_progress(self, kind: str, done: int, total: int, message: str) -> None:
        if kind == "compute":
            self.vector_panel.set_progress(done, total, message)
        self.show_status(message if total <= 0 else f"{message} {done}/{total}")

    @Slot(object)
    def on_failed(self, error: ErrorInfo) -> None:
        self.vector_panel.set_busy(False)
        self.generation_panel.set_busy(False)
        self.sweep_panel.set_busy(False)
        self.analysis_panel.set_busy(False)
        if self.controller.model_info is None:
            self.model_label.setText("no model")
        self._dialogs.append(show_error(self, error))

    @Slot(bool)
    def on_busy_changed(self, busy: bool) -> None:
        self.busy_bar.setVisible(busy)
        self.act_stop.setEnabled(busy)
        if not busy:
            self.vector_panel.set_busy(False)
            self.generation_panel.set_busy(False)
            self.sweep_panel.set_busy(False)
            self.analysis_panel.set_busy(False)

    def show_user_error(self, title: str, message: str) -> None:
        self._dialogs.append(show_error(self, ErrorInfo(title, message)))

    def show_status(self, text: str) -> None:
        self.statusBar().showMessage(text, 8000)

    def on_export_heatmap(self) -> None:
        path = QFileDialog.getSaveFileName(self, "Export heatmap", "heatmap.png", "PNG images (*.png)")[0]
        if path:
            self.generation_panel.heatmap.export_png(path)

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

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 - Qt naming
        if not self._closing and not self._confirm_close():
            event.ignore()
            return
        self._closing = True
        self.save_settings()
        self.controller.shutdown()
        event.accept()
