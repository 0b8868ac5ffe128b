"""The optimized method's controls (layers, main settings) and its live loss curves (issue 17)."""

from __future__ import annotations

from typing import Any

import pyqtgraph as pg
from PySide6.QtWidgets import QDoubleSpinBox, QFormLayout, QGroupBox, QLineEdit, QSpinBox, QVBoxLayout, QWidget

__all__ = ["OptimizeBox", "LossPlot"]

#: Pen colours of successive layers' curves (train dashed, validation solid, same colour).
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


class OptimizeBox(QGroupBox):
    """Layers to train and the main :class:`~steerdesk.core.optimize.OptimizeSettings` (the others keep
    their defaults: docs/decisions.md, 'Optimized vectors')."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Optimized: train the vector on the pairs", parent)

        self.layers = QLineEdit()
        self.layers.setObjectName("optimizeLayers")
        self.layers.setPlaceholderText("e.g. 15 or 12,15")
        self.layers.setToolTip("Layers whose vector is trained (one vector per layer, each on its own).")
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 200)
        self.epochs.setValue(10)
        self.epochs.setToolTip("Most passes over the training pairs (early stopping may end sooner).")
        self.kl_weight = QDoubleSpinBox()
        self.kl_weight.setRange(0.0, 100.0)
        self.kl_weight.setDecimals(3)
        self.kl_weight.setSingleStep(0.1)
        self.kl_weight.setValue(1.0)
        self.kl_weight.setToolTip("Weight of the KL to the unsteered model on neutral text (0: none).")
        self.max_norm = QDoubleSpinBox()
        self.max_norm.setRange(0.1, 100.0)
        self.max_norm.setDecimals(2)
        self.max_norm.setValue(2.0)
        self.max_norm.setToolTip("Bound on |v| / |mean difference| after every step.")
        self.seed = QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.seed.setToolTip("Seed of the validation split, shuffling and directions: same seed, same vector.")
        form = QFormLayout(self)
        form.addRow("Layers", self.layers)
        form.addRow("Epochs", self.epochs)
        form.addRow("KL weight", self.kl_weight)
        form.addRow("Max norm (x mean-diff)", self.max_norm)
        form.addRow("Seed", self.seed)
        self.set_defaults()

    def set_defaults(self) -> None:
        """The fields from ``OptimizeSettings()`` (so the window offers the documented defaults)."""
        from ...core.optimize_settings import OptimizeSettings

        d = OptimizeSettings()
        self.epochs.setValue(d.epochs)
        self.kl_weight.setValue(d.kl_weight)
        self.max_norm.setValue(d.max_norm)
        self.seed.setValue(d.seed)

    def chosen_layers(self, num_layers: int | None) -> tuple[int, ...]:
        """The layers field parsed and checked against the model (``SteerdeskError`` with a sentence)."""
        from ...core.errors import SteerdeskError
        from ...core.parsing import parse_layers

        text = self.layers.text().strip()
        if not text:
            raise SteerdeskError("The optimized method trains chosen layers: write them in Layers (e.g. 15).")
        return tuple(parse_layers(text, num_layers))

    def settings(self) -> Any:
        """An :class:`~steerdesk.core.optimize.OptimizeSettings` of the fields (checked)."""
        from dataclasses import replace

        from ...core.optimize_settings import OptimizeSettings

        s = replace(OptimizeSettings(), epochs=self.epochs.value(), kl_weight=self.kl_weight.value(),
                    max_norm=self.max_norm.value(), seed=self.seed.value())
        s.check()
        return s


class LossPlot(pg.PlotWidget):
    """Train (dashed) and validation (solid) loss per epoch, one colour per layer, from EpochReports."""

    def __init__(self, parent: QWidget | None = None) -> None:
        from PySide6.QtGui import QPalette
        from PySide6.QtWidgets import QApplication

        pal = QApplication.palette()  # pyqtgraph draws on black unless told: follow the application
        bg, fg = pal.color(QPalette.ColorRole.Base), pal.color(QPalette.ColorRole.Text)
        pg.setConfigOptions(background=bg, foreground=fg)
        super().__init__(parent, title="Loss (nats)")
        self.setObjectName("lossPlot")
        self.setLabel("bottom", "epoch (solid: validation, dashed: train)")
        self.setToolTip("Optimisation loss per epoch and layer: validation (solid, epoch 0 = the mean "
                        "difference) and the epoch's mean training loss (dashed).")
        self.setMenuEnabled(False)
        self.addLegend(offset=(-4, 4), labelTextColor=fg, brush=pg.mkBrush(bg))
        self.points: dict[int, dict[str, list[tuple[int, float]]]] = {}
        self._curves: dict[tuple[int, str], Any] = {}

    def reset(self) -> None:
        """Forget every curve (a new optimisation starts)."""
        self.clear()
        legend = self.plotItem.legend
        if legend is not None:
            legend.clear()
        self.points.clear()
        self._curves.clear()

    def add(self, report: Any) -> None:
        """Add one :class:`~steerdesk.core.optimize.EpochReport` (anything else is ignored)."""
        from ...core.optimize_settings import EpochReport

        if not isinstance(report, EpochReport):
            return
        layer = report.layer
        pts = self.points.setdefault(layer, {"train": [], "val": []})
        pts["val"].append((report.epoch, report.val_loss))
        if report.train_loss is not None:
            pts["train"].append((report.epoch, report.train_loss))
        colour = _COLOURS[sorted(self.points).index(layer) % len(_COLOURS)]
        for kind, style in (("train", pg.QtCore.Qt.PenStyle.DashLine), ("val", pg.QtCore.Qt.PenStyle.SolidLine)):
            xs = [p[0] for p in pts[kind]]
            ys = [p[1] for p in pts[kind]]
            key = (layer, kind)
            if key not in self._curves:
                name = f"layer {layer}" if kind == "val" else None
                self._curves[key] = self.plot([], [], pen=pg.mkPen(colour, width=2, style=style), symbol="o",
                                              symbolSize=4, symbolBrush=colour, name=name)
            self._curves[key].setData(xs, ys)


def optimize_layout(box: OptimizeBox, plot: LossPlot) -> QWidget:
    """The box above the plot, in one widget (shown only while the optimized method is chosen)."""
    w = QWidget()
    lay = QVBoxLayout(w)
    lay.setContentsMargins(0, 0, 0, 0)
    lay.addWidget(box)
    lay.addWidget(plot, 1)
    plot.setMinimumHeight(140)
    return w
