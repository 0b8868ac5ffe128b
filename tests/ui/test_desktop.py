"""Double-click launch: the .desktop file and icons written for the current install."""

from __future__ import annotations

import configparser
import shlex
import subprocess
import sys
from pathlib import Path


def test_install_desktop_writes_launcher_and_icons(tmp_path):
    from steerdesk.desktop import install_desktop

    written = install_desktop(str(tmp_path))
    desktop = tmp_path / "applications" / "steerdesk.desktop"
    assert desktop in written
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(desktop)
    entry = parser["Desktop Entry"]
    assert entry["Type"] == "Application" and entry["Icon"] == "steerdesk" and entry["Terminal"] == "false"
    exe = shlex.split(entry["Exec"])[0]
    assert Path(exe).is_absolute() and Path(exe).exists()
    assert (tmp_path / "icons/hicolor/scalable/apps/steerdesk.svg").is_file()
    png = tmp_path / "icons/hicolor/256x256/apps/steerdesk.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_install_desktop_cli(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "steerdesk", "install-desktop", "--prefix", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "steerdesk.desktop" in proc.stdout


def test_gui_script_entry_is_declared():
    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert "[project.gui-scripts]" in text and 'steerdesk = "steerdesk.app:main"' in text


def test_window_paints_and_exits(tmp_path):
    """`steerdesk` with no arguments opens the window (exits right after the first paint here)."""
    env = {**__import__("os").environ, "QT_QPA_PLATFORM": "offscreen", "STEERDESK_EXIT_AFTER_PAINT": "1",
           "STEERDESK_REPORT_STARTUP": "1", "STEERDESK_SETTINGS": str(tmp_path / "s.ini"),
           "STEERDESK_DATA_DIR": str(tmp_path / "d")}
    proc = subprocess.run([sys.executable, "-m", "steerdesk"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "first paint after" in proc.stderr
