"""Dataset status that tells the truth (issue 13): 'modified' means differs from what was loaded,
the same in title, panel and close prompt; undo stops at the start state; Import asks before
replacing unsaved edits; a CSV's short rows are counted and explained."""

from __future__ import annotations

from PySide6.QtWidgets import QMessageBox


def test_an_untouched_bundled_dataset_is_not_modified_and_undo_stops_there(qtbot, window):
    dp = window.dataset_panel
    dp.offer_recovery(window)
    dp.load_bundled("neutral_rude")  # what start() does
    rows = len(dp.dataset())
    assert rows > 0 and not dp.is_modified()
    assert window.windowTitle().startswith("neutral_rude —") and "•" not in dp._title.text()
    assert not dp.undo_stack().canUndo()  # nothing before the start state to go back to
    dp.add_row()
    assert dp.is_modified() and window.windowTitle().startswith("neutral_rude* —") and "•" in dp._title.text()
    dp.undo_stack().undo()
    assert not dp.is_modified() and len(dp.dataset()) == rows
    assert window.windowTitle().startswith("neutral_rude —") and "•" not in dp._title.text()
    assert not dp.undo_stack().canUndo()  # never into an empty untitled dataset
    # The close prompt follows the same flag: nothing to ask about.
    asked = []
    monkey = QMessageBox.question
    try:
        QMessageBox.question = lambda *a, **k: asked.append(a) or QMessageBox.StandardButton.Cancel
        assert type(window)._confirm_close(window) and not asked
    finally:
        QMessageBox.question = monkey


def test_import_with_unsaved_edits_asks_first(qtbot, window, tmp_path, monkeypatch):
    dp = window.dataset_panel
    dp.load_bundled("neutral_rude")
    dp.add_row()
    asked, opened = [], []
    monkeypatch.setattr(dp, "_ask_unsaved", lambda what: asked.append(what) or QMessageBox.StandardButton.Cancel)
    monkeypatch.setattr(dp, "_ask_open_path", lambda *a, **k: opened.append(a) or "")
    assert dp.import_file() is False
    assert asked and "import" in asked[0] and not opened and dp.is_modified()  # cancelled: nothing replaced
    monkeypatch.setattr(dp, "_ask_unsaved", lambda what: QMessageBox.StandardButton.Discard)
    dp.import_file()
    assert opened  # discarding goes on to the file dialog
    dp.undo_stack().undo()
    dp.undo_stack().undo()
    asked.clear()
    monkeypatch.setattr(dp, "_ask_unsaved", lambda what: asked.append(what) or QMessageBox.StandardButton.Cancel)
    dp.import_file()
    assert not asked  # no unsaved edits: no question


def test_csv_rows_with_too_few_fields_are_counted_and_explained(qtbot, window, tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("prompt,base,target\nhi,a,b\nshort,x\n,c,d\nok,e,f\nalso short\n")
    errors = []
    window.dataset_panel.error_occurred.connect(lambda title, msg: errors.append((title, msg)))
    assert window.dataset_panel.load_file(str(path))
    assert errors, "a CSV with invalid rows must say so"
    title, message = errors[-1]
    assert title == "Invalid rows"
    assert "2 rows with too few fields" in message
    assert "row 2: 2 of 3 fields" in message and "row 5: 1 of 3 fields" in message
    assert "2 rows of short.csv cannot be used" in message  # (row 3 has no prompt: that is allowed)
    good = tmp_path / "good.csv"
    good.write_text("prompt,base,target\nhi,a,b\n")
    errors.clear()
    assert window.dataset_panel.load_file(str(good)) and not errors
