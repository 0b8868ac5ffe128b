"""The dataset editor, driven the way a person drives it: clicks, keys, the clipboard."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PySide6.QtCore import QPoint, Qt, QTimer
from PySide6.QtGui import QGuiApplication, QKeySequence
from PySide6.QtWidgets import QPlainTextEdit

from steerdesk.core.datasets import Dataset, Example, load_dataset, save_dataset
from steerdesk.core.errors import SteerdeskError
from steerdesk.ui.dataset_model import INVALID_BACKGROUND, DatasetTableModel, parse_tsv, to_tsv
from steerdesk.ui.panels.dataset_panel import DatasetPanel

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"

ROWS = [
    Example("Say hi.", "Hello there!", "What do you want?"),
    Example("", "Sure, happy to help.", "Fine, whatever."),
    Example("Tricky, \"quoted\"", "line one\nline two", "tab\there, comma, end"),
]


# ---------------------------------------------------------------------------- helpers

@pytest.fixture
def panel(qtbot) -> DatasetPanel:
    p = DatasetPanel()
    qtbot.addWidget(p)
    p.resize(900, 560)
    p.show()
    qtbot.waitExposed(p)
    p.activateWindow()
    p.view().setFocus()
    return p


@pytest.fixture
def jsonl_file(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    save_dataset(Dataset(list(ROWS), name="pairs"), path)
    return path


def click(qtbot, panel: DatasetPanel, action) -> None:
    """Click the toolbar button of ``action``."""
    for bar in (panel.file_toolbar, panel.edit_toolbar):
        button = bar.widgetForAction(action)
        if button is not None:
            assert button.isEnabled(), f"{action.text()} is disabled"
            qtbot.mouseClick(button, Qt.MouseButton.LeftButton)
            return
    raise AssertionError(f"no button for {action.text()}")


def cell_pos(panel: DatasetPanel, row: int, col: int) -> QPoint:
    view = panel.view()
    index = panel.model().index(row, col)
    view.scrollTo(index)
    return view.visualRect(index).center()


def click_cell(qtbot, panel: DatasetPanel, row: int, col: int = 1, modifier=Qt.KeyboardModifier.NoModifier) -> None:
    qtbot.mouseClick(panel.view().viewport(), Qt.MouseButton.LeftButton, modifier, cell_pos(panel, row, col))


def open_editor(qtbot, panel: DatasetPanel, row: int, col: int) -> QPlainTextEdit:
    """Double-click a cell (QTest's double click is only the second half of one: click first)."""
    pos = cell_pos(panel, row, col)
    qtbot.mouseClick(panel.view().viewport(), Qt.MouseButton.LeftButton, pos=pos)
    qtbot.mouseDClick(panel.view().viewport(), Qt.MouseButton.LeftButton, pos=pos)
    # A closed editor lingers until deleteLater runs: take the visible one.
    editors = [e for e in panel.view().viewport().findChildren(QPlainTextEdit, "cellEditor") if e.isVisible()]
    assert len(editors) == 1
    return editors[0]


def rows(panel: DatasetPanel) -> list[Example]:
    return panel.dataset().examples


def press(qtbot, panel: DatasetPanel, seq) -> None:
    qtbot.keySequence(panel.view(), QKeySequence(seq))


# ---------------------------------------------------------------------------- editing

def test_edit_cell_then_undo_redo(qtbot, panel, jsonl_file):
    assert panel.load_file(jsonl_file)
    view = panel.view()
    editor = open_editor(qtbot, panel, 0, 1)
    qtbot.keyClicks(editor, " General Kenobi.")
    qtbot.keyClick(editor, Qt.Key.Key_Return, Qt.KeyboardModifier.ShiftModifier)  # a new line, not commit
    qtbot.keyClicks(editor, "Second line")
    qtbot.keyClick(editor, Qt.Key.Key_Return)  # commit
    edited = "Hello there! General Kenobi.\nSecond line"
    assert rows(panel)[0].base == edited
    assert panel.is_modified()
    assert "base of row 1" in panel.undo_action.toolTip()

    view.setFocus()
    press(qtbot, panel, QKeySequence.StandardKey.Undo)
    assert rows(panel)[0].base == "Hello there!"
    assert not panel.is_modified()
    click(qtbot, panel, panel.redo_action)
    assert rows(panel)[0].base == edited
    click(qtbot, panel, panel.undo_action)
    assert rows(panel) == ROWS


def test_escape_cancels_and_unchanged_commit_adds_no_undo_step(qtbot, panel, jsonl_file):
    panel.load_file(jsonl_file)
    editor = open_editor(qtbot, panel, 1, 2)
    qtbot.keyClicks(editor, "zzz")
    qtbot.keyClick(editor, Qt.Key.Key_Escape)
    assert rows(panel) == ROWS
    editor = open_editor(qtbot, panel, 1, 2)
    qtbot.keyClick(editor, Qt.Key.Key_Return)
    assert panel.undo_stack().count() == 0  # the first load is the start state (not undoable); no edit step
    assert not panel.is_modified()


def test_add_remove_duplicate_rows(qtbot, panel, jsonl_file):
    panel.load_file(jsonl_file)
    assert not panel.remove_action.isEnabled()  # nothing selected yet

    click_cell(qtbot, panel, 0)
    click_cell(qtbot, panel, 2, modifier=Qt.KeyboardModifier.ControlModifier)
    assert panel.selected_rows() == [0, 2]
    click(qtbot, panel, panel.duplicate_action)
    assert rows(panel) == [ROWS[0], ROWS[0], ROWS[1], ROWS[2], ROWS[2]]
    assert panel.selected_rows() == [1, 4]  # the copies

    click(qtbot, panel, panel.remove_action)
    assert rows(panel) == ROWS

    click_cell(qtbot, panel, 1)
    click(qtbot, panel, panel.add_action)
    assert rows(panel) == [ROWS[0], ROWS[1], Example(), ROWS[2]]  # after the selection
    assert panel.selected_rows() == [2]

    click_cell(qtbot, panel, 0)
    qtbot.keyClick(panel.view(), Qt.Key.Key_Delete)
    assert rows(panel) == [ROWS[1], Example(), ROWS[2]]

    for _ in range(4):  # delete, add, remove, duplicate
        click(qtbot, panel, panel.undo_action)
    assert rows(panel) == ROWS
    assert not panel.is_modified()
    for _ in range(4):
        click(qtbot, panel, panel.redo_action)
    assert rows(panel) == [ROWS[1], Example(), ROWS[2]]


def test_paste_three_row_block_from_a_spreadsheet(qtbot, panel):
    # What LibreOffice/Excel put on the clipboard: a cell with a newline or quote is quoted.
    block = ('Q1\tplain one\tspicy one\n'
             'Q2\t"two lines\nhere"\tspicy "two"\n'
             '\tno prompt\tspicy three\n')
    QGuiApplication.clipboard().setText(block)
    panel.view().setFocus()
    press(qtbot, panel, QKeySequence.StandardKey.Paste)
    assert rows(panel) == [
        Example("Q1", "plain one", "spicy one"),
        Example("Q2", "two lines\nhere", 'spicy "two"'),
        Example("", "no prompt", "spicy three"),
    ]
    assert panel.undo_stack().count() == 1

    # Two columns are base, target: pasted over row 2 (prompt kept), the extra row is appended.
    QGuiApplication.clipboard().setText("B2\tT2\nB4\tT4\n")
    click_cell(qtbot, panel, 2)
    press(qtbot, panel, QKeySequence.StandardKey.Paste)
    assert rows(panel)[2:] == [Example("", "B2", "T2"), Example("", "B4", "T4")]
    assert len(rows(panel)) == 4

    click(qtbot, panel, panel.undo_action)  # one step undoes the whole paste
    assert len(rows(panel)) == 3 and rows(panel)[2].base == "no prompt"


def test_paste_one_column_fills_the_current_column_and_wide_paste_is_refused(qtbot, panel, jsonl_file):
    panel.load_file(jsonl_file)
    QGuiApplication.clipboard().setText("new target A\nnew target B")
    click_cell(qtbot, panel, 1, col=2)
    press(qtbot, panel, QKeySequence.StandardKey.Paste)
    assert [e.target for e in rows(panel)] == [ROWS[0].target, "new target A", "new target B"]
    assert [e.base for e in rows(panel)] == [e.base for e in ROWS]

    QGuiApplication.clipboard().setText("a\tb\tc\td\n")
    with qtbot.waitSignal(panel.error_occurred) as blocker:
        press(qtbot, panel, QKeySequence.StandardKey.Paste)
    assert "4 columns" in blocker.args[1]


def test_copy_selected_rows_as_tsv_round_trips(qtbot, panel, jsonl_file):
    panel.load_file(jsonl_file)
    click_cell(qtbot, panel, 0)
    click_cell(qtbot, panel, 2, modifier=Qt.KeyboardModifier.ShiftModifier)
    press(qtbot, panel, QKeySequence.StandardKey.Copy)
    text = QGuiApplication.clipboard().text()
    assert text.splitlines()[0] == "Say hi.\tHello there!\tWhat do you want?"
    assert [Example(*r) for r in parse_tsv(text)] == ROWS


def test_invalid_row_is_highlighted_with_its_reason(qtbot, panel, jsonl_file):
    panel.load_file(jsonl_file)
    model = panel.model()
    assert panel._summary.text() == "3 pairs · 0 invalid"
    index = model.index(1, 2)
    assert model.data(index, Qt.ItemDataRole.BackgroundRole) is None

    model.setData(index, "   ")  # blank target
    for col in range(3):
        idx = model.index(1, col)
        assert model.data(idx, Qt.ItemDataRole.BackgroundRole) == INVALID_BACKGROUND
        assert "target is empty" in model.data(idx, Qt.ItemDataRole.ToolTipRole)
    assert model.problems() == [(1, "target is empty")]
    assert panel._summary.text() == "3 pairs · 1 invalid"
    with pytest.raises(SteerdeskError, match="row 2: target is empty"):
        panel.train_and_heldout()

    click(qtbot, panel, panel.add_action)
    assert panel._summary.text() == "4 pairs · 2 invalid"
    assert "both empty" in model.data(model.index(3, 0), Qt.ItemDataRole.ToolTipRole)


def test_heldout_split(qtbot, panel):
    panel.load_bundled("neutral_rude")
    assert panel.heldout_fraction() == 0.25
    train, held = panel.train_and_heldout()
    n = len(panel.dataset())
    assert len(held) == round(n * 0.25) and len(train) + len(held) == n
    spin = panel._heldout
    spin.setFocus()
    qtbot.keyClick(spin, Qt.Key.Key_Up)
    assert panel.heldout_fraction() == pytest.approx(0.30)
    spin.setValue(5.0)
    assert panel.heldout_fraction() == pytest.approx(0.9)
    assert f"of {n} rows" in panel._split_label.text()


# ---------------------------------------------------------------------------- files

def test_save_jsonl_then_reload_equals(qtbot, panel, tmp_path, monkeypatch):
    QGuiApplication.clipboard().setText(to_tsv(ROWS))
    press(qtbot, panel, QKeySequence.StandardKey.Paste)
    target = tmp_path / "mine"  # no extension: .jsonl is added
    asked = []
    monkeypatch.setattr(panel, "_ask_save_path", lambda *a: asked.append(a) or str(target))
    messages = []
    panel.status_message.connect(messages.append)
    press(qtbot, panel, QKeySequence.StandardKey.Save)  # no file yet: asks where
    assert len(asked) == 1
    saved = tmp_path / "mine.jsonl"
    assert panel.current_path() == str(saved)
    assert panel.display_name() == "mine"
    assert not panel.is_modified()
    assert "Saved 3 rows" in messages[-1]

    other = DatasetPanel()
    qtbot.addWidget(other)
    assert other.load_file(saved)
    assert rows(other) == ROWS
    assert load_dataset(saved).examples == ROWS

    # Ctrl+S again writes the same file without asking.
    panel.model().setData(panel.model().index(0, 0), "changed")
    press(qtbot, panel, QKeySequence.StandardKey.Save)
    assert len(asked) == 1
    assert load_dataset(saved).examples[0].prompt == "changed"


def test_csv_export_and_import(qtbot, panel, jsonl_file, tmp_path, monkeypatch):
    panel.load_file(jsonl_file)
    out = tmp_path / "export.csv"
    monkeypatch.setattr(panel, "_ask_save_path", lambda *a: str(out))
    click(qtbot, panel, panel.export_action)
    assert out.read_text(encoding="utf-8").splitlines()[0] == "prompt,base,target"
    assert panel.current_path() == str(jsonl_file)  # an export is a copy

    fresh = DatasetPanel()
    qtbot.addWidget(fresh)
    monkeypatch.setattr(fresh, "_ask_open_path", lambda *a: str(out))
    fresh.show()
    click(qtbot, fresh, fresh.import_action)
    assert rows(fresh) == ROWS
    assert fresh.current_path() == str(out)

    # Save keeps CSV for a CSV file.
    fresh.model().setData(fresh.model().index(0, 1), "csv edit")
    assert fresh.save()
    assert load_dataset(out).examples[0].base == "csv edit"


def test_txt_export_and_import(qtbot, panel, jsonl_file, tmp_path, monkeypatch):
    panel.load_file(jsonl_file)
    monkeypatch.setattr(panel, "_ask_save_path", lambda *a: str(tmp_path / "lists.txt"))
    click(qtbot, panel, panel.export_action)
    base, target = tmp_path / "lists.base.txt", tmp_path / "lists.target.txt"
    assert base.read_text(encoding="utf-8").splitlines() == ["Hello there!", "Sure, happy to help.",
                                                             "line one line two"]
    assert target.read_text(encoding="utf-8").splitlines()[1] == "Fine, whatever."

    fresh = DatasetPanel()
    qtbot.addWidget(fresh)
    fresh.show()
    answers = iter([str(base), str(target)])
    asked = []
    monkeypatch.setattr(fresh, "_ask_open_path", lambda *a: asked.append(a) or next(answers))
    click(qtbot, fresh, fresh.import_action)
    assert len(asked) == 2 and "Target" in asked[1][0]  # the target file is asked for second
    assert [(e.base, e.target) for e in rows(fresh)] == [
        ("Hello there!", "What do you want?"), ("Sure, happy to help.", "Fine, whatever."),
        ("line one line two", "tab\there, comma, end")]
    assert fresh.display_name() == "lists"
    assert fresh.current_path() is None  # text lists are not saved back over
    assert not fresh.is_modified()

    # Lists of different lengths: unpaired, one-sided rows are fine.
    target.write_text("only one\n", encoding="utf-8")
    assert fresh.load_file(base, target)
    assert not fresh.dataset().paired
    assert fresh._summary.text() == "3 rows · 0 invalid"


def test_import_txt_cancelled_at_target(qtbot, panel, tmp_path, monkeypatch):
    base = tmp_path / "a.txt"
    base.write_text("x\n", encoding="utf-8")
    answers = iter([str(base), None])
    monkeypatch.setattr(panel, "_ask_open_path", lambda *a: next(answers))
    click(qtbot, panel, panel.import_action)
    assert rows(panel) == []


def test_bundled_menu_loads_neutral_rude(qtbot, panel, monkeypatch):
    menu = panel.bundled_menu
    names = [a.data() for a in menu.actions()]
    assert "neutral_rude" in names

    picked = []

    def pick_from_open_menu():
        if not menu.isVisible():
            QTimer.singleShot(20, pick_from_open_menu)
            return
        action = next(a for a in menu.actions() if a.data() == "neutral_rude")
        picked.append(action)
        qtbot.mouseClick(menu, Qt.MouseButton.LeftButton, pos=menu.actionGeometry(action).center())
        if menu.isVisible():  # never leave a modal popup open: the test would hang
            menu.close()

    QTimer.singleShot(50, pick_from_open_menu)
    qtbot.mouseClick(panel.bundled_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: len(panel.dataset()) > 0, timeout=3000)
    assert picked
    assert panel.display_name() == "neutral_rude"
    assert len(panel.dataset()) >= 48
    assert panel.dataset().problems() == []
    assert panel.current_path() is None and not panel.is_modified()
    monkeypatch.setattr(panel, "_ask_save_path", lambda *a: None)
    assert panel.save() is False  # a bundled dataset has no file of its own: asks (cancelled here)


def test_failed_save_reports_error_and_keeps_old_file(qtbot, panel, jsonl_file, monkeypatch):
    panel.load_file(jsonl_file)
    before = jsonl_file.read_bytes()
    panel.model().setData(panel.model().index(0, 1), "unsaved change")

    folder = jsonl_file.parent
    os.chmod(folder, 0o555)
    try:
        if os.access(folder, os.W_OK):  # root ignores folder permissions: fail the final rename instead
            def refuse(*_a, **_k):
                raise PermissionError(13, "Permission denied")
            monkeypatch.setattr(os, "replace", refuse)
        with qtbot.waitSignal(panel.error_occurred) as blocker:
            press(qtbot, panel, QKeySequence.StandardKey.Save)
    finally:
        os.chmod(folder, 0o755)
    title, message = blocker.args
    assert title == "Could not save dataset"
    assert str(jsonl_file) in message and "Permission denied" in message
    assert jsonl_file.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["pairs.jsonl"]  # no temp file left
    assert panel.is_modified()


def test_save_into_missing_folder_reports_error(qtbot, panel, tmp_path):
    panel.model().add_row()
    blocker_file = tmp_path / "not-a-folder"
    blocker_file.write_text("x", encoding="utf-8")
    with qtbot.waitSignal(panel.error_occurred) as blocker:
        assert panel.save(blocker_file / "data.jsonl") is False
    assert "Cannot write" in blocker.args[1]


def test_load_errors_become_signals(qtbot, panel, jsonl_file, tmp_path):
    panel.load_file(jsonl_file)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"base": "a", "target": "b"}\n{"base": oops}\n', encoding="utf-8")
    with qtbot.waitSignal(panel.error_occurred) as blocker:
        assert panel.load_file(bad) is False
    assert blocker.args[0] == "Could not load dataset" and "line 2" in blocker.args[1]
    with qtbot.waitSignal(panel.error_occurred):
        assert panel.load_file(tmp_path / "missing.jsonl") is False
    with qtbot.waitSignal(panel.error_occurred):
        assert panel.load_bundled("no_such_dataset") is False
    assert rows(panel) == ROWS and panel.current_path() == str(jsonl_file)


def test_modified_flag_and_signal(qtbot, panel, jsonl_file):
    seen: list[bool] = []
    changed: list[int] = []
    panel.modified_changed.connect(seen.append)
    panel.dataset_changed.connect(lambda: changed.append(1))
    panel.load_file(jsonl_file)
    assert seen == [] and not panel.is_modified()  # a load is saved state: no True/False flicker
    assert changed
    model = panel.model()
    model.setData(model.index(0, 0), "x")
    model.setData(model.index(0, 0), "y")
    assert seen == [True] and panel.is_modified()
    assert "•" in panel._title.text()
    click(qtbot, panel, panel.undo_action)
    click(qtbot, panel, panel.undo_action)
    assert seen == [True, False]
    click(qtbot, panel, panel.redo_action)
    assert seen == [True, False, True]
    assert panel.save()
    assert seen == [True, False, True, False]
    assert json.loads(jsonl_file.read_text(encoding="utf-8").splitlines()[0])["prompt"] == "x"


def test_undoing_a_load_restores_the_previous_file(qtbot, panel, jsonl_file, tmp_path):
    panel.load_file(jsonl_file)
    other = tmp_path / "other.csv"
    save_dataset(Dataset([Example("", "b", "t")]), other)
    panel.load_file(other)
    assert panel.display_name() == "other" and not panel.is_modified()
    click(qtbot, panel, panel.undo_action)
    assert rows(panel) == ROWS
    assert panel.current_path() == str(jsonl_file) and panel.display_name() == "pairs"
    assert panel.is_modified()  # the clean state is the other file now


def test_model_alone():
    model = DatasetTableModel()
    model.set_dataset(Dataset(list(ROWS), name="m"))
    assert model.duplicate_rows([0, 1]) == [1, 3]
    assert model.remove_rows([1, 3]) == 2
    assert model.examples() == ROWS
    assert model.paste_block(None, [["prompt", "base", "target"], ["p", "b", "t"]]) == (0, 1)  # header skipped
    assert model.examples()[-1] == Example("p", "b", "t")
    stack = model.undo_stack()
    while stack.canUndo():
        stack.undo()
    assert model.examples() == [] and model.name() == "untitled"
    assert model.headerData(0, Qt.Orientation.Horizontal) == "Prompt"


def test_screenshot(qtbot, panel):
    panel.load_bundled("neutral_rude")
    model = panel.model()
    model.setData(model.index(2, 2), "")  # one invalid row, to see the highlight
    click_cell(qtbot, panel, 1)
    panel.view().scrollToTop()
    ARTIFACTS.mkdir(exist_ok=True)
    out = ARTIFACTS / "dataset_panel.png"
    assert panel.grab().save(str(out))
    assert out.stat().st_size > 1000


def test_modules_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; import steerdesk.ui.panels.dataset_panel, steerdesk.ui.recovery; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
