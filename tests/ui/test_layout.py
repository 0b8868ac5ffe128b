"""Layout (issue 13): every panel lays out at 1024x700 without clipping, results never resize the
docks, a saved geometry is clamped to the screen, extra height goes to the text and the heatmap."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QByteArray, QRect
from PySide6.QtWidgets import QAbstractScrollArea, QApplication, QSplitter, QWidget

from steerdesk.core.diagnostics import Diagnostics
from steerdesk.ui.layout import clamped

SHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "layout"


def _in_layout(layout, w) -> bool:
    for i in range(layout.count()):
        item = layout.itemAt(i)
        if item.widget() is w or (item.layout() is not None and _in_layout(item.layout(), w)):
            return True
    return False


def _laid_out(w: QWidget) -> bool:
    """Placed by a layout or a splitter (not a composite widget's own internals)."""
    parent = w.parentWidget()
    if isinstance(parent, QSplitter):
        return True
    return parent is not None and parent.layout() is not None and _in_layout(parent.layout(), w)


def clipped(root: QWidget) -> list[str]:
    """Visible widgets laid out smaller than their minimum size hint (so part of them is cut off).

    A scroll area's content is exempt from its viewport's size (it scrolls); everything else must
    get at least what it asks for.
    """
    out = []
    for w in root.findChildren(QWidget):
        if not w.isVisible() or w.isWindow() or not _laid_out(w):
            continue
        hint = w.minimumSizeHint().expandedTo(w.minimumSize())
        if not hint.isValid() or isinstance(w.parentWidget(), QAbstractScrollArea):
            continue
        if w.parentWidget() is not None and w.parentWidget().objectName() == "qt_scrollarea_viewport":
            continue
        if w.width() + 1 < hint.width() or w.height() + 1 < hint.height():
            out.append(f"{type(w).__name__} {w.objectName()!r} {w.width()}x{w.height()} < "
                       f"{hint.width()}x{hint.height()}")
    return out


def settle(qtbot, ms=50):
    for _ in range(3):
        QApplication.processEvents()
    qtbot.wait(ms)


def diagnostics(n=30):
    auc = [1.0] * n
    return Diagnostics(layers=list(range(n)), auc=auc, d_prime=[3.0] * n, consistency=[0.9] * n,
                       alignment=[0.5] * n, vector_norm=[1.0] * n, typical_norm=[10.0] * n,
                       relative_norm=[0.1] * n, cosine=[[1.0 if i == j else 0.5 for j in range(n)] for i in range(n)],
                       n_base=20, n_target=20, paired=True, dataset_name="a dataset with a rather long name indeed")


def test_every_panel_fits_1024x700_without_clipping(qtbot, window):
    window.dataset_panel.load_bundled("neutral_rude")
    assert window.minimumSizeHint().width() <= 1024 and window.minimumSizeHint().height() <= 700
    window.resize(1024, 700)
    settle(qtbot)
    assert (window.width(), window.height()) == (1024, 700)
    SHOTS.mkdir(parents=True, exist_ok=True)
    for dock in (window.dataset_dock, window.vector_dock, window.sweep_dock, window.analysis_dock):
        dock.raise_()
        settle(qtbot)
        assert clipped(dock) == [], dock.objectName()  # (a tabified dock behind it keeps a stale layout)
        assert clipped(window.centralWidget()) == []
        window.grab().save(str(SHOTS / f"1024x700_{dock.objectName()}.png"))
    heat = window.generation_panel.heatmap
    assert heat.height() >= 150  # the layer x token heatmap stays readable


def test_results_never_resize_the_docks(qtbot, window):
    window.resize(1366, 768)
    settle(qtbot)
    window.analysis_dock.raise_()
    settle(qtbot)
    before = (window.analysis_dock.width(), window.generation_panel.width())
    window.analysis_panel.diagnostics.show_diagnostics(diagnostics(30))
    window.analysis_panel.diagnostics.summary.setText("x" * 400)  # a long result line, too
    settle(qtbot)
    assert (window.analysis_dock.width(), window.generation_panel.width()) == before


def test_extra_height_goes_to_text_and_heatmap(qtbot, window):
    window.resize(2560, 1440)
    settle(qtbot)
    gp = window.generation_panel
    sizes = gp.splitter.sizes()
    controls = gp.splitter.widget(0)
    assert sizes[0] <= controls.widget().sizeHint().height() + 4  # no empty band under the Steering group
    assert sizes[1] > 300 and sizes[2] > 300
    window.grab().save(str(SHOTS / "2560x1440.png"))


def test_clamped_geometry():
    screen = QRect(0, 0, 1366, 768)
    assert clamped(QRect(1200, 700, 2400, 1300), screen) == QRect(0, 0, 1366, 768)
    assert clamped(QRect(900, 500, 800, 600), screen) == QRect(566, 168, 800, 600)
    assert clamped(QRect(10, 20, 800, 600), screen) == QRect(10, 20, 800, 600)


def test_a_geometry_saved_on_a_big_screen_is_clamped_on_restore(qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("STEERDESK_SETTINGS", str(tmp_path / "settings.ini"))
    from steerdesk.ui.main_window import MainWindow
    from steerdesk.ui.recovery import RecoveryStore
    from steerdesk.ui.settings import settings

    big = MainWindow(recovery=RecoveryStore(tmp_path / "data"))
    qtbot.addWidget(big)
    big.setGeometry(2000, 1200, 2500, 1400)  # what a 2560x1440 monitor saved
    geometry = big.saveGeometry()
    big.controller.shutdown(5000)
    s = settings()
    s.setValue("window/geometry", geometry)
    s.sync()
    assert isinstance(s.value("window/geometry"), QByteArray)
    win = MainWindow(recovery=RecoveryStore(tmp_path / "data"))
    qtbot.addWidget(win)
    try:
        available = win.screen().availableGeometry()
        assert available.contains(win.geometry()), (win.geometry(), available)
    finally:
        win.controller.shutdown(5000)


def test_dock_tabs_show_whole_names_in_a_narrow_dock(qtbot, window):
    """A user narrows the left docks (or a saved layout does): the tabs keep 'Analysis', 'Condition'
    instead of 'Anal…', 'Condit…', and the bar scrolls; also after a dock is floated and docked back."""
    from PySide6.QtCore import Qt
    from PySide6.QtWidgets import QTabBar

    window.resize(1366, 768)
    settle(qtbot)
    window.resizeDocks([window.dataset_dock], [300], Qt.Orientation.Horizontal)
    settle(qtbot)

    def cut_tabs() -> list[str]:
        bars = [b for b in window.findChildren(QTabBar) if b.parent() is window and b.isVisible()]
        assert bars
        return [b.tabText(i) for b in bars for i in range(b.count())
                if b.tabRect(i).width() < b.fontMetrics().horizontalAdvance(b.tabText(i))]

    assert cut_tabs() == []
    window.sweep_dock.setFloating(True)
    settle(qtbot)
    window.sweep_dock.setFloating(False)
    settle(qtbot, 100)
    assert cut_tabs() == []
    window.grab().save(str(SHOTS / "1366x768_narrow_docks.png"))


def test_heatmap_colour_bars_and_labels_stay_in_view(qtbot, window):
    """A long title used to widen pyqtgraph's layout past the view (the cosine map's colour bar a
    sliver at 1600x1000, the sweep's outside the plot at 1024x700); and 15 row labels were drawn
    into 80 px. Now titles shorten, colour bars stay inside, labels fit the pixels."""
    from PySide6.QtWidgets import QApplication

    from steerdesk.ui.widgets.heatmap import HeatmapView

    tab = window.analysis_panel.diagnostics
    for size in ((1600, 1000), (1366, 768), (1024, 700)):
        window.resize(*size)
        for dock in (window.analysis_dock, window.sweep_dock):
            dock.raise_()
            tab.show_diagnostics(diagnostics(30))
            settle(qtbot, 100)
            for view in window.findChildren(HeatmapView):
                if not view.isVisible():
                    continue
                plot = view.plot
                bar = plot.mapFromScene(view.colorbar.axis.sceneBoundingRect()).boundingRect()
                assert bar.right() <= plot.viewport().rect().right() + 1, (size, view._title)
                title = plot.getPlotItem().titleLabel.text
                assert title == view._title or (title.endswith("…") and plot.toolTip() == view._title)
                left = plot.getPlotItem().getAxis("left")
                labels = [t for level in left._tickLevels or [] for t in level]
                height = plot.getViewBox().sceneBoundingRect().height()
                assert len(labels) <= max(2, height // 16), (size, view._title, len(labels), height)
    QApplication.processEvents()


def test_generate_and_sampling_in_view_on_a_1366x768_laptop(qtbot, window):
    """Sampling sits beside Steering whenever both fit at their minimum widths (the pane is 720 px
    here; the old fixed 860 px rule stacked them and scrolled Generate and the settings out of view)."""
    from PySide6.QtCore import Qt

    window.resize(1366, 768)
    window.resizeDocks([window.dataset_dock], [640], Qt.Orientation.Horizontal)  # the default dock width
    settle(qtbot, 100)
    gp = window.generation_panel
    assert gp.width() < 760
    for w in (gp.generate_button, gp.stop_button, gp.max_tokens, gp.temperature):
        assert not w.visibleRegion().isEmpty(), w
    assert clipped(window.centralWidget()) == []
