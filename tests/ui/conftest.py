"""Qt test setup for the UI tests: offscreen platform, set before any QApplication exists."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def _pin_singletons_if_pyside_drops_references() -> None:
    """Work around a reference-count bug of PySide6 6.12.0 on CPython < 3.12.

    There every call of a void Qt method drops a reference to ``None`` and every
    ``Signal.emit()`` one to ``True`` (3.12+ makes both immortal, which hides it; 6.11.3 is
    fine). After a few thousand calls the interpreter aborts with "none_dealloc" or
    "bool_dealloc", in a test run usually at exit (rc 134). The real fix is pinning PySide6
    below 6.12 for the app; the test process only guards its own exit. Detected by behaviour,
    so it does nothing on a PySide6 without the bug.
    """
    if sys.version_info >= (3, 12) or sys.implementation.name != "cpython":
        return
    from PySide6.QtCore import QObject

    probe = QObject()
    before = sys.getrefcount(None)
    for _ in range(20):
        probe.setObjectName("probe")
    if sys.getrefcount(None) >= before - 10:
        return
    import ctypes

    for obj in (None, True, False):
        ctypes.c_ssize_t.from_address(id(obj)).value += 1 << 40  # ob_refcnt: effectively immortal


_pin_singletons_if_pyside_drops_references()


# ----------------------------------------------------------------------------- window fixtures
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, smol_folder):
    """Two tiny random Llama models saved as HF folders (different hidden sizes), SmolLM2 tokenizer.

    The real worker loads them by path exactly as it would load any local model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(str(smol_folder))
    dirs = {}
    for name, hidden, layers in (("tiny-a", 64, 4), ("tiny-b", 32, 3)):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        model = AutoModelForCausalLM.from_config(config)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        dirs[name] = str(folder)
    return dirs


@pytest.fixture
def window(qtbot, tmp_path, monkeypatch):
    """A main window with its own settings and recovery folder; its thread is stopped at teardown."""
    monkeypatch.setenv("STEERDESK_SETTINGS", str(tmp_path / "settings.ini"))
    monkeypatch.setenv("STEERDESK_DATA_DIR", str(tmp_path / "data"))
    from steerdesk.ui.main_window import MainWindow
    from steerdesk.ui.recovery import RecoveryStore

    win = MainWindow(recovery=RecoveryStore(tmp_path / "data"))
    win._confirm_close = lambda: True  # no modal question in tests
    qtbot.addWidget(win)
    win.show()
    yield win
    win.controller.shutdown(5000)
    qtbot.waitUntil(win.controller.thread.isFinished, timeout=10000)
    _destroy_now(win)


def _destroy_now(win) -> None:
    """Delete the window and its dialogs now, inside this test, and collect what is left.

    Left to pytest-qt, the deferred delete of a closed window runs in the NEXT test's event loop,
    while that test's new window is being activated; twice in ~12 whole-folder runs the process
    then died in Qt's active-window change (QApplicationPrivate::notifyActiveWindowChange ->
    QWidgetPrivate::windowHandle on a freed widget; core dump, issue 13). Here the old window is
    gone, its events handled and its Python cycles collected before the next test starts.
    """
    import gc

    from PySide6.QtCore import QCoreApplication, QEvent
    from PySide6.QtWidgets import QApplication

    for d in getattr(win, "_dialogs", []):
        try:
            d.close()
        except RuntimeError:  # already deleted with its parent
            pass
    win.close()
    win.deleteLater()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    QApplication.processEvents()
    gc.collect()
    QApplication.processEvents()
