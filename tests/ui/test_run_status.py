"""Run status that tells the truth (issue 13): elapsed time and tokens/s while and after a
generation; a stopped run gets every view a finished one has; no stale hover read-out."""

from __future__ import annotations

import numpy as np
import pytest
from PySide6.QtCore import Qt


@pytest.fixture
def ready(qtbot, window, tiny_model_dirs):
    with qtbot.waitSignal(window.controller.model_ready, timeout=60000):
        window.load_model(tiny_model_dirs["tiny-a"])
    window.dataset_panel.load_bundled("neutral_rude")
    with qtbot.waitSignal(window.vector_panel.vectors_ready, timeout=60000):
        qtbot.mouseClick(window.vector_panel.compute_button, Qt.MouseButton.LeftButton)
    return window


def test_elapsed_and_tokens_per_second_while_and_after(qtbot, ready):
    gp = ready.generation_panel
    gp.max_tokens.setValue(400)
    during = []
    gp.output.heatmap.readout.setText("token 3 'x', layer 1: +0.5 of typical |h|")  # from an earlier run
    qtbot.mouseClick(gp.generate_button, Qt.MouseButton.LeftButton)
    assert gp.output.heatmap.readout.text().strip() == ""  # cleared when the new run starts
    qtbot.waitUntil(lambda: during.append(gp.output.stats.text()) or "tokens/s" in during[-1], timeout=30000)
    assert during[-1].startswith("running · ") and " s · " in during[-1] and "tokens x 2 rows" in during[-1]
    with qtbot.waitSignal(gp.finished, timeout=120000) as done:
        pass
    result = done.args[0]
    n = max(len(r.token_ids) for r in result.rows)
    text = gp.output.stats.text()
    assert text.startswith(f"done · {n} tokens x 2 rows in {result.seconds:.2f} s · ")
    assert float(text.split(" · ")[-1].split()[0]) == pytest.approx(2 * n / result.seconds, rel=0.05)
    assert "tokens/s" in ready.statusBar().currentMessage()


def test_a_stopped_run_gets_the_views_of_a_finished_one(qtbot, ready):
    gp = ready.generation_panel
    gp.max_tokens.setValue(2000)
    qtbot.mouseClick(gp.generate_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: gp.output.heatmap.data().shape[1] > 3, timeout=30000)
    with qtbot.waitSignal(ready.controller.job_cancelled, timeout=5000):
        qtbot.mouseClick(gp.stop_button, Qt.MouseButton.LeftButton)
    qtbot.wait(100)
    out = gp.output
    assert out.stats.text().startswith("stopped · ") and "tokens/s" in out.stats.text()
    assert out._results is not None and out._results[1].finish_reason == "stopped"
    n = len(out._results[1].token_ids)
    assert n > 3 and out.heatmap.data().shape[1] == n and np.isfinite(out.heatmap.data()).all()
    # Colour by projection works on the stopped run, token for token.
    gp.color_by.setChecked(True)
    html = gp.steered_view.toHtml()
    assert html.count("background-color:rgba") >= n - 1
    # The hover read-out names the cell's token.
    assert out.heatmap.describe_cell(0, 1).startswith("token 1 ")
    assert "stopped" in ready.statusBar().currentMessage().lower()


def test_a_stopped_grid_keeps_and_exports_its_rows(qtbot, ready, tmp_path):
    ap = ready.analysis_panel
    grid = ap.grid
    grid.layers.setText("1,2")
    grid.scales.setText("0.5,1,2,4")
    grid.tokens.setValue(40)
    with qtbot.waitSignal(ready.controller.job_cancelled, timeout=60000):
        ap.run_grid()
        qtbot.waitUntil(lambda: len(grid.rows) >= 1, timeout=60000)
        ready.controller.stop()
    qtbot.wait(100)
    kept = len(grid.rows)
    assert kept >= 1 and grid.table.rowCount() == kept  # (rows of a batch arrive together)
    assert grid.export_button.isEnabled()  # as after a finished grid
    grid.export_to(str(tmp_path / "grid.csv"))
    import csv

    with open(tmp_path / "grid.csv", newline="", encoding="utf-8") as f:
        assert len(list(csv.reader(f))) == kept + 1


def test_the_compute_bar_says_done_not_the_last_step(ready):
    bar = ready.vector_panel.progress
    name = ready.vector_panel.current().name
    assert bar.text().startswith(f"Done: {name}") and "Extracting" not in bar.text()


def test_the_running_rate_counts_what_the_final_one_counts(window):
    """Compare on: 10 steps in 2 s are 10 tokens x 2 rows, 10 tokens/s, while running as at the end
    (the running line used to count one row, so the rate doubled when the run ended)."""
    import time

    out = window.generation_panel.output
    out._compare, out._steps, out._t0 = True, [None] * 10, time.perf_counter() - 2.0
    out._tick()
    parts = out.stats.text().split(" · ")
    assert parts[2] == "10 tokens x 2 rows" and float(parts[3].split()[0]) == pytest.approx(10.0, rel=0.02)
    out._compare = False
    out._tick()
    parts = out.stats.text().split(" · ")
    assert parts[2] == "10 tokens" and float(parts[3].split()[0]) == pytest.approx(5.0, rel=0.02)
    out._clock.stop()
