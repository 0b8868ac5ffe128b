"""Helpers shared by the real-X11 tests (a plain module: conftest files are not importable by name)."""

from __future__ import annotations

import os

SCREEN = (1366, 768)  # the Xvfb screen: a common laptop (issue 13's smallest real target)


def clean_env(**overrides: str) -> dict[str, str]:
    """This process's environment without any display or Qt platform setting, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM", "XDG_SESSION_TYPE")}
    env.update(overrides)
    return env
