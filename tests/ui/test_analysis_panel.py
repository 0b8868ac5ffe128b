"""Analysis dock: diagnostics, prompt vs vector, generation grid and run history, through the window."""

from __future__ import annotations

import json

from PySide6.QtCore import Qt
from test_window import compute, generate, load


def run_task(qtbot, window, button, name):
    with qtbot.waitSignal(window.controller.finished, timeout=120000,
                          check_params_cb=lambda n, _r: n == name) as blocker:
        qtbot.mouseClick(button, Qt.MouseButton.LeftButton)
    return blocker.args[1]


def test_diagnostics_versus_grid_and_history(qtbot, window, tiny_model_dirs, tmp_path):
    load(qtbot, window, tiny_model_dirs["tiny-a"])
    compute(qtbot, window)
    ap = window.analysis_panel

    d = run_task(qtbot, window, ap.diagnostics.run_button, "diagnose")
    assert len(d.auc) == 4 and ap.diagnostics.table.rowCount() == 4
    assert ap.diagnostics.cosine.data().shape == (4, 4)

    window.generation_panel.max_tokens.setValue(6)
    v = run_task(qtbot, window, ap.versus.run_button, "versus")
    assert [c.name for c in v.conditions] == ["unsteered", "prompt", "vector", "both"]
    assert "margin" in ap.versus.views["both"][0].text()

    ap.grid.layers.setText("1,3")
    ap.grid.scales.setText("1,2")
    ap.grid.tokens.setValue(4)
    rows = run_task(qtbot, window, ap.grid.run_button, "grid")
    assert len(rows) == 2 + 2 * 2 * 2 and ap.grid.table.rowCount() == len(rows)
    out = tmp_path / "grid.csv"
    ap.grid.export_to(str(out))
    assert out.read_text().startswith("layer,scale,prompt,text,matches")

    results = generate(qtbot, window, tokens=5)
    qtbot.waitUntil(lambda: any(r.kind == "generate" for r in ap.history.records), timeout=10000)
    kinds = [r.kind for r in ap.history.records]
    assert "compute" in kinds and "generate" in kinds
    assert {"diagnose", "versus", "grid"} <= set(kinds)  # the analysis jobs are recorded too
    assert all(r.seconds > 0 for r in ap.history.records)  # with the real duration, never 0.0
    recipe = tmp_path / "recipe.json"
    last_generate = len(kinds) - 1 - kinds[::-1].index("generate")
    ap.history.export_to(str(recipe), row=last_generate)
    saved = json.loads(recipe.read_text())
    assert saved["kind"] == "generate"
    assert [r["token_ids"] for r in saved["outputs"]["rows"]] == [r.token_ids for r in results]
    # the exported recipe re-runs to the same greedy tokens (loading the recorded model folder)
    from steerdesk.core.records import RunRecord
    from steerdesk.jobs.rerun import rerun

    again = rerun(RunRecord.load(recipe))
    assert again.reproduced, again.differences
