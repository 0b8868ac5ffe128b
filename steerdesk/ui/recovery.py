"""Crash recovery for unsaved dataset edits.

The dataset panel writes its unsaved rows here about a second after each edit. The file is
JSONL: a header object on the first line (``steerdesk_recovery``, original path, name, paired,
timestamp, pid), then one example a line, written atomically so a kill at any moment leaves
either the previous complete file or the new complete file.

One file per process: ``dataset-recovery.jsonl`` normally; a process that finds that file
written by another process (a second running window, or a crash whose recovery has not been
dealt with yet) writes ``dataset-recovery-<pid>.jsonl`` instead, so no recovery data is ever
overwritten or cleared by anyone but its writer.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from steerdesk.core.datasets import Dataset, parse_jsonl, to_jsonl
from steerdesk.core.errors import SteerdeskError
from steerdesk.core.fileio import atomic_write_text

FILE_NAME = "dataset-recovery.jsonl"
_GLOB = "dataset-recovery*.jsonl"
FORMAT = 1


def default_folder() -> Path:
    """``$STEERDESK_DATA_DIR`` if set, else the per-user data folder of steerdesk."""
    env = os.environ.get("STEERDESK_DATA_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("steerdesk", appauthor=False))


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id is running (never signals it; on Windows os.kill would kill)."""
    if pid <= 0:
        return False
    if sys.platform == "win32":
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        try:
            code = ctypes.c_ulong()
            if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
                return False
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return True


def _read_header(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            first = fh.readline()
        header = json.loads(first)
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict) or header.get("steerdesk_recovery") != FORMAT:
        return None
    return header


class RecoveryStore:
    """Where the unsaved dataset of this process is kept until it is saved or discarded."""

    def __init__(self, folder: str | os.PathLike[str] | None = None) -> None:
        self.folder = Path(folder) if folder is not None else default_folder()
        self._own: Path | None = None  # the file this process writes, chosen on first write

    @property
    def path(self) -> Path:
        """The file this process writes (``dataset-recovery.jsonl`` unless another process's is there)."""
        if self._own is None:
            main = self.folder / FILE_NAME
            header = _read_header(main) if main.exists() else None
            if header is not None and int(header.get("pid", 0) or 0) != os.getpid():
                self._own = self.folder / f"dataset-recovery-{os.getpid()}.jsonl"
            else:
                self._own = main
        return self._own

    def save(self, ds: Dataset, original_path: str | None) -> Path:
        """Write ``ds`` atomically with its header; raises ``SteerdeskError`` if it cannot."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SteerdeskError(f"Cannot create the recovery folder {self.folder}: {exc.strerror or exc}") from exc
        header = {
            "steerdesk_recovery": FORMAT,
            "path": original_path,
            "name": ds.name,
            "paired": ds.paired,
            "rows": len(ds),
            "saved_at": time.time(),
            "pid": os.getpid(),
        }
        target = self.path
        atomic_write_text(target, json.dumps(header, ensure_ascii=False) + "\n" + to_jsonl(ds))
        return target

    def clear(self) -> None:
        """Remove this process's recovery file (nothing else's)."""
        target = self.path
        header = _read_header(target) if target.exists() else None
        if header is not None and int(header.get("pid", 0) or 0) != os.getpid():
            return  # written by another process: not ours to delete
        self.discard(target)

    @staticmethod
    def discard(file: str | os.PathLike[str]) -> None:
        """Delete one recovery file (e.g. the one ``pending()`` returned, once dealt with)."""
        try:
            Path(file).unlink()
        except FileNotFoundError:
            pass
        except OSError:
            pass  # a stale recovery file is only offered again; never fail a save or a close over it

    def pending(self) -> tuple[Dataset, dict[str, Any]] | None:
        """The newest recovery left by a process that is gone (crashed): ``(dataset, header)``.

        ``header`` holds ``path`` (the original file or ``None``), ``name``, ``paired``, ``rows``,
        ``saved_at`` (epoch seconds), ``pid`` and ``file`` (the recovery file itself). Files of
        running instances and unreadable files are skipped.
        """
        try:
            candidates = list(self.folder.glob(_GLOB))
        except OSError:
            return None
        found: list[tuple[float, Path, dict[str, Any]]] = []
        for file in candidates:
            header = _read_header(file)
            if header is None:
                continue
            pid = int(header.get("pid", 0) or 0)
            if pid != os.getpid() and _pid_alive(pid):
                continue
            found.append((float(header.get("saved_at", 0) or 0), file, header))
        for _saved, file, header in sorted(found, key=lambda f: f[0], reverse=True):
            try:
                text = file.read_text(encoding="utf-8")
                body = text.split("\n", 1)[1] if "\n" in text else ""
                ds = parse_jsonl(body, str(file))
            except (OSError, UnicodeDecodeError, SteerdeskError):
                continue
            ds.name = str(header.get("name") or "untitled")
            ds.paired = bool(header.get("paired", True))
            header = dict(header, file=str(file))
            return ds, header
        return None
