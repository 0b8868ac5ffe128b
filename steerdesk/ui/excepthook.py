"""The window's last line of defence: an exception nobody caught (e.g. in a slot) becomes a dialog.

Qt calls ``sys.excepthook`` for an exception that escapes a Python slot and then carries on, so
without this hook the error only reaches a terminal the user usually does not see.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any

from PySide6.QtWidgets import QWidget

from .dialogs import show_error
from .requests import ErrorInfo

log = logging.getLogger("steerdesk.ui")

Hook = Callable[[type[BaseException], BaseException, TracebackType | None], Any]


def install_excepthook(parent: QWidget | None) -> Hook:
    """Show uncaught exceptions in a dialog over ``parent`` (and log them); returns the previous hook.

    ``KeyboardInterrupt`` and failures of the dialog itself go to the previous hook. Dialogs are
    kept in ``parent._dialogs`` when it has that list (the main window), so tests can find them.
    """
    previous = sys.excepthook
    showing = {"now": False}

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if issubclass(exc_type, KeyboardInterrupt) or showing["now"]:
            previous(exc_type, exc, tb)
            return
        log.error("Unexpected error", exc_info=(exc_type, exc, tb))
        showing["now"] = True
        try:
            if exc.__traceback__ is None and tb is not None:
                exc = exc.with_traceback(tb)
            box = show_error(parent, ErrorInfo.from_exception(exc, "Unexpected error"))
            dialogs = getattr(parent, "_dialogs", None)
            if isinstance(dialogs, list):
                dialogs.append(box)
            else:
                _kept.append(box)
        except Exception:  # noqa: BLE001 - never fail inside the hook
            previous(exc_type, exc, tb)
        finally:
            showing["now"] = False

    sys.excepthook = hook
    return previous


_kept: list[Any] = []  # dialogs shown without a window that keeps them
