"""The dataset editor: a table of contrast pairs with undo, clipboard, files and crash recovery.

The panel never shows a dialog of its own for errors: it emits ``error_occurred(title, message)``
and the window decides how to show it. File dialogs and the recovery question go through
``_ask_open_path`` / ``_ask_save_path`` / ``_ask_recover`` so tests can replace them.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QItemSelection, QItemSelectionModel, Qt, QTimer, Signal, Slot
from PySide6.QtGui import QAction, QGuiApplication, QKeySequence, QUndoStack
from PySide6.QtWidgets import (
    QDoubleSpinBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QMenu,
    QTableView,
    QToolBar,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ...core.datasets import Dataset, bundled_datasets
from ...core.errors import SteerdeskError
from ..dataset_model import DatasetTableModel, parse_tsv, to_tsv
from ..recovery import RecoveryStore
from .dataset_files import DatasetFiles, plural
from .dataset_view import make_table

AUTOSAVE_MS = 1000
LARGE_TABLE_ROWS = 2000


class DatasetPanel(QWidget, DatasetFiles):
    """Edit a contrast dataset: rows, clipboard, files, bundled examples, held-out split."""

    dataset_changed = Signal()
    """The rows changed (edit, paste, load, undo, redo ...)."""
    modified_changed = Signal(bool)
    """The dataset went from saved to unsaved (True) or back (False)."""
    status_message = Signal(str)
    """A one-line note for the status bar."""
    error_occurred = Signal(str, str)
    """Something the user should see in a dialog: (title, message)."""
    path_changed = Signal()
    """The file (or name) the dataset belongs to changed (load, Save As, undoing a load)."""

    def __init__(self, parent: QWidget | None = None, recovery: RecoveryStore | None = None) -> None:
        super().__init__(parent)
        self._recovery = recovery
        self._last_dir = ""
        self._last_modified = False
        self._batch = False  # True while a load is being pushed and marked clean (no flicker)

        self._stack = QUndoStack(self)
        self._model = DatasetTableModel(self._stack, self)

        self._autosave = QTimer(self)
        self._autosave.setSingleShot(True)
        self._autosave.setInterval(AUTOSAVE_MS)
        self._autosave.timeout.connect(self._write_recovery)

        self._build_actions()
        self._build_ui()

        self._stack.indexChanged.connect(self._on_index_changed)
        self._stack.cleanChanged.connect(self._on_clean_changed)
        self._stack.canUndoChanged.connect(self._update_actions)
        self._stack.canRedoChanged.connect(self._update_actions)
        self._stack.undoTextChanged.connect(self._update_actions)
        self._stack.redoTextChanged.connect(self._update_actions)
        self._model.path_changed.connect(self._on_path_changed)
        self._view.selectionModel().selectionChanged.connect(self._update_actions)

        self._refresh_summary()
        self._update_actions()
        self._on_path_changed()

    # ------------------------------------------------------------------ construction
    def _action(self, text: str, slot: Any, shortcut: QKeySequence | str | None = None, tip: str = "") -> QAction:
        action = QAction(text, self)
        if shortcut is not None:
            action.setShortcut(QKeySequence(shortcut))
            # Only while focus is inside this panel, so the window's other panels keep their keys.
            action.setShortcutContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
            self.addAction(action)
            seq = action.shortcut().toString(QKeySequence.SequenceFormat.NativeText)
            tip = f"{tip} ({seq})" if seq else tip
        action.setToolTip(tip or text)
        action.triggered.connect(slot)
        return action

    def _build_actions(self) -> None:
        self.add_action = self._action("Add row", self.add_row, tip="Add an empty row after the selection")
        self.remove_action = self._action("Remove", self.remove_selected, tip="Remove the selected rows (Delete)")
        self.duplicate_action = self._action("Duplicate", self.duplicate_selected,
                                             tip="Duplicate the selected rows")
        self.undo_action = self._action("Undo", self._stack.undo, QKeySequence.StandardKey.Undo, "Undo")
        self.redo_action = self._action("Redo", self._stack.redo, QKeySequence.StandardKey.Redo, "Redo")
        self.import_action = self._action("Import…", self.import_file,
                                          tip="Load a .jsonl or .csv file, or two .txt lists")
        self.export_action = self._action("Export…", self.export_file,
                                          tip="Write a copy as .jsonl, .csv or two .txt lists")
        self.save_action = self._action("Save", self._save_triggered, QKeySequence.StandardKey.Save,
                                        "Save to the current file")
        self.save_as_action = self._action("Save As…", self.save_as, "Ctrl+Shift+S",
                                           "Save to a new .jsonl or .csv file")
        self.copy_action = self._action("Copy rows", self.copy_selected, tip="Copy the selected rows as TSV (Ctrl+C)")
        self.paste_action = self._action("Paste", self.paste, tip="Paste rows from a spreadsheet (Ctrl+V)")

        self.bundled_menu = QMenu("Bundled", self)
        try:
            names = sorted(bundled_datasets())
        except (OSError, SteerdeskError):  # a broken install must not stop the panel from opening
            names = []
        for name in names:
            act = self.bundled_menu.addAction(name)
            act.setData(name)
            act.triggered.connect(self._on_bundled_triggered)
        if not names:
            self.bundled_menu.addAction("(none installed)").setEnabled(False)

    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.setSpacing(4)

        top = QHBoxLayout()
        self._title = QLabel()
        self._title.setTextFormat(Qt.TextFormat.PlainText)
        font = self._title.font()
        font.setBold(True)
        self._title.setFont(font)
        top.addWidget(self._title, 1)
        self.file_toolbar = QToolBar("Dataset files", self)
        self.file_toolbar.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextOnly)
        self.file_toolbar.addAction(self.import_action)
        self.file_toolbar.addAction(self.export_action)
        self.bundled_button = QToolButton(self)
        self.bundled_button.setText("Bundled ▾")
        self.bundled_button.setToolTip("Load one of the example datasets that ship with steerdesk")
        self.bundled_button.setMenu(self.bundled_menu)
        self.bundled_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.bundled_button.setStyleSheet("QToolButton::menu-indicator { image: none; width: 0px; }")
        self.file_toolbar.addWidget(self.bundled_button)
        self.file_toolbar.addSeparator()
        self.file_toolbar.addAction(self.save_action)
        self.file_toolbar.addAction(self.save_as_action)
        top.addWidget(self.file_toolbar)
        layout.addLayout(top)

        self.edit_toolbar = QToolBar("Dataset rows", self)
        self.edit_toolbar.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextOnly)
        for action in (self.add_action, self.remove_action, self.duplicate_action):
            self.edit_toolbar.addAction(action)
        self.edit_toolbar.addSeparator()
        self.edit_toolbar.addAction(self.undo_action)
        self.edit_toolbar.addAction(self.redo_action)
        layout.addWidget(self.edit_toolbar)

        view = make_table(self, self._model)
        view.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        view.customContextMenuRequested.connect(self._show_context_menu)
        view.copy_requested.connect(self.copy_selected)
        view.paste_requested.connect(self.paste)
        view.delete_requested.connect(self.remove_selected)
        self._view = view
        layout.addWidget(view, 1)
        # Fitting every row's height to its text costs O(rows) per change: fine for a few
        # thousand rows, seconds for 100,000. Large tables get fixed two-line rows instead.
        for sig in (self._model.modelReset, self._model.rowsInserted, self._model.rowsRemoved):
            sig.connect(self._update_row_sizing)

        bottom = QHBoxLayout()
        bottom.addWidget(QLabel("Held out"))
        self._heldout = QDoubleSpinBox(self)
        self._heldout.setRange(0.0, 0.9)
        self._heldout.setSingleStep(0.05)
        self._heldout.setDecimals(2)
        self._heldout.setValue(0.25)
        self._heldout.setToolTip("Fraction of the rows kept out of vector extraction, to evaluate the vector on")
        self._heldout.valueChanged.connect(self._refresh_summary)
        bottom.addWidget(self._heldout)
        self._split_label = QLabel()
        self._split_label.setEnabled(False)  # greyed: secondary information
        bottom.addWidget(self._split_label)
        bottom.addStretch(1)
        self._next_invalid = QToolButton(self)
        self._next_invalid.setText("Next invalid")
        self._next_invalid.setToolTip("Select the next row that cannot be used")
        self._next_invalid.setAutoRaise(True)
        self._next_invalid.clicked.connect(self.select_next_invalid)
        bottom.addWidget(self._next_invalid)
        self._summary = QLabel()
        bottom.addWidget(self._summary)
        layout.addLayout(bottom)

    # ------------------------------------------------------------------ public API
    def dataset(self) -> Dataset:
        """The rows as they stand (a snapshot)."""
        return self._model.dataset()

    def heldout_fraction(self) -> float:
        """The "Held out" fraction, 0 to 0.9."""
        return float(self._heldout.value())

    def set_heldout_fraction(self, value: float) -> None:
        self._heldout.setValue(value)

    def train_and_heldout(self) -> tuple[Dataset, Dataset]:
        """``(train, held-out)`` by the deterministic split of ``Dataset.split``.

        Raises ``SteerdeskError`` when the dataset cannot produce a vector; the message names the
        row as numbered in the table (the split renumbers rows, so it is checked before splitting).
        """
        ds = self.dataset()
        ds.validate()
        return ds.split(self.heldout_fraction())

    def model(self) -> DatasetTableModel:
        return self._model

    def view(self) -> QTableView:
        return self._view

    def undo_stack(self) -> QUndoStack:
        return self._stack

    def is_modified(self) -> bool:
        """Whether there are changes since the last load or save."""
        return not self._stack.isClean()

    def current_path(self) -> str | None:
        """The file Save writes to, or ``None`` (new, bundled or imported text lists)."""
        return self._model.path()

    def display_name(self) -> str:
        """A short name for titles: the file's stem, the bundled name, or "untitled"."""
        return self._model.name()

    def problems(self) -> list[tuple[int, str]]:
        return self._model.problems()

    # ------------------------------------------------------------------ user actions
    @Slot()
    def add_row(self) -> None:
        rows = self.selected_rows()
        row = self._model.add_row(rows[-1] + 1 if rows else None)
        self._select_rows([row])
        self._view.setCurrentIndex(self._model.index(row, 0))

    @Slot()
    def remove_selected(self) -> None:
        rows = self.selected_rows()
        if not rows:
            self.status_message.emit("Select the rows to remove first.")
            return
        self._model.remove_rows(rows)
        if self._model.rowCount():
            self._select_rows([min(rows[0], self._model.rowCount() - 1)])
        self.status_message.emit(f"Removed {plural(len(rows), 'row')}.")

    @Slot()
    def duplicate_selected(self) -> None:
        rows = self.selected_rows()
        if not rows:
            self.status_message.emit("Select the rows to duplicate first.")
            return
        self._select_rows(self._model.duplicate_rows(rows))

    @Slot()
    def copy_selected(self) -> None:
        rows = self.selected_rows()
        if not rows:
            return
        QGuiApplication.clipboard().setText(to_tsv(self._model.example(r) for r in rows))
        self.status_message.emit(f"Copied {plural(len(rows), 'row')}.")

    @Slot()
    def paste(self) -> None:
        """Paste tab-separated rows from the clipboard, starting at the current row."""
        text = QGuiApplication.clipboard().text()
        cells = parse_tsv(text)
        if not cells:
            self.status_message.emit("Nothing to paste: the clipboard holds no text.")
            return
        selected = self.selected_rows()
        current = self._view.currentIndex()
        start = selected[0] if selected else None
        column = current.column() if current.isValid() else None
        try:
            replaced, added = self._model.paste_block(start, cells, column)
        except ValueError as exc:
            self.error_occurred.emit("Cannot paste", str(exc))
            return
        first = self._model.rowCount() - added if start is None else start
        self._select_rows(list(range(first, first + replaced + added)))
        parts = [p for p in (f"{replaced} replaced" if replaced else "", f"{added} added" if added else "") if p]
        self.status_message.emit(f"Pasted {plural(replaced + added, 'row')}"
                                 + (f" ({', '.join(parts)})." if parts else "."))

    @Slot()
    def select_next_invalid(self) -> None:
        bad = [r for r, _ in self._model.problems()]
        if not bad:
            return
        current = self._view.currentIndex().row()
        row = next((r for r in bad if r > current), bad[0])
        self._select_rows([row])
        self._view.setCurrentIndex(self._model.index(row, 1))
        self.status_message.emit(f"Row {row + 1}: {self._model.example(row).problem(self._model.paired())}.")

    def selected_rows(self) -> list[int]:
        """Rows with any selected cell, ascending."""
        sel = self._view.selectionModel()
        return sorted({i.row() for i in sel.selectedIndexes()}) if sel is not None else []

    # ------------------------------------------------------------------ internals
    def _select_rows(self, rows: list[int]) -> None:
        sel = self._view.selectionModel()
        last_col = self._model.columnCount() - 1
        selection = QItemSelection()
        for r in rows:
            selection.select(self._model.index(r, 0), self._model.index(r, last_col))
        sel.select(selection, QItemSelectionModel.SelectionFlag.ClearAndSelect)
        if rows:
            sel.setCurrentIndex(self._model.index(rows[0], max(self._view.currentIndex().column(), 0)),
                                QItemSelectionModel.SelectionFlag.NoUpdate)
            self._view.scrollTo(self._model.index(rows[-1], 0))
            self._view.scrollTo(self._model.index(rows[0], 0))

    def _show_context_menu(self, pos: Any) -> None:
        menu = QMenu(self)
        for action in (self.add_action, self.duplicate_action, self.remove_action):
            menu.addAction(action)
        menu.addSeparator()
        menu.addAction(self.copy_action)
        menu.addAction(self.paste_action)
        menu.exec(self._view.viewport().mapToGlobal(pos))

    @Slot(int)
    def _on_index_changed(self, _index: int) -> None:
        self._refresh_summary()
        self._update_actions()
        if self._recovery is not None:
            self._autosave.start()  # restarted on every change: writes a second after the last one
        if not self._batch:  # a load emits once, after it is marked saved
            self.dataset_changed.emit()
            self._sync_modified()

    @Slot(bool)
    def _on_clean_changed(self, _clean: bool) -> None:
        if not self._batch:
            self._sync_modified()

    def _sync_modified(self) -> None:
        modified = self.is_modified()
        if modified != self._last_modified:
            self._last_modified = modified
            self._update_title()
            self.modified_changed.emit(modified)

    @Slot()
    def _on_path_changed(self) -> None:
        self._update_title()
        self.path_changed.emit()

    def _update_title(self) -> None:
        self._title.setText(self.display_name() + (" •" if self.is_modified() else ""))
        self._title.setToolTip(self.current_path() or "Not saved to a file yet")

    @Slot()
    def _update_actions(self, *_args: Any) -> None:
        has_sel = bool(self.selected_rows())
        self.remove_action.setEnabled(has_sel)
        self.duplicate_action.setEnabled(has_sel)
        self.copy_action.setEnabled(has_sel)
        self.undo_action.setEnabled(self._stack.canUndo())
        self.redo_action.setEnabled(self._stack.canRedo())
        undo, redo = self._stack.undoText(), self._stack.redoText()
        self.undo_action.setToolTip(f"Undo {undo}" if undo else "Nothing to undo")
        self.redo_action.setToolTip(f"Redo {redo}" if redo else "Nothing to redo")

    @Slot()
    def _update_row_sizing(self, *_args: object) -> None:
        header = self._view.verticalHeader()
        large = self._model.rowCount() > LARGE_TABLE_ROWS
        mode = QHeaderView.ResizeMode.Fixed if large else QHeaderView.ResizeMode.ResizeToContents
        if header.sectionResizeMode(0) != mode if self._model.rowCount() else False:
            header.setSectionResizeMode(mode)
            if large:
                header.setDefaultSectionSize(2 * self._view.fontMetrics().lineSpacing() + 8)

    def _refresh_summary(self) -> None:
        n = self._model.rowCount()
        bad = len(self._model.problems())
        noun = "pair" if self._model.paired() else "row"
        self._summary.setText(f"{plural(n, noun)} · {bad} invalid")
        self._summary.setToolTip("" if self._model.paired() else
                                 "Unpaired lists: a row may hold only a base or only a target reply")
        self._next_invalid.setVisible(bad > 0)
        _train, held = self.dataset().split(self.heldout_fraction()) if n else (None, None)
        self._split_label.setText(f"{len(held)} of {n} rows" if held is not None else "")

