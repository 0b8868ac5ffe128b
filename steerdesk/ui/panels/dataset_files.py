"""The dataset panel's files: open, import, save, export, bundled sets and crash recovery.

A mixin of :class:`~steerdesk.ui.panels.dataset_panel.DatasetPanel` (it uses the panel's table
model, undo stack, signals and recovery store). File dialogs and the recovery question go
through ``_ask_open_path`` / ``_ask_save_path`` / ``_ask_recover`` so tests can replace them.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Slot
from PySide6.QtGui import QAction
from PySide6.QtWidgets import QApplication, QFileDialog, QMessageBox, QWidget

from ...core.datasets import Dataset, load_bundled, load_dataset, save_dataset
from ...core.errors import SteerdeskError
from ..recovery import RecoveryStore

OPEN_FILTERS = ("Datasets (*.jsonl *.json *.ndjson *.csv *.txt);;JSON Lines (*.jsonl *.json *.ndjson);;"
                "CSV (*.csv);;Text lists, base then target file (*.txt);;All files (*)")
SAVE_FILTERS = "JSON Lines (*.jsonl);;CSV (*.csv)"
EXPORT_FILTERS = "JSON Lines (*.jsonl);;CSV (*.csv);;Text lists, two files (*.txt)"
BIG_FILE_BYTES = 1_000_000


def plural(n: int, word: str) -> str:
    """``1 row``, ``2 rows``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def txt_pair_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``foo.txt``, ``foo.base.txt`` or ``foo`` -> (``foo.base.txt``, ``foo.target.txt``)."""
    p = Path(path)
    stem = p.name
    for suffix in (".txt", ".base", ".target"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    stem = stem or "dataset"
    return p.with_name(f"{stem}.base.txt"), p.with_name(f"{stem}.target.txt")

def _file_size(path: str | os.PathLike[str]) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


class DatasetFiles:
    """File and recovery actions of the dataset panel (mixed into ``DatasetPanel``)."""

    _model: Any  # DatasetTableModel
    _stack: Any  # QUndoStack
    _recovery: RecoveryStore | None
    _last_dir: str
    _batch: bool
    _autosave: Any  # QTimer

    def load_file(self, path: str | os.PathLike[str], target_path: str | os.PathLike[str] | None = None) -> bool:
        """Load a .jsonl/.json/.csv file, or two text lists (base ``path``, ``target_path``).

        Undoable (Ctrl+Z brings the previous rows back). Text lists have no current file
        afterwards (saving them back would drop prompts), so Save asks where to write.
        Returns False and emits ``error_occurred`` if the file cannot be read.
        """
        big = _file_size(path) > BIG_FILE_BYTES
        if big:  # 100,000 rows parse in well under a second: a busy cursor and a message suffice
            self.status_message.emit(f"Loading {Path(path).name} ({_file_size(path) / 1e6:.1f} MB)…")
            QApplication.setOverrideCursor(Qt.CursorShape.WaitCursor)
            QApplication.processEvents()
        try:
            ds = load_dataset(path, target_path)
        except (SteerdeskError, OSError) as exc:
            self.error_occurred.emit("Could not load dataset", str(exc))
            return False
        finally:
            if big:
                QApplication.restoreOverrideCursor()
        p = Path(path)
        self._last_dir = str(p.resolve().parent)
        if target_path is not None:
            ds.name = txt_pair_paths(p)[0].name[: -len(".base.txt")]
            self._replace(ds, None, f"import {ds.name}")
            where = f"{p.name} and {Path(target_path).name}"
        else:
            self._replace(ds, os.path.abspath(p), f"open {p.name}")
            where = p.name
        self._report_invalid(p)
        extra = "" if ds.paired else " (lists of different lengths: unpaired)"
        self.status_message.emit(f"Loaded {plural(len(ds), 'row')} from {where}{extra}.")
        return True

    def load_bundled(self, name: str) -> bool:
        """Load a dataset shipped with steerdesk (Save then asks for a file)."""
        try:
            ds = load_bundled(name)
        except (SteerdeskError, OSError) as exc:
            self.error_occurred.emit("Could not load dataset", str(exc))
            return False
        self._replace(ds, None, f"load {name}")
        self.status_message.emit(f"Loaded the bundled dataset {name} ({plural(len(ds), 'row')}).")
        return True

    def save(self, path: str | os.PathLike[str] | None = None) -> bool:
        """Save to ``path``, else the current file, else a file the user picks.

        ``.csv`` saves CSV; anything else JSONL (``.jsonl`` is added when there is no known
        extension). The write is atomic: if it fails the old file is untouched,
        ``error_occurred`` is emitted and False returned.
        """
        if path is None:
            path = self.current_path()
        if path is None:
            return self.save_as()
        return self._write(Path(path))

    @Slot()
    def _save_triggered(self) -> None:
        self.save()  # not connected directly: triggered(bool) would arrive as ``path``

    @Slot()
    def save_as(self) -> bool:
        """Ask for a file and save there; it becomes the current file."""
        path = self._ask_save_path("Save dataset", self._suggested_path(".jsonl"), SAVE_FILTERS)
        if not path:
            return False
        return self._write(Path(path))

    def export_to(self, path: str | os.PathLike[str]) -> bool:
        """Write a copy (.jsonl, .csv, or .txt = ``<name>.base.txt`` + ``<name>.target.txt``).

        Does not change the current file or the modified flag.
        """
        p = Path(path)
        ds = self.dataset()
        try:
            if p.suffix.lower() == ".txt":
                base, target = txt_pair_paths(p)
                save_dataset(ds, base, target)
                notes = []
                if any(e.prompt.strip() for e in ds.examples):
                    notes.append("prompts are not kept in text lists")
                if any(not e.base.strip() or not e.target.strip() for e in ds.examples):
                    notes.append("empty cells are skipped")
                note = f" ({'; '.join(notes)})" if notes else ""
                self.status_message.emit(f"Exported {plural(len(ds), 'row')} to {base.name} and {target.name}{note}.")
            else:
                if p.suffix.lower() not in (".jsonl", ".json", ".ndjson", ".csv"):
                    p = p.with_name(p.name + ".jsonl")
                save_dataset(ds, p)
                self.status_message.emit(f"Exported {plural(len(ds), 'row')} to {p.name}.")
        except (SteerdeskError, OSError) as exc:
            self.error_occurred.emit("Could not export dataset", str(exc))
            return False
        self._last_dir = str(p.resolve().parent)
        return True

    def discard_recovery(self) -> None:
        """Forget the autosaved copy (call when the window closes cleanly)."""
        self._autosave.stop()
        if self._recovery is not None:
            self._recovery.clear()

    def offer_recovery(self, parent: QWidget | None = None) -> bool:
        """If a crashed session left unsaved edits, ask whether to restore them; True if restored.

        Restored rows are marked modified (they were never saved) and keep their original file,
        so Save writes them back there. Declining deletes the recovery file.
        """
        if self._recovery is None:
            return False
        found = self._recovery.pending()
        if found is None:
            return False
        ds, header = found
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(header.get("saved_at") or 0)))
        if not self._ask_recover(parent if parent is not None else self, when, header):
            RecoveryStore.discard(header["file"])
            self.status_message.emit("Discarded the recovered dataset edits.")
            return False
        self._model.set_dataset(ds, header.get("path") or None, f"recover {ds.name}")
        if Path(header["file"]) != self._recovery.path:
            RecoveryStore.discard(header["file"])
        self.status_message.emit(f"Recovered {plural(len(ds), 'row')} of unsaved edits from {when}.")
        return True

    def _ask_open_path(self, title: str, filters: str, start: str = "") -> str | None:
        path, _selected = QFileDialog.getOpenFileName(self, title, start or self._last_dir, filters)
        return path or None

    def _ask_save_path(self, title: str, suggested: str, filters: str) -> str | None:
        path, selected = QFileDialog.getSaveFileName(self, title, suggested, filters)
        if not path:
            return None
        if not Path(path).suffix:
            m = re.search(r"\*(\.\w+)", selected or "")
            path += m.group(1) if m else ".jsonl"
        return path

    def _ask_recover(self, parent: QWidget, when: str, header: dict[str, Any]) -> bool:
        origin = header.get("path") or header.get("name") or "an unsaved dataset"
        box = QMessageBox(QMessageBox.Icon.Question, "Recover dataset",
                          f"Recover unsaved dataset edits from {when}?",
                          QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, parent)
        box.setInformativeText(f"{plural(int(header.get('rows') or 0), 'row')} of {origin}, "
                               "not saved when steerdesk last stopped. No discards them.")
        box.setDefaultButton(QMessageBox.StandardButton.Yes)
        return box.exec() == QMessageBox.StandardButton.Yes

    @Slot()
    def import_file(self) -> bool:
        if not self.confirm_replace("importing another dataset"):
            return False
        path = self._ask_open_path("Import dataset", OPEN_FILTERS)
        if not path:
            return False
        target = None
        if Path(path).suffix.lower() == ".txt":
            guess = txt_pair_paths(path)[1]
            target = self._ask_open_path(f"Target list for {Path(path).name} (one example per line)",
                                         "Text lists (*.txt);;All files (*)",
                                         str(guess) if guess.exists() else str(Path(path).parent))
            if not target:
                self.status_message.emit("Import cancelled: a text list needs a target file too.")
                return False
        return self.load_file(path, target)

    @Slot()
    def export_file(self) -> bool:
        path = self._ask_save_path("Export dataset", self._suggested_path(".jsonl"), EXPORT_FILTERS)
        if not path:
            return False
        return self.export_to(path)

    def _replace(self, ds: Dataset, path: str | None, text: str) -> None:
        """Replace all rows as one undo step and mark the result saved.

        The first dataset of a session (replacing the empty untitled start) is not undoable:
        Undo never goes back past the state the app started with.
        """
        start = self._stack.count() == 0 and len(self._model.dataset()) == 0
        self._batch = True
        try:
            self._model.set_dataset(ds, path, text)
            if start:
                self._stack.clear()
            self._stack.setClean()
        finally:
            self._batch = False
        self.dataset_changed.emit()  # once, with the modified state settled (title, panel, close prompt)
        self._sync_modified()
        self._update_title()

    def confirm_replace(self, what: str) -> bool:
        """With unsaved edits, ask before ``what`` replaces the dataset (Save / Discard / Cancel)."""
        if not self.is_modified():
            return True
        answer = self._ask_unsaved(what)
        if answer == QMessageBox.StandardButton.Cancel:
            return False
        if answer == QMessageBox.StandardButton.Save:
            return self.save()
        return True

    def _ask_unsaved(self, what: str) -> QMessageBox.StandardButton:
        b = QMessageBox.StandardButton
        return QMessageBox.question(self, "Unsaved dataset",  # type: ignore[arg-type]
                                    f"The dataset has unsaved edits. Save them before {what}?",
                                    b.Save | b.Discard | b.Cancel, b.Save)

    def _report_invalid(self, path: Path) -> None:
        """Say how many rows of a loaded file are invalid and why (a CSV row with too few fields is one)."""
        problems = self._model.problems()
        if not problems:
            return
        lines = []
        short = _short_csv_rows(path) if path.suffix.lower() == ".csv" else {}
        for row, reason in problems[:5]:
            fields = short.get(row)
            why = f"{fields[0]} of {fields[1]} fields" if fields else reason
            lines.append(f"row {row + 1}: {why}")
        more = f"\n… and {len(problems) - 5} more" if len(problems) > 5 else ""
        message = (f"{plural(len(problems), 'row')} of {path.name} cannot be used"
                   + (f" ({plural(len(short), 'row')} with too few fields)" if short else "")
                   + ":\n" + "\n".join(lines) + more + "\nThey are marked in the table; fix or remove them.")
        self.error_occurred.emit("Invalid rows", message)

    def _write(self, path: Path) -> bool:
        suffix = path.suffix.lower()
        if suffix == ".txt":
            self.error_occurred.emit("Could not save dataset",
                                     "Text lists drop the prompts, so they can only be exported: use Export….")
            return False
        if suffix not in (".jsonl", ".json", ".ndjson", ".csv"):
            path = path.with_name(path.name + ".jsonl")
        ds = self.dataset()
        try:
            save_dataset(ds, path)
        except (SteerdeskError, OSError) as exc:
            self.error_occurred.emit("Could not save dataset", str(exc))
            return False
        self._model.set_path(os.path.abspath(path), path.stem)
        self._last_dir = str(Path(os.path.abspath(path)).parent)
        self._stack.setClean()
        self.discard_recovery()
        bad = len(self._model.problems())
        note = f" ({plural(bad, 'invalid row')})" if bad else ""
        self.status_message.emit(f"Saved {plural(len(ds), 'row')} to {path.name}{note}.")
        return True

    def _suggested_path(self, suffix: str) -> str:
        current = self.current_path()
        folder = Path(current).parent if current else Path(self._last_dir or os.getcwd())
        return str(folder / f"{self.display_name()}{suffix}")

    @Slot()
    def _on_bundled_triggered(self) -> None:
        action = self.sender()
        if isinstance(action, QAction) and self.confirm_replace(f"loading {action.data()}"):
            self.load_bundled(str(action.data()))

    @Slot()
    def _write_recovery(self) -> None:
        if self._recovery is None:
            return
        try:
            if self.is_modified():
                self._recovery.save(self.dataset(), self.current_path())
            else:
                self._recovery.clear()  # back at the saved state: nothing to recover
        except (SteerdeskError, OSError) as exc:
            self.status_message.emit(f"Could not write the recovery copy: {exc}")


def _short_csv_rows(path: Path) -> dict[int, tuple[int, int]]:
    """Data rows (0-based, header excluded) of a CSV with fewer fields than its header: row -> (fields, wanted)."""
    import csv

    out: dict[int, tuple[int, int]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f)]
    except (OSError, UnicodeDecodeError, csv.Error):
        return out
    if not rows:
        return out
    wanted = len(rows[0])
    for i, r in enumerate(r for r in rows[1:] if any(c.strip() for c in r)):
        if len(r) < wanted:
            out[i] = (len(r), wanted)
    return out
