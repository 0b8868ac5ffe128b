"""``steerdesk demo --screenshot OUT.png``: the whole workflow, unattended, then a screenshot."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

DEMO_PROMPT = "What should I cook for dinner tonight?"
DEMO_LAYERS = [14]
DEMO_SCALE = 0.8


def run_demo(screenshot: str | None, *, model: str = "default", timeout_s: float = 900.0,
             max_new_tokens: int = 48) -> int:
    """Load the model, open the bundled rude set, compute, generate a comparison, screenshot, exit."""
    import os

    scratch = Path(tempfile.mkdtemp(prefix="steerdesk-demo-"))
    os.environ["STEERDESK_SETTINGS"] = str(scratch / "settings.ini")  # never the user's settings
    from PySide6.QtCore import QTimer

    from .launch import make_app
    from .main_window import MainWindow
    from .recovery import RecoveryStore

    app = make_app()
    window = MainWindow(recovery=RecoveryStore(scratch))
    window.show()
    window.resize(1600, 1000)
    outcome: dict[str, Any] = {"code": 1}

    def fail(error: Any) -> None:
        print(f"demo failed: {getattr(error, 'message', error)}", file=sys.stderr)
        outcome["code"] = 1
        app.exit(1)

    def model_ready(info: Any) -> None:
        print(f"model ready: {info.name} ({info.num_layers} layers)", file=sys.stderr)
        vp = window.vector_panel
        vp.method.setCurrentIndex(vp.method.findData("mean-diff"))
        vp.read.setCurrentIndex(vp.read.findData("last"))
        vp.batch.setValue(16)
        vp.name_edit.setText("neutral_rude")
        vp.compute()

    def vectors_ready(item: Any) -> None:
        print("vectors ready", file=sys.stderr)
        vs = item.vectors
        gp = window.generation_panel
        gp.prompt.setPlainText(DEMO_PROMPT)
        gp.set_layers([layer for layer in DEMO_LAYERS if layer < vs.num_layers] or [vs.num_layers // 2])
        gp.set_scale(DEMO_SCALE)
        gp.temperature.setValue(0.0)
        gp.max_tokens.setValue(max_new_tokens)
        gp.color_by.setChecked(True)
        gp.color_layer.setValue(gp.selected_layers()[0])
        gp.generate()

    def generated(result: Any) -> None:
        print("generation finished", file=sys.stderr)
        QTimer.singleShot(300, shoot)

    def shoot() -> None:
        if screenshot:
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            ok = window.grab().save(screenshot)
            print(f"screenshot {'saved to ' + screenshot if ok else 'FAILED'}", file=sys.stderr)
            outcome["code"] = 0 if ok else 1
        else:
            outcome["code"] = 0
        window._closing = True  # the demo's dataset is bundled: nothing to ask about
        window.close()
        app.exit(outcome["code"])

    c = window.controller
    c.model_ready.connect(model_ready)
    window.vector_panel.vectors_ready.connect(vectors_ready)
    window.generation_panel.finished.connect(generated)
    c.failed.connect(fail)
    window.dataset_panel.load_bundled("neutral_rude")
    QTimer.singleShot(0, lambda: window.load_model(model))
    QTimer.singleShot(int(timeout_s * 1000), lambda: fail("timed out"))
    app.exec()
    if not window._closing:
        window._closing = True
        window.close()
    return int(outcome["code"])
