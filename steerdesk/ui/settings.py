"""Persistent settings (QSettings) with small typed helpers."""

from __future__ import annotations

import os
from typing import Any

from PySide6.QtCore import QSettings

MAX_RECENT = 8


def settings() -> QSettings:
    """Per-user settings; ``STEERDESK_SETTINGS`` points them at an INI file (tests, portable use)."""
    path = os.environ.get("STEERDESK_SETTINGS")
    if path:
        return QSettings(path, QSettings.Format.IniFormat)
    return QSettings("steerdesk", "steerdesk")


def get_list(s: QSettings, key: str) -> list[str]:
    value: Any = s.value(key, [])
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    return [str(v) for v in value]


def push_recent(s: QSettings, spec: str) -> list[str]:
    recent = [r for r in get_list(s, "models/recent") if r != spec]
    recent.insert(0, spec)
    recent = recent[:MAX_RECENT]
    s.setValue("models/recent", recent)
    return recent
