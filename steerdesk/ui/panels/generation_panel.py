"""Generation pane: prompt, steering and sampling controls, unsteered | steered streams, layer x token heatmap."""

from __future__ import annotations

from typing import Any

import numpy as np
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPlainTextEdit,
    QPushButton,
    QSlider,
    QSpinBox,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from ..layout import Reflow, scrolled
from ..vector_sets import NamedVectors, VectorSets
from .condition_panel import GateChoice, GateGroup
from .generation_output import GenerationOutput
from .inputs import Refused, checked

MODE_TIPS = {
    "add": "add: h + a*v  (v raw, or unit with Normalize)",
    "project": "project: h - a*(h.v^)v^  (a = 1 removes the direction: ablation)",
    "clamp": "clamp: h - (h.v^)v^ + a*v  (sets the component along v^)",
}
SLIDER_STEPS = 20  # slider units per 1.0 of scale
HEATMAP_MIN_HEIGHT = 170  # px: a layer x token heatmap stays readable
WINDOW_ITEM = "window…"  # the positions entry that starts a typed token window
WINDOW_TIP = ("Which tokens are steered: all, prompt only, generated only, or a typed window - first:N (the first "
              "N answer tokens), gen:A-B / gen:A- (answer tokens A..B, 0-based), prompt:A-B (prompt tokens A..B). "
              "A gen window steers the passes that produce its tokens.")


class GenerationPanel(QWidget):
    """Everything needed to run one steered-vs-unsteered comparison and watch it stream."""

    finished = Signal(object)
    """A generation this pane started finished: its ``GenerateResult``."""
    status_message = Signal(str)
    """A short message for the status bar."""
    error_occurred = Signal(str, str)
    """A problem to show: (title, message)."""

    def __init__(self, controller: Any = None, vector_sets: VectorSets | None = None,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.controller = controller  # a ModelController (None: a pane that only renders)
        self._job: Any = None  # the last job submitted here (its end clears the busy state)
        self.vector_sets = vector_sets if vector_sets is not None else VectorSets(self)
        self._sets: list[NamedVectors] = []
        self._saved_layers: list[int] = []
        self._num_layers = 0

        # prompt
        self.prompt = QPlainTextEdit()
        self.prompt.setObjectName("promptEdit")
        self.prompt.setPlaceholderText("Prompt (the user message). Ctrl+Enter generates.")
        self.prompt.setPlainText("Can you explain how a rainbow forms?")
        self.prompt.setMaximumHeight(90)
        self.system = QLineEdit()
        self.system.setPlaceholderText("optional system message (none unless given)")

        # steering
        self.vector = QComboBox()
        self.vector.setObjectName("vectorCombo")
        self.vector.setToolTip("Vector set to steer with (compute or load one in the Vectors panel).")
        self.layers = QListWidget()
        self.layers.setObjectName("layerList")
        self.layers.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.layers.setFlow(QListWidget.Flow.LeftToRight)
        self.layers.setWrapping(True)
        self.layers.setMaximumHeight(70)
        self.layers.setToolTip("Layers to steer (output of decoder block L). Ctrl/Shift-click for several.")
        self.scale_slider = QSlider(Qt.Orientation.Horizontal)
        self.scale_slider.setRange(-10 * SLIDER_STEPS, 10 * SLIDER_STEPS)
        self.scale = QDoubleSpinBox()
        self.scale.setObjectName("scaleSpin")
        self.scale.setRange(-10000.0, 10000.0)
        self.scale.setDecimals(2)
        self.scale.setSingleStep(0.1)
        self.scale.setValue(1.0)
        self.scale.setToolTip("Multiplies the raw vector (or the unit vector with Normalize).")
        self.readout = QLabel("")
        self.readout.setObjectName("strengthReadout")
        self.mode = QComboBox()
        for key, tip in MODE_TIPS.items():
            self.mode.addItem(key, key)
            self.mode.setItemData(self.mode.count() - 1, tip, Qt.ItemDataRole.ToolTipRole)
        self.mode.setToolTip("\n".join(MODE_TIPS.values()))
        self.normalize = QCheckBox("Normalize")
        self.normalize.setToolTip("Use the unit vector: the scale is then an absolute length.")
        self.positions = QComboBox()
        self.positions.setObjectName("positionsCombo")
        self.positions.setEditable(True)
        self.positions.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.positions.addItem("all tokens", "all")
        self.positions.addItem("prompt only", "prompt")
        self.positions.addItem("generated only", "generated")
        self.positions.addItem(WINDOW_ITEM, "")
        self.positions.setToolTip(WINDOW_TIP)
        self.positions.lineEdit().setPlaceholderText("first:N, gen:A-B, prompt:A-B")
        self.positions_error = QLabel("")
        self.positions_error.setObjectName("positionsError")
        self.positions_error.setStyleSheet("color: #c0392b;")
        self.positions_error.setWordWrap(True)
        self.positions_error.hide()
        self.gate_group = GateGroup()
        self.compare = QCheckBox("Compare with unsteered")
        self.compare.setChecked(True)

        # sampling
        self.temperature = QDoubleSpinBox()
        self.temperature.setRange(0.0, 5.0)
        self.temperature.setSingleStep(0.1)
        self.temperature.setSpecialValueText("greedy")
        self.temperature.setToolTip("0 = greedy decoding")
        self.top_p = QDoubleSpinBox()
        self.top_p.setRange(0.01, 1.0)
        self.top_p.setSingleStep(0.05)
        self.top_p.setValue(1.0)
        self.seed = QSpinBox()
        self.seed.setRange(-1, 2**31 - 1)
        self.seed.setValue(0)
        self.seed.setSpecialValueText("random")
        self.max_tokens = QSpinBox()
        self.max_tokens.setRange(1, 4096)
        self.max_tokens.setValue(64)

        self.generate_button = QPushButton("Generate")
        self.generate_button.setObjectName("generateButton")
        self.generate_button.setToolTip("Generate (Ctrl+Enter)")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setObjectName("stopButton")
        self.stop_button.setToolTip("Stop (Esc)")
        self.stop_button.setEnabled(False)

        # outputs (streamed text and the layer x token heatmap)
        self.output = GenerationOutput()
        out = self.output
        self.unsteered_view, self.steered_view, self.heatmap = out.unsteered_view, out.steered_view, out.heatmap
        self.color_by, self.color_layer = out.color_by, out.color_layer

        # layout
        steer_box = QGroupBox("Steering")
        sg = QGridLayout(steer_box)
        sg.addWidget(QLabel("Vector"), 0, 0)
        sg.addWidget(self.vector, 0, 1, 1, 3)
        sg.addWidget(QLabel("Layers"), 1, 0)
        sg.addWidget(self.layers, 1, 1, 1, 3)
        sg.addWidget(QLabel("Scale"), 2, 0)
        sg.addWidget(self.scale_slider, 2, 1, 1, 2)
        sg.addWidget(self.scale, 2, 3)
        sg.addWidget(self.readout, 3, 1, 1, 3)
        sg.addWidget(QLabel("Mode"), 4, 0)
        sg.addWidget(self.mode, 4, 1)
        sg.addWidget(self.normalize, 4, 2)
        sg.addWidget(QLabel("Positions"), 5, 0)
        sg.addWidget(self.positions, 5, 1)
        sg.addWidget(self.compare, 5, 2, 1, 2)
        sg.addWidget(self.positions_error, 6, 1, 1, 3)
        samp_box = QGroupBox("Sampling")
        sf = QFormLayout(samp_box)
        sf.addRow("Temperature", self.temperature)
        sf.addRow("Top-p", self.top_p)
        sf.addRow("Seed", self.seed)
        sf.addRow("Max new tokens", self.max_tokens)
        buttons = QHBoxLayout()
        buttons.addWidget(self.generate_button)
        buttons.addWidget(self.stop_button)
        sf.addRow(buttons)

        controls = QWidget()
        cl = QVBoxLayout(controls)
        cl.setContentsMargins(0, 0, 0, 0)
        cl.addWidget(QLabel("Prompt"))
        cl.addWidget(self.prompt)
        cl.addWidget(self.system)
        row = QHBoxLayout()
        row.addWidget(steer_box, 3)
        row.addWidget(samp_box, 2)
        cl.addLayout(row)
        cl.addWidget(self.gate_group)
        cl.addStretch(1)
        # Sampling beside Steering whenever both fit at their minimum widths (plus margins): at 1366 px
        # the Generate button and the sampling settings stay in view; under Steering only when narrower.
        side_by_side = steer_box.minimumSizeHint().width() + samp_box.minimumSizeHint().width() + 64
        self._reflow = Reflow(self, row, side_by_side)

        # The user controls the split; the heatmap never gets squeezed below a readable height, the
        # controls scroll instead, and extra height goes to the text and the heatmap.
        self.splitter = split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(scrolled(controls, fit_height=True))
        split.addWidget(out.texts)
        split.addWidget(out.heatmap)
        split.setChildrenCollapsible(False)
        out.texts.setMinimumHeight(150)
        out.heatmap.setMinimumHeight(HEATMAP_MIN_HEIGHT)
        for i, stretch in enumerate((0, 1, 1)):
            split.setStretchFactor(i, stretch)
        split.setSizes([controls.sizeHint().height(), 220, 260])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(split)

        self.scale_slider.valueChanged.connect(self._slider_moved)
        self.scale.valueChanged.connect(self._spin_changed)
        self.vector.currentIndexChanged.connect(self._vector_changed)
        self.layers.itemSelectionChanged.connect(self._update_readout)
        self.normalize.toggled.connect(self._update_readout)
        self.mode.currentIndexChanged.connect(self._update_readout)
        self.positions.activated.connect(self._positions_picked)
        self.positions.editTextChanged.connect(self._check_positions)
        self.gate_group.error_occurred.connect(self.error_occurred)
        self.generate_button.clicked.connect(self.generate)
        self.stop_button.clicked.connect(self.stop)
        self.vector_sets.changed.connect(lambda: self.set_vector_sets(self.vector_sets.sets()))
        self.vector_sets.selected_changed.connect(self.select_vectors)
        if controller is not None:
            controller.model_ready.connect(self._on_model_ready)
        self._spin_changed(self.scale.value())

    # -- vectors and layers ------------------------------------------------------------
    def set_vector_sets(self, sets: list[NamedVectors]) -> None:
        """Offer the session's vector sets; unusable ones are listed but disabled."""
        current = self.vector.currentData()
        self._sets = list(sets)
        self.vector.blockSignals(True)
        self.vector.clear()
        self.vector.addItem("(none: unsteered only)", "")
        for s in self._sets:
            self.vector.addItem(s.name if s.usable else f"{s.name} [unusable]", s.name)
            idx = self.vector.count() - 1
            if not s.usable:
                self.vector.model().item(idx).setEnabled(False)
                self.vector.setItemData(idx, s.reason, Qt.ItemDataRole.ToolTipRole)
        names = [s.name for s in self._sets if s.usable]
        pick = current if current in names else (names[-1] if names else "")
        self.vector.setCurrentIndex(max(0, self.vector.findData(pick)))
        self.vector.blockSignals(False)
        self._vector_changed()

    def select_vectors(self, name: str) -> None:
        """Steer with the set called ``name`` if it is offered and usable."""
        idx = self.vector.findData(name)
        if idx >= 0 and self.vector.model().item(idx).isEnabled():
            self.vector.setCurrentIndex(idx)

    def current_set(self) -> NamedVectors | None:
        """The usable set chosen in the Vector box, or None (unsteered)."""
        name = self.vector.currentData()
        return next((s for s in self._sets if s.name == name and s.usable), None)

    def set_num_layers(self, n: int) -> None:
        """Fill the layer list for a model with ``n`` blocks (keeps the selection that still fits)."""
        chosen = self.selected_layers()
        self._num_layers = n
        self.layers.blockSignals(True)
        self.layers.clear()
        for i in range(n):
            self.layers.addItem(str(i))
        default = [i for i in chosen if i < n] or ([n // 2] if n else [])
        s = self.current_set()
        if s is not None and s.vectors.num_layers == n:
            default = [i for i in default if s.vectors.has_direction(i)] or s.vectors.layers_with_direction[n // 2:][:1]
        for i in default:
            self.layers.item(i).setSelected(True)
        self.layers.blockSignals(False)
        self.color_layer.setRange(0, max(0, n - 1))
        if default:
            self.color_layer.setValue(default[0])
        self._mark_layers_without_direction()
        self._update_readout()

    def _on_model_ready(self, info: Any) -> None:
        self.set_num_layers(info.num_layers)
        self.gate_group.model_info = info
        self.gate_group.set_num_layers(info.num_layers)
        layers = [i for i in self._saved_layers if i < info.num_layers]
        if layers:
            self.set_layers(layers)

    def selected_layers(self) -> list[int]:
        """The layers picked in the layer list, ascending."""
        return sorted(int(it.text()) for it in self.layers.selectedItems())

    def set_layers(self, layers: list[int]) -> None:
        """Pick ``layers`` in the layer list (those out of range are ignored)."""
        self.layers.clearSelection()
        for i in layers:
            if 0 <= i < self.layers.count():
                self.layers.item(i).setSelected(True)

    def set_scale(self, value: float) -> None:
        """Set the steering scale."""
        self.scale.setValue(value)

    def _slider_moved(self, v: int) -> None:
        value = v / SLIDER_STEPS
        if abs(self.scale.value() - value) > 1e-9:
            self.scale.setValue(value)

    def _spin_changed(self, value: float) -> None:
        self.scale_slider.blockSignals(True)
        self.scale_slider.setValue(int(round(max(-10.0, min(10.0, value)) * SLIDER_STEPS)))
        self.scale_slider.blockSignals(False)
        self._update_readout()

    def _vector_changed(self, *_: Any) -> None:
        s = self.current_set()
        self.vector_sets.set_steering(s.name if s is not None else "")
        if s is not None and s.vectors.num_layers != self._num_layers:
            self.set_num_layers(s.vectors.num_layers)
        self._mark_layers_without_direction()
        self._update_readout()

    def _mark_layers_without_direction(self) -> None:
        """Grey out (and deselect) the layers the current vector set has no direction for."""
        s = self.current_set()
        self.layers.blockSignals(True)
        for i in range(self.layers.count()):
            item = self.layers.item(i)
            usable = s is None or s.vectors.has_direction(i)
            flags = item.flags()
            on = Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable
            item.setFlags(flags | on if usable else flags & ~on)
            item.setToolTip("" if usable else f"{s.name} has no direction for layer {i}: nothing to steer with")
            if not usable:
                item.setSelected(False)
        self.layers.blockSignals(False)

    def _update_readout(self, *_: Any) -> None:
        s = self.current_set()
        layers = self.selected_layers()
        if s is None or not layers:
            self.readout.setText("pick a vector set and layers" if s is None else "pick layers")
            return
        mode = self.mode.currentData()
        if mode == "project":
            self.readout.setText(f"removes {self.scale.value():.0%} of the component along v at "
                                 f"{len(layers)} layer(s)")
            return
        rel = s.vectors.relative_strength(self.scale.value(), self.normalize.isChecked()).numpy()[layers]
        if not np.isfinite(rel).all():
            self.readout.setText("perturbation size unknown (no typical norms in this file)")
            return
        parts = ", ".join(f"L{layer}: {r:.0%}" for layer, r in zip(layers[:4], rel[:4]))
        more = " …" if len(layers) > 4 else ""
        self.readout.setText(f"|a·v| = {parts}{more} of typical |h|")
        self.readout.setStyleSheet("color: #c0392b;" if rel.max() > 1.0 else "")

    # -- jobs ------------------------------------------------------------------------
    def sampling(self) -> Any:
        """The ``SamplingSettings`` of the Sampling box."""
        from ...core.generate import SamplingSettings

        seed = self.seed.value()
        return SamplingSettings(max_new_tokens=self.max_tokens.value(), temperature=self.temperature.value(),
                                top_p=self.top_p.value(), seed=None if seed < 0 else seed)

    def steering_spec(self) -> Any:
        """The ``SteeringSpec`` of the Steering box, or None without a vector set.

        Raises ``SteerdeskError`` when the chosen set does not fit the model, no layer is picked
        or a picked layer has no direction (checked here so the message comes before the run).
        """
        from ...core.errors import SteerdeskError
        from ...jobs import SteeringSpec

        s = self.current_set()
        if s is None:
            if self.vector.currentData():
                raise SteerdeskError("The selected vectors do not fit the loaded model.")
            return None
        layers = self.selected_layers()
        if not layers:
            raise SteerdeskError("Select at least one layer to steer.")
        spec = SteeringSpec(vectors=s.vectors, layers=tuple(layers), scale=self.scale.value(),
                            mode=self.mode.currentData(), normalize=self.normalize.isChecked(),
                            positions=self.positions_value())
        s.vectors.require_layers(layers)  # the no-direction check, before the outputs are cleared
        return spec

    def positions_value(self) -> str:
        """The steering positions: a named choice's key, or the typed window without spaces.

        Raises ``SteerdeskError`` (one line, with the accepted forms) for text ``parse_positions``
        cannot read; the text stays in the box.
        """
        from ...core.errors import SteerdeskError
        from ...core.parsing import parse_positions

        text = self.positions.currentText()
        idx = self.positions.findText(text)
        if idx >= 0 and self.positions.itemData(idx):
            return str(self.positions.itemData(idx))
        if not text.strip() or text == WINDOW_ITEM:
            raise SteerdeskError("Type a token window in Positions, e.g. first:8, gen:2-10 or prompt:0-5.")
        parse_positions(text)
        return text.replace(" ", "").lower()

    def set_positions(self, positions: str) -> None:
        """Show ``positions`` (a named position or a window string)."""
        idx = self.positions.findData(positions) if positions else -1
        if idx >= 0:
            self.positions.setCurrentIndex(idx)
        else:
            self.positions.setEditText(positions)
        self._check_positions()

    def _positions_picked(self, index: int) -> None:
        if self.positions.itemText(index) == WINDOW_ITEM:  # start a typed window
            self.positions.setEditText("first:8")
            self.positions.lineEdit().selectAll()
            self.positions.setFocus()

    def _check_positions(self, *_: Any) -> bool:
        """Validate the positions box as it is typed: a one-line error under it, nothing changed."""
        from ...core.errors import SteerdeskError

        try:
            self.positions_value()
        except SteerdeskError as exc:
            self.positions_error.setText(str(exc))
            self.positions_error.show()
            return False
        self.positions_error.hide()
        return True

    def set_gate(self, choice: GateChoice | None) -> None:
        """Load a gate with a sweep cell's settings: its gate (switched on), or the gate switched off
        (an ungated sweep; the group keeps its values for later)."""
        if choice is None:
            self.gate_group.setChecked(False)
        else:
            self.gate_group.use(choice)

    def use_gate(self, choice: GateChoice) -> None:
        """The calibration view's 'Use this gate': fill the gate group and switch it on."""
        self.gate_group.use(choice)
        self.status_message.emit(f"Gate from the calibration: layer {choice.layer}, "
                                 f"score {'>' if choice.side == 'above' else '<'} {choice.threshold:g}.")

    def steering_options(self) -> tuple[str, bool]:
        """``(mode, normalize)`` of the Steering box (the generation grid uses them)."""
        return self.mode.currentData(), self.normalize.isChecked()

    def steering_conditions(self) -> tuple[str, Any]:
        """``(positions, gate)`` of the Steering box and the gate group (the generation grid uses them):
        the positions key or typed window, and the ``ConditionGate`` or None. Raises ``SteerdeskError``
        (one line) for a window or gate the pane cannot read."""
        return self.positions_value(), self.gate_group.gate()

    def build_spec(self) -> Any:
        """The ``GenerateSpec`` of the pane: the prompt once, or unsteered and steered side by side."""
        from ...core.errors import SteerdeskError
        from ...jobs import GenerateSpec

        prompt = self.prompt.toPlainText().strip()
        if not prompt:
            raise SteerdeskError("Write a prompt first.")
        steering = self.steering_spec()
        gate = self.gate_group.gate()
        if gate is not None and steering is None:
            raise SteerdeskError("The gate decides whether a row is steered: pick a vector set to steer with.")
        return GenerateSpec.single(prompt, steering, compare=steering is not None and self.compare.isChecked(),
                                   sampling=self.sampling(), system=self.system.text().strip() or None,
                                   watch=steering is not None, gate=gate)

    def generate(self) -> None:
        """Generate (the Generate button, Ctrl+Enter): submit the Spec and stream the result here.

        A generation already running is superseded (its results are dropped).
        """
        try:
            spec = checked(self.controller, self.build_spec, "Cannot generate")
        except Refused as exc:
            self.error_occurred.emit(exc.title, str(exc))
            return
        flags = spec.flags()
        self.output.start(self._num_layers, len(flags) > 1, len(flags) - 1, self.current_set(),
                          spec.steering.positions if spec.steering is not None else "all", spec.gate is not None)
        self.set_busy(True)
        self._job = job = self.controller.submit(spec)
        job.text.connect(self.output.append_text)
        job.steps.connect(self.output.add_steps)
        job.finished.connect(self._on_finished)
        job.cancelled.connect(lambda: self.status_message.emit(self.output.finish_stopped()))
        job.failed.connect(lambda _e: self.output.stop_clock())
        job.ended.connect(lambda: self.set_busy(False) if self._job is job else None)

    def stop(self) -> None:
        """Stop the running job (the Stop button, Esc)."""
        if self.controller is not None:
            self.controller.stop()

    def _on_finished(self, result: Any) -> None:
        self.set_busy(False)
        self.status_message.emit(self.output.finish(result.rows, result.seconds))
        self.finished.emit(result)

    def try_steering(self, name: str, layers: list[int], scale: float, mode: str, normalize: bool = False,
                     positions: str = "all") -> None:
        """Load a sweep cell's full settings (set, layers, scale, mode, normalize, positions), say so,
        and generate a comparison."""
        if name:
            self.select_vectors(name)
        self.set_layers(layers)
        self.set_scale(scale)
        self.mode.setCurrentIndex(max(0, self.mode.findData(mode)))
        self.normalize.setChecked(normalize)
        self.set_positions(positions)
        self.compare.setChecked(True)
        where = f"layer {layers[0]}" if len(layers) == 1 else f"layers {','.join(map(str, layers))}"
        self.status_message.emit(f"Loaded the sweep cell: {name or 'current set'}, {where}, scale {scale:g}, "
                                 f"mode {mode}, normalize {'on' if normalize else 'off'}, positions {positions}; "
                                 "generating.")
        self.generate()

    def restore_settings(self, s: Any) -> None:
        """Prompt, scale, token budget, mode and (once a model is loaded) layers from ``QSettings``."""
        prompt = s.value("generate/prompt")
        if isinstance(prompt, str) and prompt:
            self.prompt.setPlainText(prompt)
        self.scale.setValue(float(s.value("generate/scale", self.scale.value())))
        self.max_tokens.setValue(int(s.value("generate/max_tokens", self.max_tokens.value())))
        self.mode.setCurrentIndex(max(0, self.mode.findData(s.value("generate/mode", "add"))))
        saved = str(s.value("generate/layers", "") or "")
        self._saved_layers = [int(x) for x in saved.split(",") if x.strip().isdigit()]

    def save_settings(self, s: Any) -> None:
        """Store what :meth:`restore_settings` reads."""
        s.setValue("generate/prompt", self.prompt.toPlainText())
        s.setValue("generate/scale", self.scale.value())
        s.setValue("generate/max_tokens", self.max_tokens.value())
        s.setValue("generate/mode", self.mode.currentData())
        s.setValue("generate/layers", ",".join(str(x) for x in self.selected_layers()))

    # -- outputs -----------------------------------------------------------------------
    def set_busy(self, busy: bool) -> None:
        """Generate disabled and Stop enabled while busy."""
        self.generate_button.setEnabled(not busy)
        self.stop_button.setEnabled(busy)

    def copy_text(self) -> None:
        """Copy both outputs to the clipboard."""
        self.output.copy_text()
