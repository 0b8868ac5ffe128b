"""Helper run by test_window_x11 under ``QT_QPA_PLATFORM=xcb``: screenshot the X root window.

``python grab_root.py OUT.png TIMEOUT_S`` polls the root window of ``$DISPLAY`` (what the X
server itself shows, not what Qt renders for a widget) until a window covers most of it, keeps
the last such frame while it stays, and writes it when the window goes away or at the timeout.
Exit 0 if a frame was written, 1 if the screen never showed a window.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from PySide6.QtGui import QGuiApplication, QImage


def covered_fraction(image: QImage) -> float:
    """Fraction of pixels that are not the empty Xvfb root's black."""
    image = image.convertToFormat(QImage.Format.Format_RGB32)
    pixels = np.frombuffer(image.constBits(), np.uint8).reshape(image.height(), image.bytesPerLine())
    rgb = pixels[:, : image.width() * 4].reshape(image.height(), image.width(), 4)[..., :3]
    return float((rgb.max(axis=2) > 0).mean())


def main(out: str, timeout_s: float) -> int:
    app = QGuiApplication(sys.argv[:1])
    screen = app.primaryScreen()
    last = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        frame = screen.grabWindow(0).toImage()
        if covered_fraction(frame) > 0.5:
            last = frame
        elif last is not None:
            break  # the window was shown and is gone now
        time.sleep(0.25)
    if last is None:
        return 1
    return 0 if last.save(out) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], float(sys.argv[2])))
