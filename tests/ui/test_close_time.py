"""Closing the idle window ends the process within 1 s (issue 13: it took 3.2-4.2 s after the
window disappeared). Measured on the real entry point (``run_gui``) in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
import time

DRIVER = r"""
import os, sys, time
from PySide6.QtCore import QTimer
import steerdesk.ui.launch as launch
from steerdesk.ui.main_window import MainWindow

real_init = MainWindow.__init__
def init(self, *a, **k):
    real_init(self, *a, **k)
    self._confirm_close = lambda: True
    def poll():
        if self.controller.model_info is not None and not self.controller.busy:
            print("READY", flush=True)
            print(f"CLOSING {time.time():.6f}", flush=True)
            self.close()
        else:
            QTimer.singleShot(50, poll)
    QTimer.singleShot(50, poll)
MainWindow.__init__ = init
code = launch.run_gui()
sys.exit(code)
"""


def test_closing_the_idle_window_takes_at_most_a_second(tmp_path, tiny_model_dirs):
    ini = tmp_path / "settings.ini"
    ini.write_text(f"[models]\nlast={tiny_model_dirs['tiny-a']}\n")
    env = dict(os.environ, STEERDESK_SETTINGS=str(ini), STEERDESK_DATA_DIR=str(tmp_path / "data"),
               QT_QPA_PLATFORM="offscreen", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    closing = None
    for line in proc.stdout:
        if line.startswith("CLOSING"):
            closing = float(line.split()[1])
            break
    assert closing is not None, proc.stderr.read()[-2000:]
    proc.wait(timeout=60)
    took = time.time() - closing
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
    print(f"closing took {took:.2f} s")
    assert took <= 1.0, f"closing took {took:.2f} s (closing at {closing:.3f}): {proc.stderr.read()[-3000:]}"
