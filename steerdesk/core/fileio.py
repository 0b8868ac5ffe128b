"""Atomic file writes: temp file in the same folder, fsync, ``os.replace``."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import SteerdeskError


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and move it into place.

    On any failure the temporary file is removed and the previous file is left intact.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise SteerdeskError(f"Cannot write {target}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _mode_for(target))  # mkstemp made it 0600; the file gets what any new file would
        os.replace(tmp, target)
    except OSError as exc:
        raise SteerdeskError(f"Cannot write {target}: {exc.strerror or exc}") from exc
    finally:
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:
                pass
    _fsync_dir(folder)


def current_umask() -> int:
    """The process umask, read without changing it (``/proc``); the set-and-restore fallback elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(target: Path) -> int:
    """An existing file keeps its permissions; a new one gets ``0o666 & ~umask`` like any other app's."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~current_umask()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_with(path: str | os.PathLike[str], writer: Callable[[Path], object]) -> None:
    """Let ``writer`` fill a temporary path, then move it over ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_output_file(path: str | os.PathLike[str], *, suffixes: tuple[str, ...] = (),
                      inputs: tuple[str | os.PathLike[str] | None, ...] = (), what: str = "output") -> Path:
    """Refuse, before any work is done, an output file that cannot be written or would destroy an input.

    ``suffixes`` (lower case, with the dot; empty: any) are the endings the file's format goes
    with; ``inputs`` are the paths the same run reads (missing ones and ``None`` are skipped).
    Returns ``path`` as a ``Path``. Raises ``SteerdeskError`` when the path is an existing folder,
    its folder is missing or not writable, its ending is not one of ``suffixes``, or it names the
    same file as one of ``inputs`` (writing it would replace what the run reads).
    """
    target = Path(path).expanduser()
    if not str(path).strip():
        raise SteerdeskError(f"The {what} path is empty.")
    if target.is_dir():
        raise SteerdeskError(f"{target} is a folder: give the {what} a file name.")
    if suffixes and target.suffix.lower() not in suffixes:
        raise SteerdeskError(f"{target}: the {what} must end in {' or '.join(suffixes)} (the format it is written "
                             f"in).")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise SteerdeskError(f"Cannot write {target}: the folder {folder} does not exist.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SteerdeskError(f"Cannot write {target}: the folder {folder} is not writable.")
    for source in inputs:
        if source is None or not str(source) or not Path(source).expanduser().is_file() or not target.exists():
            continue
        if os.path.samefile(target, Path(source).expanduser()):
            raise SteerdeskError(f"{target} is also an input of this run: writing the {what} there would replace "
                                 f"it. Choose another file name.")
    return target
