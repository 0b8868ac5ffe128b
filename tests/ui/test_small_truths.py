"""Smaller items of issue 13: View toggles work, Help menu with About and the conventions,
honest ties in "best separation", the legend above the curves, hatching visible on dark cells."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PySide6.QtWidgets import QGraphicsPathItem
from test_layout import diagnostics

from steerdesk.ui import menus
from steerdesk.ui.panels.analysis_panel import best_separation


def test_view_toggles_are_enabled_and_work(qtbot, window):
    view = next(a.menu() for a in window.menuBar().actions() if a.text() == "&View")
    toggles = view.actions()
    assert len(toggles) == 5 and all(a.isEnabled() and a.isCheckable() for a in toggles)  # + Condition
    sweep = next(a for a in toggles if a.text() == "Sweep")
    sweep.trigger()
    assert not window.sweep_dock.isVisible()
    sweep.trigger()
    assert window.sweep_dock.isVisible()


def test_help_menu_about_and_conventions(qtbot, window):
    help_menu = next(a.menu() for a in window.menuBar().actions() if a.text() == "&Help")
    texts = [a.text() for a in help_menu.actions()]
    assert "&About steerdesk" in texts and any("conventions" in t for t in texts)
    about = menus.about_text()
    import PySide6
    import torch

    from steerdesk import __version__
    assert __version__ in about and PySide6.__version__ in about and torch.__version__ in about
    url = menus.readme_url()
    assert url is not None and url.fragment() == "steering-conventions" and url.toLocalFile().endswith("README.md")
    assert "## Steering conventions" in Path(url.toLocalFile()).read_text(encoding="utf-8")


def test_best_separation_reports_ties_honestly():
    layers = list(range(30))
    aucs = [0.6, 0.8, 0.95] + [1.0] * 26 + [0.9996]  # 0.9996 is 1.000 at the 3 decimals shown
    assert best_separation(layers, aucs) == "Best separation: layers 3-29 tie at AUC 1.000 (27 of 30 layers)."
    assert best_separation([0, 1, 2], [0.7, 0.9, 0.8]) == "Best separation: layer 1 (AUC 0.900)."
    assert best_separation([0, 1, 2, 3], [1.0, 0.5, 1.0, 1.0]) == \
        "Best separation: layers 0, 2-3 tie at AUC 1.000 (3 of 4 layers)."
    assert best_separation([0, 1], [None, None]) == "No layer could be scored."


def test_the_legend_sits_above_the_curves(qtbot, window):
    tab = window.analysis_panel.diagnostics
    window.resize(1366, 768)
    window.analysis_dock.raise_()
    qtbot.wait(50)
    tab.show_diagnostics(diagnostics(30))
    assert "tie at AUC 1.000" in tab.summary.text()
    qtbot.wait(50)
    vb = tab.lines.getViewBox()
    legend_bottom = vb.mapSceneToView(tab.legend.mapRectToScene(tab.legend.boundingRect()).bottomLeft()).y()
    top_of_data = max(np.nanmax(c.yData) for c in tab.curves.values())
    assert legend_bottom > top_of_data  # the legend is above every curve (view y grows upwards)


def test_hatching_beyond_the_budget_shows_on_dark_and_light_cells(qtbot):
    from steerdesk.ui.panels.sweep_panel import SweepPanel

    sp = SweepPanel()
    qtbot.addWidget(sp)
    sp.start([0, 1], {}, [0.0, 4.0], 0.5)
    sp.set_cell(0, 1, 3.0, -2.0)  # beyond the budget, a strong (dark) cell
    paths = [i for i in sp._overlays if isinstance(i, QGraphicsPathItem)]
    assert len(paths) == 2
    halo, core = sorted(paths, key=lambda i: i.zValue())
    assert halo.pen().color().lightness() > 200 and core.pen().color().lightness() < 60  # light halo, dark line
    assert halo.pen().widthF() > core.pen().widthF() and halo.pen().isCosmetic()
    assert halo.path().boundingRect().toRect().getRect() == (1, 0, 1, 1)  # inside the cell


def test_the_cosine_colour_bar_has_tick_labels(qtbot, window):
    tab = window.analysis_panel.diagnostics
    window.resize(1366, 768)
    window.analysis_dock.raise_()
    tab.show_diagnostics(diagnostics(30))
    qtbot.wait(50)
    axis = tab.cosine.colorbar.axis
    assert axis.isVisible() and axis.style["showValues"] and axis.width() > 15
    values = [v for level in axis.tickValues(-1.0, 1.0, axis.height()) for v in level[1]]
    assert -1.0 in values and 1.0 in values and axis.tickStrings(values, 1.0, 0.5)
