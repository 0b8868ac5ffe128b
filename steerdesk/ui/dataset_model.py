"""Editable table model over a contrast dataset, where every change is an undoable command.

The model holds a plain list of frozen ``core.datasets.Example`` rows. Nothing changes the list
except the ``QUndoCommand`` classes below, so the undo stack is a complete history: an edit, an
insert, a removal, a paste or a whole-dataset load can each be undone and redone.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QPersistentModelIndex, Qt, Signal
from PySide6.QtGui import QColor, QUndoCommand, QUndoStack

from steerdesk.core.datasets import FIELDS, Dataset, Example

COLUMN_TITLES = ("Prompt", "Base", "Target")
COLUMN_TIPS = (
    "The user turn (optional)",
    "The assistant reply without the behaviour",
    "The assistant reply with the behaviour",
)
# Translucent red: blended over the view's base colour it reads as pink on a light palette and as
# dark red on a dark one, so the text colour of either palette stays legible.
INVALID_BACKGROUND = QColor(230, 40, 40, 64)

_Index = QModelIndex | QPersistentModelIndex


@dataclass(frozen=True)
class _State:
    """Everything a whole-dataset replacement changes (so undoing a load restores all of it)."""

    examples: tuple[Example, ...]
    name: str
    paired: bool
    path: str | None


# ---------------------------------------------------------------------------- TSV (clipboard)

def parse_tsv(text: str) -> list[list[str]]:
    """Split clipboard text from a spreadsheet into rows of cells; blank rows are dropped.

    Spreadsheets quote cells that hold tabs, newlines or quotes (a quote inside is doubled); such text is
    parsed with the csv module. Text that is not valid under those rules (a cell that merely
    starts with a quote, typed in a text editor) is split on tabs and newlines as it stands.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    rows: list[list[str]]
    if '"' in text:
        try:
            rows = list(csv.reader(io.StringIO(text), delimiter="\t", strict=True))
        except csv.Error:
            rows = [line.split("\t") for line in text.split("\n")]
    else:
        rows = [line.split("\t") for line in text.split("\n")]
    return [r for r in rows if any(c.strip() for c in r)]


def to_tsv(examples: Iterable[Example]) -> str:
    """Rows as tab-separated ``prompt, base, target`` lines, quoted the way spreadsheets expect."""
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    for e in examples:
        writer.writerow([e.prompt, e.base, e.target])
    return buf.getvalue()


def _blocks(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted indices as contiguous ``(first, last)`` runs."""
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and i == out[-1][1] + 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# ---------------------------------------------------------------------------- commands

class _SetRowsCommand(QUndoCommand):
    """Replace the contents of some rows (cell edits, pasted-over rows)."""

    def __init__(self, model: DatasetTableModel, changes: dict[int, tuple[Example, Example]], text: str):
        super().__init__(text)
        self._model = model
        self._changes = dict(sorted(changes.items()))

    def redo(self) -> None:
        self._model._apply_rows({r: new for r, (_old, new) in self._changes.items()})

    def undo(self) -> None:
        self._model._apply_rows({r: old for r, (old, _new) in self._changes.items()})


class _InsertRowsCommand(QUndoCommand):
    """Insert rows so that they end up at the given (final, ascending) positions."""

    def __init__(self, model: DatasetTableModel, items: list[tuple[int, Example]], text: str):
        super().__init__(text)
        self._model = model
        self._items = sorted(items, key=lambda it: it[0])

    def redo(self) -> None:
        self._model._insert_items(self._items)

    def undo(self) -> None:
        self._model._remove_indices([i for i, _ in self._items])


class _RemoveRowsCommand(QUndoCommand):
    """Remove rows (any set of positions); undo puts each back where it was."""

    def __init__(self, model: DatasetTableModel, items: list[tuple[int, Example]], text: str):
        super().__init__(text)
        self._model = model
        self._items = sorted(items, key=lambda it: it[0])

    def redo(self) -> None:
        self._model._remove_indices([i for i, _ in self._items])

    def undo(self) -> None:
        self._model._insert_items(self._items)


class _ResetCommand(QUndoCommand):
    """Replace the whole dataset (load, import, recovery, set_dataset)."""

    def __init__(self, model: DatasetTableModel, old: _State, new: _State, text: str):
        super().__init__(text)
        self._model = model
        self._old = old
        self._new = new

    def redo(self) -> None:
        self._model._restore(self._new)

    def undo(self) -> None:
        self._model._restore(self._old)


class _MacroCommand(QUndoCommand):
    """Several commands as one undo step (kept in a Python list, so their wrappers stay alive)."""

    def __init__(self, parts: list[QUndoCommand], text: str):
        super().__init__(text)
        self._parts = parts

    def redo(self) -> None:
        for part in self._parts:
            part.redo()

    def undo(self) -> None:
        for part in reversed(self._parts):
            part.undo()


# ---------------------------------------------------------------------------- model

class DatasetTableModel(QAbstractTableModel):
    """Prompt / Base / Target table over a list of ``Example``; every change goes on ``undo_stack()``."""

    path_changed = Signal()
    """The file the dataset belongs to (or its name) changed."""

    def __init__(self, undo_stack: QUndoStack | None = None, parent: Any = None) -> None:
        super().__init__(parent)
        self._rows: list[Example] = []
        self._name = "untitled"
        self._paired = True
        self._path: str | None = None
        self._stack = undo_stack if undo_stack is not None else QUndoStack(self)

    # ------------------------------------------------------------------ Qt model interface
    def rowCount(self, parent: _Index = QModelIndex()) -> int:  # noqa: B008 - Qt's signature
        return 0 if parent.isValid() else len(self._rows)

    def columnCount(self, parent: _Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(FIELDS)

    def data(self, index: _Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or not 0 <= index.row() < len(self._rows):
            return None
        example = self._rows[index.row()]
        if role in (Qt.ItemDataRole.DisplayRole, Qt.ItemDataRole.EditRole):
            return getattr(example, FIELDS[index.column()])
        if role == Qt.ItemDataRole.BackgroundRole:
            return INVALID_BACKGROUND if example.problem(self._paired) else None
        if role == Qt.ItemDataRole.ToolTipRole:
            reason = example.problem(self._paired)
            return f"Row {index.row() + 1}: {reason}" if reason else None
        return None

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if orientation == Qt.Orientation.Horizontal:
            if 0 <= section < len(COLUMN_TITLES):
                if role == Qt.ItemDataRole.DisplayRole:
                    return COLUMN_TITLES[section]
                if role == Qt.ItemDataRole.ToolTipRole:
                    return COLUMN_TIPS[section]
            return None
        if 0 <= section < len(self._rows):
            if role == Qt.ItemDataRole.DisplayRole:
                return str(section + 1)
            if role == Qt.ItemDataRole.ToolTipRole:
                return self._rows[section].problem(self._paired)
        return None

    def flags(self, index: _Index) -> Qt.ItemFlag:
        if not index.isValid():
            return Qt.ItemFlag.NoItemFlags
        return Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable | Qt.ItemFlag.ItemIsEditable

    def setData(self, index: _Index, value: Any, role: int = Qt.ItemDataRole.EditRole) -> bool:
        if role != Qt.ItemDataRole.EditRole or not index.isValid() or not 0 <= index.row() < len(self._rows):
            return False
        text = "" if value is None else str(value)
        row, field = index.row(), FIELDS[index.column()]
        old = self._rows[row]
        if getattr(old, field) == text:
            return False  # an editor closed without a change: no undo step
        new = replace(old, **{field: text})
        self._stack.push(_SetRowsCommand(self, {row: (old, new)},
                                         f"edit {COLUMN_TITLES[index.column()].lower()} of row {row + 1}"))
        return True

    # ------------------------------------------------------------------ reading
    def undo_stack(self) -> QUndoStack:
        """The stack every change of this model is pushed onto."""
        return self._stack

    def examples(self) -> list[Example]:
        """A copy of the rows."""
        return list(self._rows)

    def example(self, row: int) -> Example:
        return self._rows[row]

    def dataset(self) -> Dataset:
        """The rows as a ``core.datasets.Dataset`` (a snapshot; later edits do not change it)."""
        return Dataset(list(self._rows), name=self._name, paired=self._paired)

    def name(self) -> str:
        return self._name

    def paired(self) -> bool:
        return self._paired

    def path(self) -> str | None:
        """The file this dataset is saved in, or ``None`` (new, bundled, imported text lists)."""
        return self._path

    def problems(self) -> list[tuple[int, str]]:
        """``(row, reason)`` for every row that cannot be used."""
        out = []
        for i, e in enumerate(self._rows):
            reason = e.problem(self._paired)
            if reason:
                out.append((i, reason))
        return out

    # ------------------------------------------------------------------ changing (all undoable)
    def set_dataset(self, ds: Dataset, path: str | None = None, text: str | None = None) -> None:
        """Replace every row (one undo step that also restores the previous name and path)."""
        new = _State(tuple(ds.examples), ds.name or "untitled", ds.paired, path)
        self._stack.push(_ResetCommand(self, self._state(), new, text or f"load {new.name}"))

    def insert_examples(self, row: int, examples: Sequence[Example], text: str | None = None) -> list[int]:
        """Insert ``examples`` before ``row`` (``row == rowCount()`` appends); returns their rows."""
        if not examples:
            return []
        row = max(0, min(row, len(self._rows)))
        items = [(row + k, e) for k, e in enumerate(examples)]
        self._stack.push(_InsertRowsCommand(self, items, text or f"add {_plural(len(items), 'row')}"))
        return [i for i, _ in items]

    def add_row(self, row: int | None = None) -> int:
        """Insert one empty row (at the end by default); returns its index."""
        return self.insert_examples(len(self._rows) if row is None else row, [Example()], "add row")[0]

    def remove_rows(self, rows: Iterable[int]) -> int:
        """Remove the given rows; returns how many were removed."""
        rows = sorted({r for r in rows if 0 <= r < len(self._rows)})
        if not rows:
            return 0
        items = [(r, self._rows[r]) for r in rows]
        self._stack.push(_RemoveRowsCommand(self, items, f"remove {_plural(len(rows), 'row')}"))
        return len(rows)

    def duplicate_rows(self, rows: Iterable[int]) -> list[int]:
        """Put a copy of each row right after it; returns the rows of the copies."""
        rows = sorted({r for r in rows if 0 <= r < len(self._rows)})
        if not rows:
            return []
        # The k-th copy (0-based) lands after its original, shifted by the k copies before it.
        items = [(r + k + 1, self._rows[r]) for k, r in enumerate(rows)]
        self._stack.push(_InsertRowsCommand(self, items, f"duplicate {_plural(len(rows), 'row')}"))
        return [i for i, _ in items]

    def paste_block(self, start_row: int | None, cells: Sequence[Sequence[str]],
                    column: int | None = None) -> tuple[int, int]:
        """Paste a block of cells as one undo step; returns ``(rows replaced, rows added)``.

        Three columns are prompt, base, target; two are base, target (the prompt of a row pasted
        over is kept); one column fills ``column`` (default Base). Pasting starts at
        ``start_row`` and overwrites rows from there; rows past the end are appended. With
        ``start_row=None`` every pasted row is appended. Raises ``ValueError`` for more than 3
        columns.
        """
        cells = [list(r) for r in cells if any(c.strip() for c in r)]
        if not cells:
            return (0, 0)
        width = max(len(r) for r in cells)
        if width > 3:
            raise ValueError(f"The pasted text has {width} columns; expected 2 (base, target) "
                             f"or 3 (prompt, base, target).")
        header = [c.strip().lower() for c in cells[0]]
        if header in (list(FIELDS), list(FIELDS[1:])):
            cells = cells[1:]  # a header row copied along with the data
            if not cells:
                return (0, 0)
        if width == 3:
            fields: tuple[str, ...] = FIELDS
        elif width == 2:
            fields = FIELDS[1:]
        else:
            fields = (FIELDS[column if column is not None and 0 <= column < 3 else 1],)

        start = len(self._rows) if start_row is None else max(0, min(start_row, len(self._rows)))
        changes: dict[int, tuple[Example, Example]] = {}
        added: list[tuple[int, Example]] = []
        for k, row_cells in enumerate(cells):
            values = {f: (row_cells[i] if i < len(row_cells) else "") for i, f in enumerate(fields)}
            r = start + k
            if r < len(self._rows):
                old = self._rows[r]
                new = replace(old, **values)
                if new != old:
                    changes[r] = (old, new)
            else:
                added.append((r, Example(**values)))
        parts: list[QUndoCommand] = []
        if changes:
            parts.append(_SetRowsCommand(self, changes, "paste"))
        if added:
            parts.append(_InsertRowsCommand(self, added, "paste"))
        if parts:
            self._stack.push(_MacroCommand(parts, f"paste {_plural(len(cells), 'row')}"))
        return (len(changes), len(added))

    def set_path(self, path: str | None, name: str | None = None) -> None:
        """Record where the dataset now lives (after Save As); not an undo step."""
        self._path = path
        if name:
            self._name = name
        self.path_changed.emit()

    # ------------------------------------------------------------------ primitives (commands only)
    def _state(self) -> _State:
        return _State(tuple(self._rows), self._name, self._paired, self._path)

    def _restore(self, state: _State) -> None:
        self.beginResetModel()
        self._rows = list(state.examples)
        self._name = state.name
        self._paired = state.paired
        self._path = state.path
        self.endResetModel()
        self.path_changed.emit()

    def _apply_rows(self, rows: dict[int, Example]) -> None:
        for r, e in rows.items():
            self._rows[r] = e
        last_col = len(FIELDS) - 1
        for first, last in _blocks(sorted(rows)):
            self.dataChanged.emit(self.index(first, 0), self.index(last, last_col))
            self.headerDataChanged.emit(Qt.Orientation.Vertical, first, last)

    def _insert_items(self, items: list[tuple[int, Example]]) -> None:
        # Ascending final positions: once the earlier ones are in, each position is right.
        by_pos = dict(items)
        for first, last in _blocks([i for i, _ in items]):
            self.beginInsertRows(QModelIndex(), first, last)
            self._rows[first:first] = [by_pos[i] for i in range(first, last + 1)]
            self.endInsertRows()

    def _remove_indices(self, indices: list[int]) -> None:
        for first, last in reversed(_blocks(sorted(indices))):
            self.beginRemoveRows(QModelIndex(), first, last)
            del self._rows[first:last + 1]
            self.endRemoveRows()
