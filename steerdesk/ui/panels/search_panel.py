"""Search panel: a multi-objective steering search (issue 16) and its Pareto front, live.

Self-contained: the window gives it a ``submit(spec) -> handle`` callable (``ModelController.submit``),
a ``stop()`` callable and an ``inputs()`` callable that returns the vector set and held-out pairs
(the :class:`~steerdesk.jobs.search.SearchSpec` keyword arguments the panel cannot know). The
handle is anything with the Qt signals of :class:`steerdesk.ui.controller.JobHandle` that the panel
uses: ``partial(object)`` (a :class:`~steerdesk.core.search.TrialResult` per finished trial),
``progress(int, int, str)``, ``finished(object)`` (the :class:`~steerdesk.core.search.SearchResult`),
``failed(object)`` and ``ended()``.

The scatter: x = KL to unsteered on neutral text, y = margin delta (both nats/token); colour = the
range's first layer; dominated trials faded; trials beyond the fluency budget drawn as crosses;
hovering a point shows its settings; clicking emits :attr:`SearchPanel.settings_chosen`. Stop keeps
what was found (the study keeps every finished trial); "Resume..." opens a study file and shows it
(a later Start continues it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ...core.defaults import FLUENCY_BUDGET as DEFAULT_BUDGET
from ...core.defaults import SEARCH_BATCH as DEFAULT_BATCH
from ...core.defaults import SEARCH_TRIALS as DEFAULT_TRIALS
from ...core.errors import SteerdeskError

if TYPE_CHECKING:  # the window starts without torch: the search's types only for the checker
    from ...core.search import SearchResult, SearchSpace, TrialResult
    from ...jobs.search import SearchSpec

SubmitFn = Callable[["SearchSpec"], Any]
InputsFn = Callable[[], Mapping[str, Any]]


def window_inputs(controller: Any, vector_sets: Any, pairs: Any) -> InputsFn:
    """The window's ``inputs()``: the analysis vector set (the steering set, else the selected one)
    and the dataset panel's held-out pairs, as the Sweep panel takes them. Raises
    :class:`~steerdesk.ui.panels.inputs.Refused` (a one-line message) when one is missing."""
    from .inputs import need_heldout, need_model, need_vectors

    def inputs() -> Mapping[str, Any]:
        need_model(controller)
        item = need_vectors(vector_sets)
        heldout = need_heldout(pairs)
        return {"vectors": item.vectors, "heldout": heldout, "dataset": pairs.dataset(),
                "heldout_fraction": pairs.heldout_fraction()}

    return inputs


def layer_colour(layer: int, num_layers: int) -> tuple[int, int, int]:
    """A viridis-like colour for ``layer`` of ``num_layers`` (first layer of a trial's range)."""
    stops = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
    t = 0.0 if num_layers <= 1 else max(0.0, min(1.0, layer / (num_layers - 1)))
    x = t * (len(stops) - 1)
    i = min(int(x), len(stops) - 2)
    f = x - i
    a, b = stops[i], stops[i + 1]
    return (round(a[0] + (b[0] - a[0]) * f), round(a[1] + (b[1] - a[1]) * f), round(a[2] + (b[2] - a[2]) * f))


def describe_trial(t: TrialResult) -> str:
    """The hover text of a trial: settings and scores."""
    s = t.settings
    where = "?"
    if s is not None:
        where = f"layer {s.layers[0]}" if len(s.layers) == 1 else f"layers {s.layers[0]}-{s.layers[-1]}"
    phase = {"start": " (start point)", "refine": " (refine phase)"}.get(t.phase, "")
    lines = [f"trial {t.number}{phase}: {where}"]
    if s is not None:
        lines.append(f"scale {s.scale:.4g} ({s.mode}{', normalized' if s.normalize else ''}"
                     + (f", searched {s.searched_scale:.4g}" if s.normalize and s.mode != "project" else "") + ")")
    lines.append(f"margin delta {t.margin_delta:+.4f}, KL {t.kl:.4f}" if t.margin_delta is not None and t.kl is not None
                 else "not scored")
    if t.fluency_delta is not None:
        lines.append(f"fluency delta {t.fluency_delta:+.4f}{'' if t.within_budget else ' (beyond the budget)'}")
    if t.on_front:
        lines.append("on the Pareto front")
    return "\n".join(lines)


class SearchPanel(QWidget):
    """Controls of a search, its live Pareto scatter and the settings of a clicked point."""

    settings_chosen = Signal(dict)
    """A point was clicked: ``{"layers", "scale", "mode", "normalize", "positions", "searched_scale",
    "trial", "margin_delta", "kl", "fluency_delta", "study"}`` (load into the generation pane)."""
    started = Signal()
    """A search was submitted."""
    error_occurred = Signal(str, str)
    """A problem to show: (title, message)."""
    status_message = Signal(str)
    """A short message for the status bar."""

    def __init__(self, submit: SubmitFn | None = None, stop: Callable[[], None] | None = None,
                 inputs: InputsFn | None = None, num_layers: int = 30, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.submit_fn = submit
        self.stop_fn = stop
        self.inputs_fn = inputs
        self.num_layers = num_layers
        self.trials: dict[int, TrialResult] = {}
        self.result: SearchResult | None = None
        self.fluency_budget = DEFAULT_BUDGET
        self._job: Any = None
        self._hovered: TrialResult | None = None

        self.study = QLineEdit()
        self.study.setPlaceholderText("study file (.db): created, or resumed when it exists")
        self.new_button = QPushButton("New…")
        self.new_button.clicked.connect(self._choose_new_study)
        self.resume_button = QPushButton("Resume…")
        self.resume_button.setToolTip("Open a study file: show its trials; Start continues it.")
        self.resume_button.clicked.connect(self._choose_resume)
        self.trials_spin = QSpinBox()
        self.trials_spin.setRange(1, 100000)
        self.trials_spin.setValue(DEFAULT_TRIALS)
        self.trials_spin.setToolTip("Total evaluated trials the study should hold (a resumed study counts its own).")
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 256)
        self.batch_spin.setValue(DEFAULT_BATCH)
        self.batch_spin.setToolTip("Trials proposed and scored together (one scoring pass).")
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.space = QLineEdit()
        self.space.setPlaceholderText("default: every layer, span 1-4, scale 0..2, all modes, normalize no/yes")
        self.space.setToolTip("e.g. layers=8-22;span=3;scale=0..2;modes=add,clamp;normalize=both")
        self.budget = QDoubleSpinBox()
        self.budget.setRange(0.0, 100.0)
        self.budget.setDecimals(3)
        self.budget.setSingleStep(0.1)
        self.budget.setValue(DEFAULT_BUDGET)
        self.budget.setSuffix(" nats/token")
        self.start_button = QPushButton("Start search")
        self.start_button.clicked.connect(self.start)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Stop; every finished trial is kept (the batch in flight is redone on resume).")
        self.stop_button.clicked.connect(self.stop)
        self.stop_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.summary = QLabel("No search yet.")
        self.summary.setWordWrap(True)
        self.hover_label = QLabel("")
        self.hover_label.setWordWrap(True)

        self.plot = pg.PlotWidget()
        self.plot.setLabel("bottom", "KL to unsteered on neutral text (nats/token)")
        self.plot.setLabel("left", "margin delta (nats/token)")
        self.plot.showGrid(x=True, y=True, alpha=0.2)
        self.scatter = pg.ScatterPlotItem(hoverable=True, tip=None, hoverSize=14)
        self.scatter.sigClicked.connect(self._on_clicked)
        self.scatter.sigHovered.connect(self._on_hovered)
        self.plot.addItem(self.scatter)
        dash = pg.mkPen((120, 120, 120), width=1, style=Qt.PenStyle.DashLine)
        self.front_line = self.plot.plot([], [], pen=dash)

        study_row = QHBoxLayout()
        study_row.addWidget(self.study, 1)
        study_row.addWidget(self.new_button)
        study_row.addWidget(self.resume_button)
        form = QFormLayout()
        form.addRow("Study", study_row)
        form.addRow("Trials", self.trials_spin)
        form.addRow("Batch", self.batch_spin)
        form.addRow("Seed", self.seed_spin)
        form.addRow("Space", self.space)
        form.addRow("Fluency budget", self.budget)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.stop_button)
        buttons.addWidget(self.progress, 1)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.plot, 1)
        layout.addWidget(self.hover_label)
        layout.addWidget(self.summary)

    # -- building and running --------------------------------------------------------------
    def build_spec(self) -> SearchSpec:
        """The :class:`SearchSpec` of the controls plus ``inputs()``; ``SteerdeskError`` when incomplete.

        For an existing study file the seed, space and budget are left to the study (``None``)
        unless the controls differ from what it holds, which the job then refuses in one line.
        """
        from ...core.search import SearchSpace
        from ...jobs.search import SearchSpec

        if self.inputs_fn is None:
            raise SteerdeskError("No vectors and held-out pairs to search with.")
        path = self.study.text().strip()
        if not path:
            raise SteerdeskError("Choose a study file (New… or Resume…).")
        kwargs = dict(self.inputs_fn())
        if "vectors" not in kwargs or "heldout" not in kwargs:
            raise SteerdeskError("The search needs a vector set and held-out pairs.")
        space = None
        if self.space.text().strip():
            vectors = kwargs["vectors"]
            layers = int(getattr(vectors, "num_layers", self.num_layers))
            space = SearchSpace.parse(self.space.text(), SearchSpace.default(vectors, layers))
        exists = Path(path).exists()
        stored = self.result if (self.result is not None and self.result.study == path) else None
        seed: int | None = self.seed_spin.value()
        budget: float | None = self.budget.value()
        if exists and stored is not None:
            seed = None if seed == stored.seed else seed
            budget = None if math.isclose(budget or 0.0, stored.fluency_budget) else budget
            space = None if space == stored.space else space
        elif exists:
            seed, budget = None, None
        return SearchSpec(study=path, trials=self.trials_spin.value(), batch=self.batch_spin.value(), space=space,
                          seed=seed, fluency_budget=budget, **kwargs)

    def start(self) -> None:
        """Submit the search through ``submit`` (a stored study is continued, its points kept)."""
        if self.submit_fn is None:
            return
        try:
            spec = self.build_spec()
        except SteerdeskError as exc:
            self.error_occurred.emit("Cannot start the search", str(exc))
            return
        if self.result is None or self.result.study != spec.study:
            self.clear()
        self.fluency_budget = spec.fluency_budget if spec.fluency_budget is not None else self.fluency_budget
        self.set_busy(True)
        self.started.emit()
        self._job = job = self.submit_fn(spec)
        job.partial.connect(self.add_trial)
        job.progress.connect(lambda done, total, _msg: self.set_progress(done, total))
        job.finished.connect(self.show_result)
        job.failed.connect(self._on_failed)
        if hasattr(job, "cancelled"):
            job.cancelled.connect(lambda: self._on_stopped(spec.study))
        job.ended.connect(lambda: self.set_busy(False) if self._job is job else None)

    def stop(self) -> None:
        """Ask the running search to stop; finished trials stay in the study and on the plot."""
        if self.stop_fn is not None:
            self.stop_fn()

    def set_busy(self, busy: bool) -> None:
        self.start_button.setEnabled(not busy)
        self.resume_button.setEnabled(not busy)
        self.new_button.setEnabled(not busy)
        self.stop_button.setEnabled(busy)

    def set_progress(self, done: int, total: int) -> None:
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(done)
        self.progress.setFormat(f"{done}/{total} trials")

    def _on_stopped(self, path: str) -> None:
        """A stopped search: show what the study kept (every finished trial), read from the file."""
        self.set_busy(False)
        if Path(path).exists() and self.open_study(path):
            self.summary.setText("Stopped. " + self.summary.text())

    def _on_failed(self, error: Any) -> None:
        self.set_busy(False)
        message = getattr(error, "message", None) or str(error)
        self.error_occurred.emit("Search failed", message)

    # -- study files -----------------------------------------------------------------------
    def _choose_new_study(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "New study file", "search.db", "Optuna study (*.db *.sqlite)")
        if path:
            if Path(path).exists():
                self.open_study(path)
            else:
                self.study.setText(path)
                self.clear()

    def _choose_resume(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Resume a study", "", "Optuna study (*.db *.sqlite);;All files (*)")
        if path:
            self.open_study(path)

    def open_study(self, path: str) -> bool:
        """Show the study at ``path`` (read without writing) and make Start continue it.

        The controls take the study's seed, space and budget. A file that is not a steerdesk
        study is reported through ``error_occurred`` and changes nothing; returns success.
        """
        from ...core.search import load_result

        try:
            result = load_result(path)
        except SteerdeskError as exc:
            self.error_occurred.emit("Cannot open the study", str(exc))
            return False
        self.study.setText(str(path))
        self.seed_spin.setValue(result.seed)
        self.budget.setValue(result.fluency_budget)
        self.space.setText(_space_text(result.space))
        self.trials_spin.setValue(max(self.trials_spin.value(), len(result.evaluated)))
        self.num_layers = int(result.model.get("num_layers") or self.num_layers)
        self.show_result(result)
        self.status_message.emit(f"Study {Path(path).name}: {len(result.evaluated)} trials; Start continues it.")
        return True

    # -- points ----------------------------------------------------------------------------
    def clear(self) -> None:
        self.trials.clear()
        self.result = None
        self._hovered = None
        self.hover_label.setText("")
        self.summary.setText("No trials yet.")
        self._redraw()

    def add_trial(self, trial: TrialResult) -> None:
        """Add (or replace) one finished trial and redraw the front (live, as trials finish)."""
        self.trials[trial.number] = trial
        self._mark_front()
        self._redraw()
        done = [t for t in self.trials.values() if t.state == "complete"]
        self.summary.setText(f"{len(done)} trials scored; {sum(t.on_front for t in done)} on the Pareto front.")

    def show_result(self, result: SearchResult) -> None:
        """Show a finished (or stopped, or reopened) search: every trial, front, best."""
        self.result = result
        self.fluency_budget = result.fluency_budget
        self.trials = {t.number: t for t in result.trials if t.state in ("complete", "failed")}
        self._redraw()
        best = result.best
        text = (f"{len(result.evaluated)} trials in {Path(result.study).name}"
                + (" (stopped: Start continues)" if result.stopped else "")
                + f"; {len(result.pareto)} on the Pareto front. ")
        if best is not None and best.settings is not None:
            text += (f"Best within the fluency budget: trial {best.number}, {best.settings.label()}, "
                     f"margin {best.margin_delta:+.3f}, KL {best.kl:.3f}.")
        else:
            text += "No trial within the fluency budget."
        self.summary.setText(text)

    def _mark_front(self) -> None:
        from ...core.search import pareto_mask

        done = [t for t in self.trials.values() if t.state == "complete" and t.margin_delta is not None
                and t.kl is not None]
        for t, on in zip(done, pareto_mask([t.margin_delta for t in done], [t.kl for t in done])):  # type: ignore[misc]
            t.on_front = on
            t.within_budget = t.fluency_delta is not None and -t.fluency_delta <= self.fluency_budget

    def points(self) -> list[dict[str, Any]]:
        """What is drawn, one dict per point: ``trial``, ``x`` (KL), ``y`` (margin delta), ``colour``
        (RGB of the first layer), ``alpha`` (255 on the front, faded when dominated), ``symbol``
        (``o`` within the fluency budget, ``x`` beyond it)."""
        out = []
        for t in sorted(self.trials.values(), key=lambda t: t.number):
            if t.state != "complete" or t.settings is None or t.kl is None or t.margin_delta is None:
                continue
            if not (math.isfinite(t.kl) and math.isfinite(t.margin_delta)):
                continue
            out.append({"trial": t.number, "x": t.kl, "y": t.margin_delta,
                        "colour": layer_colour(t.settings.layers[0], self.num_layers),
                        "alpha": 255 if t.on_front else 70, "symbol": "o" if t.within_budget else "x"})
        return out

    def _redraw(self) -> None:
        spots = []
        for p in self.points():
            r, g, b = p["colour"]
            a = p["alpha"]
            spots.append({"pos": (p["x"], p["y"]), "data": p["trial"], "symbol": p["symbol"], "size": 11,
                          "brush": pg.mkBrush(r, g, b, a),
                          "pen": pg.mkPen(20, 20, 20, a) if a == 255 else pg.mkPen(None)})
        self.scatter.setData(spots)
        front = sorted((p for p in self.points() if p["alpha"] == 255), key=lambda p: p["x"])
        self.front_line.setData([p["x"] for p in front], [p["y"] for p in front])

    # -- interaction -----------------------------------------------------------------------
    def hover_text(self, number: int) -> str:
        """The text shown when hovering trial ``number``."""
        return describe_trial(self.trials[number])

    def choose(self, number: int) -> dict[str, Any]:
        """Emit :attr:`settings_chosen` for trial ``number`` (what a click does) and return the dict."""
        t = self.trials[number]
        if t.settings is None:
            raise SteerdeskError(f"Trial {number} has no settings.")
        chosen = {**t.settings.to_dict(), "trial": t.number, "margin_delta": t.margin_delta, "kl": t.kl,
                  "fluency_delta": t.fluency_delta, "study": self.study.text().strip() or None}
        self.settings_chosen.emit(chosen)
        self.status_message.emit(f"Trial {number} loaded: {t.settings.label()}.")
        return chosen

    def _on_clicked(self, _item: Any, points: Any, _ev: Any) -> None:
        pts = list(points)
        if pts:
            self.choose(int(pts[0].data()))

    def _on_hovered(self, _item: Any, points: Any, _ev: Any) -> None:
        pts = list(points)
        if not pts:
            self._hovered = None
            self.hover_label.setText("")
            return
        number = int(pts[0].data())
        self._hovered = self.trials.get(number)
        text = self.hover_text(number)
        self.hover_label.setText(text.replace("\n", " · "))
        self.scatter.setToolTip(text)


def _space_text(space: SearchSpace) -> str:
    norm = "both" if len(space.normalize) > 1 else ("yes" if space.normalize[0] else "no")
    return (f"layers={space.first_layer}-{space.last_layer};span={space.max_span};"
            f"scale={space.scale_min!r}..{space.scale_max!r};modes={','.join(space.modes)};normalize={norm}"
            + (f";positions={space.positions}" if space.positions != "all" else ""))


__all__ = ["SearchPanel", "describe_trial", "layer_colour"]
