"""Issue 12, item 6: an exception that escapes a slot is shown in a dialog and logged, not lost;
failed exports of the grid and of a recipe are shown to the user."""

from __future__ import annotations

import logging
import sys

import pytest
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QWidget


@pytest.mark.qt_no_exception_capture
def test_uncaught_exception_in_a_slot_becomes_a_dialog_and_a_log_line(qtbot, caplog):
    from steerdesk.ui.excepthook import install_excepthook

    parent = QWidget()
    parent._dialogs = []
    qtbot.addWidget(parent)
    previous = install_excepthook(parent)
    try:
        def broken_slot() -> None:
            raise ValueError("lost in a slot")

        with caplog.at_level(logging.ERROR, logger="steerdesk.ui"):
            QTimer.singleShot(0, broken_slot)
            qtbot.waitUntil(lambda: bool(parent._dialogs), timeout=5000)
        box = parent._dialogs[-1]
        assert box.isVisible() and "ValueError: lost in a slot" in box.text()
        assert "Traceback" in box.detailedText() and "broken_slot" in box.detailedText()
        assert any("Unexpected error" in r.message and r.exc_info for r in caplog.records)
        box.close()
    finally:
        sys.excepthook = previous


def test_keyboard_interrupt_goes_to_the_previous_hook(qtbot, monkeypatch):
    from steerdesk.ui import excepthook

    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *a: seen.append(a[0]))
    parent = QWidget()
    parent._dialogs = []
    qtbot.addWidget(parent)
    excepthook.install_excepthook(parent)
    sys.excepthook(KeyboardInterrupt, KeyboardInterrupt(), None)
    assert seen == [KeyboardInterrupt] and parent._dialogs == []


def test_failed_grid_and_recipe_exports_are_shown(qtbot, tmp_path, monkeypatch):
    from steerdesk.core.records import RunRecord
    from steerdesk.core.textgrid import GridRow
    from steerdesk.ui.panels import analysis_panel
    from steerdesk.ui.panels.analysis_panel import AnalysisPanel

    panel = AnalysisPanel()
    qtbot.addWidget(panel)
    errors = []
    panel.error_occurred.connect(lambda title, message: errors.append((title, message)))
    target = str(tmp_path / "no" / "such" / "folder" / "out.csv")
    monkeypatch.setattr(analysis_panel.QFileDialog, "getSaveFileName", lambda *a, **k: (target, ""))
    panel.grid.add_row(GridRow(1, 1.0, "p", "text"))
    panel.grid.finish(panel.grid.rows)
    panel.grid.export_button.click()
    panel.history.add(RunRecord(kind="generate", model="default", created="2026-01-01T00:00:00"))
    panel.history.export_button.click()
    assert [t for t, _ in errors] == ["Could not export the grid", "Could not export the recipe"]
    assert all(target in m for _, m in errors)


def test_failed_heatmap_export_is_shown(qtbot, window, tmp_path, monkeypatch):
    from steerdesk.ui import main_window

    target = str(tmp_path / "no" / "such" / "dir" / "heat.png")
    monkeypatch.setattr(main_window.QFileDialog, "getSaveFileName", lambda *a, **k: (target, ""))
    window.act_export_heat.trigger()
    assert "Could not write" in window._dialogs[-1].text() and target in window._dialogs[-1].text()
