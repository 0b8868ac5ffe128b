"""Layout helpers: panels that scroll instead of forcing the window wider, and a window kept on screen."""

from __future__ import annotations

from PySide6.QtCore import QEvent, QObject, QRect, Qt
from PySide6.QtWidgets import QBoxLayout, QFrame, QScrollArea, QSplitter, QWidget

MIN_WINDOW = (1024, 700)  # every panel lays out in this (a 1366x768 laptop with a task bar)


class _FitHeight(QObject):
    """Keeps a scroll area no taller than its widget wants, so a splitter gives the rest to others."""

    def __init__(self, area: QScrollArea, widget: QWidget) -> None:
        super().__init__(area)
        self.area, self.widget = area, widget
        widget.installEventFilter(self)
        self.fit()

    def fit(self) -> None:
        extra = 2 * self.area.frameWidth()
        bar = self.area.horizontalScrollBar()
        if bar.isVisible():
            extra += bar.sizeHint().height()
        most = self.widget.sizeHint().height() + extra
        self.area.setMaximumHeight(most)
        split = self.area.parentWidget()
        if isinstance(split, QSplitter) and split.count() > 1:
            if not getattr(self, "_watching", False):
                split.installEventFilter(self)
                self._watching = True
            sizes = split.sizes()
            i = split.indexOf(self.area)
            excess = sizes[i] - most
            if excess > 0:  # a splitter leaves the slot above a maximum empty: hand it to the others
                sizes[i] = most
                others = [j for j in range(len(sizes)) if j != i]
                for j in others:
                    sizes[j] += excess // len(others)
                split.setSizes(sizes)

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:
        if event.type() in (QEvent.Type.LayoutRequest, QEvent.Type.Resize):
            self.fit()
        return False


def scrolled(widget: QWidget, *, horizontal: bool = True, fit_height: bool = False) -> QScrollArea:
    """``widget`` in a frameless scroll area that resizes it: below its minimum size it scrolls.

    A dock or splitter holding the scroll area no longer takes the panel's minimum size (which
    grows with results: long labels, table columns), so results never resize the docks.
    ``fit_height`` caps the area at the height the widget wants (in a splitter, the other
    children get the rest).
    """
    area = QScrollArea()
    area.setObjectName(f"{widget.objectName() or type(widget).__name__}Scroll")
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    if not horizontal:
        area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    area.setWidget(widget)
    if fit_height:
        area._fit = _FitHeight(area, widget)  # type: ignore[attr-defined]
    return area


def clamped(geometry: QRect, available: QRect) -> QRect:
    """``geometry`` moved and shrunk to lie inside ``available`` (a screen's available area)."""
    w = min(geometry.width(), available.width())
    h = min(geometry.height(), available.height())
    x = min(max(geometry.x(), available.x()), available.x() + available.width() - w)
    y = min(max(geometry.y(), available.y()), available.y() + available.height() - h)
    return QRect(x, y, w, h)


def clamp_to_screen(window: QWidget) -> bool:
    """Keep a restored window inside the screen it is on (or the primary one); True if it moved/shrank.

    A geometry saved on a large monitor would otherwise push the status bar off a laptop screen.
    The frame (title bar, borders) is counted when the window system reports it.
    """
    from PySide6.QtGui import QGuiApplication

    screen = window.screen() or QGuiApplication.primaryScreen()
    if screen is None:
        return False
    available = screen.availableGeometry()
    frame = window.frameGeometry()
    extra_w = max(0, frame.width() - window.width())
    extra_h = max(0, frame.height() - window.height())
    inner = QRect(available.x(), available.y(), available.width() - extra_w, available.height() - extra_h)
    if window.isMaximized() or window.isFullScreen():
        return False
    target = clamped(window.geometry(), inner)
    if target == window.geometry():
        return False
    window.setGeometry(target)
    return True




class Reflow(QObject):
    """``box`` (a box layout or splitter) side by side when ``watched`` is ``width`` px wide or more, else stacked.

    Side by side suits a large monitor; stacked keeps a laptop's narrow pane from clipping (the
    pane's scroll area then scrolls vertically).
    """

    def __init__(self, watched: QWidget, box: QBoxLayout | QSplitter, width: int) -> None:
        super().__init__(watched)
        self.box, self.width = box, width
        watched.installEventFilter(self)
        self.apply(watched.width())

    def apply(self, width: int) -> None:
        wide = width >= self.width
        if isinstance(self.box, QSplitter):
            o = Qt.Orientation.Horizontal if wide else Qt.Orientation.Vertical
            if self.box.orientation() != o:
                self.box.setOrientation(o)
                self.box.updateGeometry()  # the parent layout re-reads the new minimum size
            return
        d = QBoxLayout.Direction.LeftToRight if wide else QBoxLayout.Direction.TopToBottom
        if self.box.direction() != d:
            self.box.setDirection(d)

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:
        if event.type() == QEvent.Type.Resize and isinstance(obj, QWidget):
            self.apply(obj.width())
        return False


__all__ = ["MIN_WINDOW", "Reflow", "clamp_to_screen", "clamped", "scrolled"]


def full_dock_tab_labels(window: QWidget) -> None:
    """Show whole names on the tabs of ``window``'s tabbed docks (Qt elides them to "Sw…" in a
    narrow dock): tabs keep their text and the bar scrolls with arrow buttons instead.

    QMainWindow makes its tab bars as docks are tabified, moved or restored, so this is called
    again after each of those (see ``MainWindow``).
    """
    from PySide6.QtWidgets import QTabBar

    for bar in window.findChildren(QTabBar):
        if bar.parent() is window:
            bar.setElideMode(Qt.TextElideMode.ElideNone)
            bar.setUsesScrollButtons(True)
