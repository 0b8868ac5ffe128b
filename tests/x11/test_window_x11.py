"""The real window on a real X server (Xvfb, Qt's xcb platform): load, generate, screenshot, close.

Driven through ``steerdesk demo`` (the whole workflow unattended, then a screenshot of the
window), so that it does not depend on the window's internals. A second process grabs the X
root window while the demo runs: proof that the window was on the X server, not only rendered.
Set ``STEERDESK_X11_SHOTS=<folder>`` to keep both PNGs (CI artifacts).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from x11_helpers import SCREEN, clean_env

HERE = Path(__file__).parent
BUDGET_S = 60.0


def png_stats(path: Path) -> tuple[tuple[int, int], float, int]:
    """(width, height), grey-level standard deviation and number of distinct colours of a PNG."""
    from PySide6.QtGui import QImage

    image = QImage(str(path))
    assert not image.isNull(), f"{path} is not a readable image"
    image = image.convertToFormat(QImage.Format.Format_RGB32)
    raw = np.frombuffer(image.constBits(), np.uint8).reshape(image.height(), image.bytesPerLine())
    bgra = raw[:, : image.width() * 4].reshape(image.height(), image.width(), 4)
    rgb = bgra[..., :3].astype(np.float64)
    colours = np.unique(bgra[..., :3].reshape(-1, 3).view(np.dtype((np.void, 3)))).size
    return (image.width(), image.height()), float(rgb.mean(axis=2).std()), int(colours)


def test_real_window_under_xvfb_loads_generates_and_screenshots(xvfb: str, tiny_model_dir: Path,
                                                                  tmp_path: Path) -> None:
    from steerdesk.startup import check_display

    env = clean_env(DISPLAY=xvfb, QT_QPA_PLATFORM="xcb", STEERDESK_DATA_DIR=str(tmp_path / "data"))
    problem = check_display(env)
    assert problem is None, f"the xcb platform cannot start here: {problem}"

    window_png, root_png = tmp_path / "window.png", tmp_path / "x-root.png"
    grabber = subprocess.Popen([sys.executable, str(HERE / "grab_root.py"), str(root_png), str(BUDGET_S)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    start = time.monotonic()
    try:
        demo = subprocess.run(
            [sys.executable, "-m", "steerdesk", "demo", "--model", str(tiny_model_dir),
             "--max-new-tokens", "12", "--screenshot", str(window_png)],
            check=False, env=env, capture_output=True, text=True, timeout=2 * BUDGET_S)
        elapsed = time.monotonic() - start
        grab_out, _ = grabber.communicate(timeout=BUDGET_S)
    finally:
        if grabber.poll() is None:
            grabber.kill()

    keep = os.environ.get("STEERDESK_X11_SHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for png in (window_png, root_png):
            if png.exists():
                shutil.copy(png, Path(keep) / png.name)

    log = demo.stderr + demo.stdout
    assert demo.returncode == 0, f"demo exited {demo.returncode}:\n{log[-3000:]}"
    for step in ("model ready", "vectors ready", "generation finished", "screenshot saved"):
        assert step in log, f"demo did not report {step!r}:\n{log[-3000:]}"
    assert "Could not load the Qt platform plugin" not in log
    assert elapsed < BUDGET_S, f"the X11 demo took {elapsed:.1f} s (budget {BUDGET_S:.0f} s)"

    # What Qt rendered of the window: a laptop-sized window or larger, and not a blank one.
    size, spread, colours = png_stats(window_png)
    assert size[0] >= 1024 and size[1] >= 700, size
    assert spread > 15 and colours > 200, f"window screenshot looks blank: std {spread:.1f}, {colours} colours"

    # What the X server showed: the whole Xvfb screen, mostly covered by the window.
    assert grabber.returncode == 0, f"no window ever appeared on {xvfb}: {grab_out}"
    size, spread, colours = png_stats(root_png)
    assert size == SCREEN, size
    assert spread > 15 and colours > 200, f"X root screenshot looks blank: std {spread:.1f}, {colours} colours"
