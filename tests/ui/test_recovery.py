"""Crash recovery of unsaved dataset edits: autosave, clearing, and a real killed process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from steerdesk.core.datasets import Dataset, Example, load_dataset, save_dataset
from steerdesk.ui import recovery as recovery_mod
from steerdesk.ui.panels.dataset_panel import DatasetPanel
from steerdesk.ui.recovery import FILE_NAME, RecoveryStore

REPO = Path(__file__).resolve().parents[2]
ROWS = [Example("p1", "b1", "t1"), Example("p2", "b2", "t2"), Example("p3", "b3", "t3")]


@pytest.fixture
def original(tmp_path) -> Path:
    path = tmp_path / "work" / "pairs.jsonl"
    path.parent.mkdir()
    save_dataset(Dataset(list(ROWS), name="pairs"), path)
    return path


def make_panel(qtbot, folder: Path) -> DatasetPanel:
    panel = DatasetPanel(recovery=RecoveryStore(folder))
    qtbot.addWidget(panel)
    return panel


def test_default_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("STEERDESK_DATA_DIR", str(tmp_path / "data"))
    assert RecoveryStore().folder == tmp_path / "data"
    monkeypatch.delenv("STEERDESK_DATA_DIR")
    import platformdirs

    assert RecoveryStore().folder == Path(platformdirs.user_data_dir("steerdesk", appauthor=False))


def test_autosave_after_edit_and_cleared_on_save(qtbot, tmp_path, original):
    folder = tmp_path / "recovery"
    panel = make_panel(qtbot, folder)
    panel.load_file(original)
    file = folder / FILE_NAME
    panel.model().setData(panel.model().index(0, 1), "edited")
    assert not file.exists()  # not at once: a second after the last change
    started = time.monotonic()
    qtbot.waitUntil(file.exists, timeout=3000)
    assert time.monotonic() - started < 2.0

    lines = file.read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0])
    assert header["path"] == str(original) and header["pid"] == os.getpid() and header["rows"] == 3
    assert json.loads(lines[1])["base"] == "edited"

    assert panel.save()
    assert not file.exists()

    # Undoing back to the saved state clears the copy too (nothing left to recover).
    panel.model().setData(panel.model().index(1, 1), "again")
    qtbot.waitUntil(file.exists, timeout=3000)
    panel.undo_stack().undo()
    qtbot.waitUntil(lambda: not file.exists(), timeout=3000)

    panel.model().setData(panel.model().index(1, 1), "and again")
    qtbot.waitUntil(file.exists, timeout=3000)
    panel.discard_recovery()  # a clean close
    assert not file.exists()


def test_declined_recovery_is_discarded(qtbot, tmp_path, original):
    folder = tmp_path / "recovery"
    RecoveryStore(folder).save(Dataset([Example("", "x", "y")], name="lost"), str(original))
    panel = make_panel(qtbot, folder)
    asked = []
    panel._ask_recover = lambda parent, when, header: asked.append((when, header)) or False
    assert panel.offer_recovery(panel) is False
    assert asked and asked[0][1]["name"] == "lost"
    assert not (folder / FILE_NAME).exists()
    assert len(panel.dataset()) == 0
    assert panel.offer_recovery() is False  # nothing left: not asked again
    assert len(asked) == 1


def test_files_of_running_instances_are_left_alone(tmp_path, monkeypatch):
    folder = tmp_path / "recovery"
    folder.mkdir()
    other_pid = os.getppid()  # a live process that is not us
    header = {"steerdesk_recovery": 1, "path": None, "name": "theirs", "paired": True, "rows": 1,
              "saved_at": time.time(), "pid": other_pid}
    theirs = folder / FILE_NAME
    theirs.write_text(json.dumps(header) + "\n" + json.dumps({"base": "a", "target": "b"}) + "\n", encoding="utf-8")
    (folder / "dataset-recovery-1.jsonl").write_text("not json\n", encoding="utf-8")  # unreadable: skipped

    store = RecoveryStore(folder)
    assert store.pending() is None  # theirs is still running
    assert store.path == folder / f"dataset-recovery-{os.getpid()}.jsonl"  # we do not overwrite theirs
    store.save(Dataset([Example("", "mine", "mine")]), None)
    store.clear()
    assert theirs.exists() and not store.path.exists()

    monkeypatch.setattr(recovery_mod, "_pid_alive", lambda pid: False)  # now they crashed
    found = store.pending()
    assert found is not None and found[0].examples == [Example("", "a", "b")] and found[1]["file"] == str(theirs)


CHILD = textwrap.dedent(
    """
    import os, sys, time
    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    app = QApplication([])
    from steerdesk.core.datasets import Example
    from steerdesk.ui.panels.dataset_panel import DatasetPanel
    from steerdesk.ui.recovery import RecoveryStore

    folder, original = sys.argv[1], sys.argv[2]
    panel = DatasetPanel(recovery=RecoveryStore(folder))
    assert panel.load_file(original)
    m = panel.model()
    m.setData(m.index(0, 1), "edited base, ünïcode\\nand a second line")
    m.remove_rows([1])
    m.insert_examples(m.rowCount(), [Example("new prompt", "new base", 'new "target"\\ttab')])
    recovery_file = os.path.join(folder, "dataset-recovery.jsonl")
    deadline = time.monotonic() + 20

    def poll():
        if os.path.exists(recovery_file):
            print("AUTOSAVED", flush=True)
            time.sleep(60)  # "still working" until the test kills us
        if time.monotonic() > deadline:
            print("NO AUTOSAVE", flush=True)
            app.exit(3)
        QTimer.singleShot(25, poll)

    poll()
    sys.exit(app.exec())
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_edits_survive_sigkill(qtbot, tmp_path, original):
    folder = tmp_path / "recovery"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               QT_QPA_PLATFORM="offscreen")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(original)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()  # the child prints once its autosave file exists
        stderr = proc.stderr.read() if proc.poll() is not None else ""
        assert line == "AUTOSAVED", f"child said {line!r}; stderr: {stderr}"
        assert (folder / FILE_NAME).exists()
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()

    expected = [Example("p1", "edited base, ünïcode\nand a second line", "t1"), ROWS[2],
                Example("new prompt", "new base", 'new "target"\ttab')]
    panel = make_panel(qtbot, folder)
    asked = []
    panel._ask_recover = lambda parent, when, header: asked.append(when) or True
    modified = []
    panel.modified_changed.connect(modified.append)
    assert panel.offer_recovery(panel) is True
    assert len(asked) == 1
    assert panel.dataset().examples == expected
    assert panel.is_modified() and modified == [True]
    assert panel.current_path() == str(original)  # Save goes back to the file that was being edited
    assert not (folder / FILE_NAME).exists()  # the dead process's copy is dealt with

    assert panel.save()
    assert load_dataset(original).examples == expected
    assert list(folder.glob("dataset-recovery*")) == []
