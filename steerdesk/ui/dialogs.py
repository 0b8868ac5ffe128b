"""Small dialogs: errors with expandable details, model picking."""

from __future__ import annotations

from PySide6.QtWidgets import QInputDialog, QMessageBox, QWidget

from .requests import ErrorInfo


def show_error(parent: QWidget | None, error: ErrorInfo) -> QMessageBox:
    """A non-blocking error box: the sentence, with the traceback under 'Show Details'."""
    box = QMessageBox(QMessageBox.Icon.Warning if error.user_error else QMessageBox.Icon.Critical,
                      error.title, error.message, QMessageBox.StandardButton.Ok, parent)
    box.setObjectName("errorDialog")
    if error.details:
        box.setDetailedText(error.details)
    box.setModal(False)
    box.show()
    return box


def ask_hub_id(parent: QWidget | None) -> str:
    text, ok = QInputDialog.getText(parent, "Open Hugging Face model",
                                    "Model id (e.g. microsoft/Phi-3-mini-4k-instruct):")
    return text.strip() if ok else ""
