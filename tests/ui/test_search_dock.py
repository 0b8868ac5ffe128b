"""The Search dock in the window (issue 16): a search on the window's vector set and held-out pairs,
then a clicked Pareto point loads its settings into the generation pane."""

from __future__ import annotations

from test_window import compute, load


def test_window_search_runs_on_its_inputs_and_a_point_loads_into_the_generation_pane(
        qtbot, window, tiny_model_dirs, tmp_path):
    load(qtbot, window, tiny_model_dirs["tiny-a"])
    compute(qtbot, window)
    panel, gp = window.search_panel, window.generation_panel
    assert window.search_dock.widget() is not None
    errors = []
    window.search_panel.error_occurred.connect(lambda title, msg: errors.append(msg))
    panel.study.setText(str(tmp_path / "window.db"))
    panel.trials_spin.setValue(3)
    panel.batch_spin.setValue(3)
    with qtbot.waitSignal(window.controller.finished, timeout=180000):
        panel.start()
    assert not errors, errors
    points = panel.points()
    assert len(points) == 3
    n = points[0]["trial"]
    chosen = []
    panel.settings_chosen.connect(chosen.append)
    with qtbot.waitSignal(gp.finished, timeout=60000):
        panel.choose(n)
    d = chosen[0]
    assert gp.selected_layers() == list(d["layers"])
    assert gp.mode.currentData() == d["mode"] and gp.normalize.isChecked() == d["normalize"]
    assert abs(gp.scale.value() - d["scale"]) < 1e-2


def test_window_search_without_vectors_says_so(qtbot, window, tiny_model_dirs, tmp_path):
    load(qtbot, window, tiny_model_dirs["tiny-a"])
    errors = []
    window.search_panel.error_occurred.connect(lambda title, msg: errors.append(msg))
    window.search_panel.study.setText(str(tmp_path / "window.db"))
    window.search_panel.start()
    assert errors and "vector set" in errors[0].lower()
    assert not (tmp_path / "window.db").exists()
