"""Freedesktop launcher installation for the current install (package or frozen binary)."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

from .core.fileio import atomic_write_text


def launcher_command() -> str:
    """The absolute command that starts this steerdesk (binary, gui-script, or python -m)."""
    if getattr(sys, "frozen", False):
        return shlex.quote(str(Path(sys.executable).resolve()))
    script = shutil.which("steerdesk")
    scripts_dir = Path(sys.executable).parent
    local = scripts_dir / "steerdesk"
    if local.exists():
        return shlex.quote(str(local.resolve()))
    if script:
        return shlex.quote(str(Path(script).resolve()))
    return f"{shlex.quote(str(Path(sys.executable).resolve()))} -m steerdesk"


def desktop_template() -> str:
    from .ui.resources import asset_path

    return asset_path("steerdesk.desktop.in").read_text(encoding="utf-8")


def install_desktop(prefix: str | None = None) -> list[Path]:
    """Write ``applications/steerdesk.desktop`` and hicolor icons under ``prefix``."""
    from .ui.resources import icon_path

    data = Path(prefix) if prefix else Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    apps = data / "applications"
    apps.mkdir(parents=True, exist_ok=True)
    desktop = apps / "steerdesk.desktop"
    atomic_write_text(desktop, desktop_template().replace("@EXEC@", launcher_command()))
    written = [desktop]
    svg_dir = data / "icons" / "hicolor" / "scalable" / "apps"
    svg_dir.mkdir(parents=True, exist_ok=True)
    svg = svg_dir / "steerdesk.svg"
    shutil.copyfile(icon_path(), svg)
    written.append(svg)
    for size in (48, 128, 256):
        png = data / "icons" / "hicolor" / f"{size}x{size}" / "apps" / "steerdesk.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        if _render_png(icon_path(), png, size):
            written.append(png)
    return written


def _render_png(svg: Path, out: Path, size: int) -> bool:
    """Render the SVG icon to PNG with Qt (no GUI needed)."""
    try:
        from PySide6.QtCore import Qt
        from PySide6.QtGui import QGuiApplication, QImage, QPainter
        from PySide6.QtSvg import QSvgRenderer
    except ImportError:
        return False
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    _app = QGuiApplication.instance() or QGuiApplication([])
    image = QImage(size, size, QImage.Format.Format_ARGB32)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    QSvgRenderer(str(svg)).render(painter)
    painter.end()
    return image.save(str(out))
