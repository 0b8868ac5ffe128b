"""The one error type for everything a user can cause."""

from __future__ import annotations


class SteerdeskError(Exception):
    """A problem the user can fix (bad file, wrong model, bad setting).

    The CLI prints it as one line and exits 2; the window shows it in a dialog.
    Anything that is not a ``SteerdeskError`` is a bug.
    """


class Cancelled(Exception):
    """Work was stopped on request (a ``threading.Event`` was set).

    Not a :class:`SteerdeskError`: a stop is neither a user error nor a bug, so code that
    reports user errors must not catch it by accident (the window's worker reports it as
    "stopped", the CLI as an interruption).
    """
