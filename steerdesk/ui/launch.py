"""Start the GUI: paint the window first, then load the model in the worker thread."""

from __future__ import annotations

import os
import sys
import time

_T0 = time.perf_counter()


def make_app(argv: list[str] | None = None):
    from PySide6.QtCore import QCoreApplication
    from PySide6.QtWidgets import QApplication

    QCoreApplication.setOrganizationName("steerdesk")
    QCoreApplication.setApplicationName("steerdesk")
    app = QApplication.instance() or QApplication(argv if argv is not None else sys.argv[:1])
    app.setDesktopFileName("steerdesk")
    from .theme import apply_theme

    apply_theme(app)
    hints = app.styleHints()
    if hasattr(hints, "colorSchemeChanged"):  # follow the system when it switches light/dark
        hints.colorSchemeChanged.connect(lambda _scheme: apply_theme(app))
    return app


def run_gui() -> int:
    """Open the main window; the model loads after the first paint. Ends the process when it closes."""
    app = make_app()
    from PySide6.QtCore import QTimer

    from .main_window import MainWindow

    window = MainWindow()
    from .excepthook import install_excepthook

    install_excepthook(window)  # an exception lost in a slot becomes a dialog (and a log line)
    window.show()
    app.processEvents()  # paint now, before anything heavy is queued

    def after_paint() -> None:
        if os.environ.get("STEERDESK_REPORT_STARTUP"):
            print(f"first paint after {time.perf_counter() - _T0:.3f} s", file=sys.stderr, flush=True)
        if os.environ.get("STEERDESK_EXIT_AFTER_PAINT"):  # startup benchmarks
            window._closing = True
            window.close()
            app.quit()
            return
        window.start()

    QTimer.singleShot(0, after_paint)
    code = app.exec()
    # Settings are synced, dataset edits saved or discarded (the close prompt) and the recovery
    # copy written or cleared. Leave now: Python's finalisation would spend 3-4 s tearing down
    # torch and the model after the window is gone (issue 13), and while a model load cannot be
    # interrupted, Qt would abort on a QThread destroyed while running.
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code))
