"""The main window's actions, menus (File, Edit, Model, Run, View, Help) and tool bar."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt, QUrl
from PySide6.QtGui import QAction, QDesktopServices, QKeySequence
from PySide6.QtWidgets import QFileDialog, QMessageBox, QWidget

from .dialogs import ask_hub_id
from .settings import get_list

EMBEDDED = "default"


def action(parent: QWidget, text: str, slot: Any, shortcut: str | QKeySequence | None = None,
           tip: str = "") -> QAction:
    """A window-wide action calling ``slot``."""
    act = QAction(text, parent)
    if shortcut:
        act.setShortcut(QKeySequence(shortcut))
        act.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
    if tip:
        act.setToolTip(tip)
        act.setStatusTip(tip)
    act.triggered.connect(slot)
    return act


def versions() -> dict[str, str]:
    """The versions shown in Help > About."""
    import platform

    import numpy
    import PySide6
    import torch

    from .. import __version__

    out = {"steerdesk": __version__, "Python": platform.python_version(), "PySide6": PySide6.__version__,
           "PyTorch": torch.__version__, "NumPy": numpy.__version__}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - a core dependency
        pass
    return out


def readme_url() -> QUrl | None:
    """The README's "Steering conventions" section (the checked-out file), or None when it is not there."""
    from pathlib import Path

    local = Path(__file__).resolve().parents[2] / "README.md"
    if not local.is_file():
        return None
    url = QUrl.fromLocalFile(str(local))
    url.setFragment("steering-conventions")
    return url


def open_conventions(win: QWidget) -> None:
    """Help > Steering conventions: open the README there, or say where it is."""
    url = readme_url()
    if url is None or not QDesktopServices.openUrl(url):
        QMessageBox.information(win, "Steering conventions",
                                "See the section \"Steering conventions\" of README.md in steerdesk's source "
                                "(layer L = output of decoder block L; add, project and clamp modes; scales).")


def about_text() -> str:
    """The About box: what steerdesk is and the versions it runs with."""
    rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in versions().items())
    return ("<b>steerdesk</b>: activation steering of language models, on your desktop."
            f"<table>{rows}</table>")


def build(win: Any) -> None:
    """Create the window's actions (``win.act_*``), menus and tool bar."""
    a = lambda *args, **kw: action(win, *args, **kw)
    gp, dp, vp = win.generation_panel, win.dataset_panel, win.vector_panel
    win.act_generate = a("&Generate", lambda: gp.generate(), "Ctrl+Return",
                         "Generate steered and unsteered text (Ctrl+Enter)")
    win.act_stop = a("&Stop", lambda: win.controller.stop(), "Esc", "Stop the running job (Esc)")
    win.act_stop.setEnabled(False)
    # Ctrl+S saves from anywhere in the window: the panel's own, focus-scoped binding is removed
    # so the two do not make the shortcut ambiguous.
    dp.save_action.setShortcut(QKeySequence())
    win.act_save = a("&Save dataset", lambda: dp.save(), QKeySequence.StandardKey.Save, "Save the dataset (Ctrl+S)")
    win.act_compute = a("&Compute vectors", vp.compute_button.click, "Ctrl+K",
                        "Compute steering vectors from the dataset (Ctrl+K)")
    win.act_bake = a("&Bake steering…", lambda: win.bake(),
                     tip="Bake the generation pane's steering into a new model folder (no hooks needed to run it)")
    win.act_copy = a("Copy generated text", gp.copy_text, "Ctrl+Shift+C")
    win.act_export_heat = a("Export heatmap as PNG…", win.on_export_heatmap)
    win.act_quit = a("&Quit", win.close, QKeySequence.StandardKey.Quit)
    win.act_default_model = a("Embedded SmolLM2-135M-Instruct", lambda: win.load_model(EMBEDDED))
    win.act_hub_model = a("Hugging Face id…", lambda: win._open_model(ask_hub_id(win)))
    win.act_folder_model = a("Local folder…", lambda: win._open_model(
        QFileDialog.getExistingDirectory(win, "Open model folder")))
    win.act_gguf_model = a(".gguf file…", lambda: win._open_model(
        QFileDialog.getOpenFileName(win, "Open GGUF model", "", "GGUF models (*.gguf)")[0]))
    win.act_about = a("&About steerdesk", lambda: QMessageBox.about(win, "About steerdesk", about_text()))
    win.act_conventions = a("Steering &conventions (README)", lambda: open_conventions(win))

    menu = win.menuBar()
    docks = (win.dataset_dock, win.vector_dock, win.sweep_dock, win.analysis_dock, win.condition_dock)
    for title, actions in (
            ("&File", [win.act_save, win.act_export_heat, None, win.act_quit]),
            ("&Edit", [dp.undo_action, dp.redo_action, win.act_copy]),  # undo/redo: scoped to the table
            ("&Model", [win.act_default_model, win.act_hub_model, win.act_folder_model, win.act_gguf_model]),
            ("&Run", [win.act_compute, win.act_generate, win.act_stop, None, win.act_bake]),
            ("&View", [d.toggleViewAction() for d in docks]),
            ("&Help", [win.act_conventions, win.act_about])):
        sub = menu.addMenu(title)
        sub.setObjectName(title.replace("&", "").lower() + "Menu")
        for act in actions:
            if act is None:
                sub.addSeparator()
            else:
                sub.addAction(act)
        if title == "&Model":
            win.recent_menu = sub.addMenu("Recent")
    tb = win.addToolBar("Main")
    tb.setObjectName("mainToolbar")
    for act in (win.act_compute, win.act_generate, win.act_stop, None, win.act_save):
        if act is None:
            tb.addSeparator()
        else:
            tb.addAction(act)
    refresh_recent(win)


def refresh_recent(win: Any) -> None:
    """The Model > Recent menu from the settings."""
    win.recent_menu.clear()
    for spec in get_list(win._settings, "models/recent"):
        act = QAction(spec, win.recent_menu)
        act.triggered.connect(lambda _checked=False, sp=spec: win.load_model(sp))
        win.recent_menu.addAction(act)
    win.recent_menu.setEnabled(bool(win.recent_menu.actions()))
