"""Package data lookup that works from a source tree, an installed wheel and a PyInstaller bundle."""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path


def asset_path(*parts: str) -> Path:
    """Filesystem path of ``steerdesk/assets/<parts>``."""
    base = getattr(sys, "_MEIPASS", None)
    if base:
        frozen = Path(base) / "steerdesk" / "assets" / Path(*parts)
        if frozen.exists():
            return frozen
    return Path(str(resources.files("steerdesk").joinpath("assets", *parts)))


def icon_path() -> Path:
    return asset_path("icons", "steerdesk.svg")
