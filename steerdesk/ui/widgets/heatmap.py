"""A labelled pyqtgraph heatmap: ImageItem + ColorBarItem, hover read-out, PNG export."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, QRectF, Qt, Signal
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

pg.setConfigOptions(imageAxisOrder="row-major", antialias=True)
MIN_PLOT_WIDTH, MIN_PLOT_HEIGHT = 260, 140  # px: below this pyqtgraph clips the title and colour bar


def _match_palette() -> None:
    """pyqtgraph draws on black by default; follow the application's palette instead."""
    from PySide6.QtGui import QPalette
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance()
    if app is None:
        return
    pal = app.palette()
    bg = pal.color(QPalette.ColorRole.Base)
    fg = pal.color(QPalette.ColorRole.Text)
    pg.setConfigOptions(background=bg, foreground=fg)


def _centred_ticks(n: int, max_labels: int = 16) -> list[tuple[float, str]]:
    """Integer labels at cell centres, thinned to at most ``max_labels``."""
    step = 1
    for candidate in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000):
        step = candidate
        if n / candidate <= max_labels:
            break
    return [(i + 0.5, str(i)) for i in range(0, n, step)]


class HeatmapView(QWidget):
    """Rows x columns of values (rows drawn bottom-up as layers), with a colour bar.

    ``set_data`` replaces the matrix; ``set_column`` fills one column live. Levels are fixed
    (symmetric around 0 for diverging maps) so live updates do not flicker.
    """

    cell_clicked = Signal(int, int)
    """The user clicked cell ``(row, column)``."""
    hovered = Signal(str)
    """Text describing the cell under the mouse."""

    def __init__(self, title: str = "", *, row_label: str = "layer", col_label: str = "",
                 cmap: str = "CET-D1", diverging: bool = True, parent: QWidget | None = None):
        super().__init__(parent)
        _match_palette()
        self.row_label = row_label
        self.col_label = col_label
        self.diverging = diverging
        self.describe: Callable[[int, int, float], str] | None = None
        self._data = np.zeros((1, 1), dtype=np.float32)
        self._fixed_levels: tuple[float, float] | None = None
        self.plot = pg.PlotWidget()
        self.plot.setMenuEnabled(False)
        self._title = title
        self.plot.setTitle(title)
        self.plot.setLabel("left", row_label)
        self.plot.setLabel("bottom", col_label)
        self.plot.getViewBox().setMouseEnabled(x=False, y=False)
        self.plot.getViewBox().invertY(False)
        self.image = pg.ImageItem(axisOrder="row-major")
        self.plot.addItem(self.image)
        self.colorbar = pg.ColorBarItem(values=(-1, 1), colorMap=pg.colormap.get(cmap), interactive=False,
                                        width=12)
        self.colorbar.setImageItem(self.image, insert_in=self.plot.getPlotItem())
        self.readout = QLabel(" ")
        self.readout.setObjectName("heatmapReadout")
        self.plot.setMinimumSize(MIN_PLOT_WIDTH, MIN_PLOT_HEIGHT)  # title, axes and colour bar never cut off
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.plot, 1)
        layout.addWidget(self.readout)
        self.plot.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.plot.customContextMenuRequested.connect(self._context_menu)
        self.plot.scene().sigMouseMoved.connect(self._on_mouse_moved)
        self._col_ticks: list[tuple[int, str]] | None = None
        self.set_data(np.full((1, 1), np.nan, dtype=np.float32))
        self.plot.scene().sigMouseClicked.connect(self._on_mouse_clicked)
        self.plot.getViewBox().sigResized.connect(lambda *_: self._fit_ticks())  # fewer labels when smaller

    def resizeEvent(self, event: Any) -> None:
        """Shorten the title to the width ("Margin delta (target - …"): a title wider than the plot
        would widen pyqtgraph's layout past the view and push the colour bar out of sight."""
        super().resizeEvent(event)
        self._fit_title()

    def set_title(self, title: str) -> None:
        """Replace the plot's title (shortened to the width, the whole title in the tooltip)."""
        self._title = title
        self._fit_title()

    def _fit_title(self) -> None:
        item = self.plot.getPlotItem()
        label, minimum = item.titleLabel, Qt.SizeHint.MinimumSize
        beside = (item.getAxis("left").effectiveSizeHint(minimum).width()  # the title spans the view's
                  + self.colorbar.effectiveSizeHint(minimum).width() + 12)  # column only
        room = max(40.0, self.plot.width() - beside)
        text = self._title
        label.setText(text)
        while len(text) > 4 and label.item.boundingRect().width() > room:
            text = text[:-2].rstrip() + "…" if text.endswith("…") else text[:-1] + "…"
            label.setText(text)
        self.plot.setToolTip(self._title if text != self._title else "")
        # The plot item was laid out at the old title's width: lay it out again at the view's size.
        item.setGeometry(QRectF(0, 0, max(self.plot.width(), 1), max(self.plot.height(), 1)))

    # -- data --------------------------------------------------------------------------
    def set_data(self, data: np.ndarray, *, levels: tuple[float, float] | None = None,
                 col_ticks: Sequence[tuple[int, str]] | None = None) -> None:
        """Show ``data`` (``[rows, cols]``; NaN cells are blank)."""
        self._data = np.asarray(data, dtype=np.float32)
        if self._data.ndim != 2 or self._data.size == 0:
            self._data = np.zeros((1, 1), dtype=np.float32)
        self._fixed_levels = levels
        self._redraw()
        self._col_ticks = list(col_ticks) if col_ticks is not None else None
        self._fit_ticks()

    def _fit_ticks(self) -> None:
        """Label as many rows / columns as the plot's pixels hold without labels overlapping (about
        16 px per row label, 8 px per character plus a gap per column label), at most 16 each."""
        rows, cols = self._data.shape
        box = self.plot.getViewBox().sceneBoundingRect()
        fit_rows = max(2, min(16, int(box.height() // 16))) if box.height() > 0 else 16
        self.plot.getAxis("left").setTicks([_centred_ticks(rows, fit_rows)])
        given = self._col_ticks
        width = max((len(label) for _, label in given), default=2) if given else len(str(cols))
        fit_cols = max(2, min(16, int(box.width() // (8 * width + 12)))) if box.width() > 0 else 16
        if given is None:
            ticks = _centred_ticks(cols, fit_cols)
        else:
            keep = max(1, -(-len(given) // fit_cols))  # every keep-th given label
            ticks = given[::keep]
        self.plot.getAxis("bottom").setTicks([ticks])

    def clear_readout(self) -> None:
        """Forget the hover read-out (a new run starts: no stale value from the last one)."""
        self.readout.setText(" ")
        self.plot.setToolTip("")

    def set_row_ticks(self, ticks: Sequence[tuple[int, str]] | None) -> None:
        self.plot.getAxis("left").setTicks([list(ticks)] if ticks is not None else None)

    def data(self) -> np.ndarray:
        return self._data

    def _levels(self) -> tuple[float, float]:
        if self._fixed_levels is not None:
            return self._fixed_levels
        finite = self._data[np.isfinite(self._data)]
        if finite.size == 0:
            return (-1.0, 1.0)
        if self.diverging:
            m = float(np.abs(finite).max()) or 1.0
            return (-m, m)
        lo, hi = float(finite.min()), float(finite.max())
        return (lo, hi if hi > lo else lo + 1.0)

    def _redraw(self) -> None:
        levels = self._levels()
        self.image.setImage(self._data, levels=levels, autoLevels=False)
        rows, cols = self._data.shape
        self.image.setRect(pg.QtCore.QRectF(0, 0, cols, rows))
        self.colorbar.setLevels(levels)
        self.plot.setXRange(0, max(cols, 1), padding=0)
        self.plot.setYRange(0, max(rows, 1), padding=0)

    # -- mouse -------------------------------------------------------------------------
    def _cell_at(self, scene_pos: QPointF) -> tuple[int, int] | None:
        vb = self.plot.getViewBox()
        if not vb.sceneBoundingRect().contains(scene_pos):
            return None
        p = vb.mapSceneToView(scene_pos)
        col, row = int(np.floor(p.x())), int(np.floor(p.y()))
        rows, cols = self._data.shape
        if 0 <= row < rows and 0 <= col < cols:
            return row, col
        return None

    def describe_cell(self, row: int, col: int) -> str:
        value = float(self._data[row, col])
        if self.describe is not None:
            return self.describe(row, col, value)
        return f"{self.row_label} {row}, {self.col_label} {col}: {value:.3g}"

    def _on_mouse_moved(self, pos: QPointF) -> None:
        cell = self._cell_at(pos)
        text = self.describe_cell(*cell) if cell else " "
        self.readout.setText(text)
        self.plot.setToolTip(text if cell else "")
        self.hovered.emit(text)

    def _on_mouse_clicked(self, event: object) -> None:
        pos = event.scenePos()  # type: ignore[attr-defined]
        if event.button() != Qt.MouseButton.LeftButton:  # type: ignore[attr-defined]
            return
        cell = self._cell_at(pos)
        if cell:
            self.cell_clicked.emit(*cell)

    def _context_menu(self, pos: object) -> None:
        from PySide6.QtWidgets import QApplication, QFileDialog, QMenu

        menu = QMenu(self)
        export = menu.addAction("Export as PNG…")
        copy = menu.addAction("Copy values (TSV)")
        chosen = menu.exec(self.plot.mapToGlobal(pos))  # type: ignore[arg-type]
        if chosen is export:
            path = QFileDialog.getSaveFileName(self, "Export heatmap", "heatmap.png", "PNG images (*.png)")[0]
            if path:
                self.export_png(path)
        elif chosen is copy:
            QApplication.clipboard().setText(self.values_tsv())

    def values_tsv(self) -> str:
        """The matrix as tab-separated text, top row = highest row index (as drawn)."""
        rows = []
        for r in range(self._data.shape[0] - 1, -1, -1):
            rows.append(f"{self.row_label} {r}\t" + "\t".join(f"{v:.6g}" for v in self._data[r]))
        return "\n".join(rows)

    def export_png(self, path: str) -> bool:
        """Save the heatmap with its axes and colour bar (atomically, like every save)."""
        from ...core.errors import SteerdeskError
        from ...core.fileio import atomic_path

        try:
            with atomic_path(path) as tmp:
                if not self.grab().save(str(tmp), "PNG"):
                    raise OSError("the image could not be encoded")
        except (SteerdeskError, OSError):
            return False
        return True
