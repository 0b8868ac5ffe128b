"""Qt test setup for the UI tests: offscreen platform, set before any QApplication exists."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def _pin_singletons_if_pyside_drops_references() -> None:
    """Work around a reference-count bug of PySide6 6.12.0 on CPython < 3.12.

    There every call of a void Qt method drops a reference to ``None`` and every
    ``Signal.emit()`` one to ``True`` (3.12+ makes both immortal, which hides it; 6.11.3 is
    fine). After a few thousand calls the interpreter aborts with "none_dealloc" or
    "bool_dealloc", in a test run usually at exit (rc 134). The real fix is pinning PySide6
    below 6.12 for the app; the test process only guards its own exit. Detected by behaviour,
    so it does nothing on a PySide6 without the bug.
    """
    if sys.version_info >= (3, 12) or sys.implementation.name != "cpython":
        return
    from PySide6.QtCore import QObject

    probe = QObject()
    before = sys.getrefcount(None)
    for _ in range(20):
        probe.setObjectName("probe")
    if sys.getrefcount(None) >= before - 10:
        return
    import ctypes

    for obj in (None, True, False):
        ctypes.c_ssize_t.from_address(id(obj)).value += 1 << 40  # ob_refcnt: effectively immortal


_pin_singletons_if_pyside_drops_references()
