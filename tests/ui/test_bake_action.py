"""Run > Bake steering… (issue 13): the generation pane's steering baked into a folder through the
controller with progress, the result shown; a steering that cannot be baked is one clear message."""

from __future__ import annotations

import json
import os
import stat

from test_window import compute, load


def test_bake_the_panes_steering_with_progress_and_a_result(qtbot, window, tiny_model_dirs, tmp_path):
    load(qtbot, window, tiny_model_dirs["tiny-a"])
    compute(qtbot, window)
    gp = window.generation_panel
    gp.set_layers([1, 2])
    gp.set_scale(2.0)
    assert "Bake steering…" in [a.text().replace("&", "") for a in window.menuBar().actions()[3].menu().actions()]
    out = tmp_path / "baked"
    progress = []
    old_mask = os.umask(0o002)
    try:
        with qtbot.waitSignal(window.baker.done, timeout=120000) as done:
            job = window.baker.start(str(out))
            assert job is not None and window.baker.progress is not None  # a progress dialog while it runs
            job.progress.connect(lambda d, t, m: progress.append((d, t, m)))
    finally:
        os.umask(old_mask)
    # The folder and its files respect the umask (not mkdtemp's 0700 / mkstemp's 0600).
    assert stat.S_IMODE(out.stat().st_mode) == 0o775
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir() if p.is_file()} == {"0o664"}
    result = done.args[0]
    assert progress and all(t >= d for d, t, _ in progress)
    assert (out / "config.json").is_file() and (out / "steerdesk_bake.json").is_file()
    meta = json.loads((out / "steerdesk_bake.json").read_text())
    assert meta["layers"] == [1, 2] and meta["scale"] == 2.0  # the pane's steering, written into the folder
    assert [(st["layer"], st["mode"]) for st in meta["steers"]] == [(1, "add"), (2, "add")]
    assert tuple(result.plan.layers) == (1, 2)
    assert window.baker.result_box is not None and "Baked" in window.baker.result_box.text()
    assert window.baker.progress is None  # closed
    assert "Baked into" in window.statusBar().currentMessage()


def test_a_steering_that_cannot_be_baked_is_one_clear_message(qtbot, window, tiny_model_dirs, tmp_path):
    load(qtbot, window, tiny_model_dirs["tiny-a"])
    compute(qtbot, window)
    gp = window.generation_panel
    gp.mode.setCurrentIndex(gp.mode.findData("clamp"))
    with qtbot.waitSignal(window.controller.failed, timeout=60000) as failed:
        window.baker.start(str(tmp_path / "never"))
    err = failed.args[0]
    assert err.title == "Could not bake the checkpoint" and "clamp" in err.message
    assert "\n" not in err.message.strip() and not (tmp_path / "never").exists()
    assert window._dialogs[-1].text() == err.message or err.message in window._dialogs[-1].text()
    # Nothing to bake: refused before any folder is asked for.
    gp.vector.setCurrentIndex(0)  # unsteered
    errors = []
    window.baker.error_occurred.connect(lambda title, msg: errors.append((title, msg)))
    assert window.baker.start() is None
    assert errors and errors[0][0] == "Nothing to bake" and "vector set and layers" in errors[0][1]
