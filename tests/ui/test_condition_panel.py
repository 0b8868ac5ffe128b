"""The calibration view (issue 15, item 3), driven as a user would: calibrate on the bundled cooking
set through the window's worker, drag the threshold line, the confusion counts follow (checked
against an independent count from the scores), 'Use this gate' fills the generation pane."""

from __future__ import annotations

import pytest
from PySide6.QtCore import QPoint, QPointF, Qt
from PySide6.QtTest import QTest
from test_layout import clipped
from test_window import ARTIFACTS, ready  # noqa: F401  (ready: a fixture)


def count(scores, labels, threshold, side):
    """TP, FP, FN, TN by hand: one prompt at a time."""
    tp = fp = fn = tn = 0
    for s, y in zip(scores, labels):
        opens = s > threshold if side == "above" else s < threshold
        if opens and y:
            tp += 1
        elif opens:
            fp += 1
        elif y:
            fn += 1
        else:
            tn += 1
    return tp, fp, fn, tn


def drag_line(qtbot, panel, to_value):
    """Press on the threshold line, move, release at ``to_value`` (data coordinates), as a mouse does."""
    qtbot.wait(50)  # the plot applies its new ranges when it paints: map pixels after that
    vb = panel.plot.getViewBox()
    view = panel.plot.viewport()
    y = sum(vb.viewRange()[1]) / 2

    def at(x):
        p = panel.plot.mapFromScene(vb.mapViewToScene(QPointF(x, y)))
        return QPoint(int(round(p.x())), int(round(p.y())))

    # pyqtgraph drops mouse moves closer than its rate limit (100 Hz): a hand's pace, 30 ms apart
    start, end = at(panel.line.value()), at(to_value)
    QTest.mouseMove(view, start - QPoint(6, 0))  # the pointer comes onto the line (it takes drags it is hovered by)
    qtbot.wait(30)
    QTest.mouseMove(view, start)
    qtbot.wait(30)
    QTest.mousePress(view, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, start)
    qtbot.wait(30)
    for i in range(1, 11):
        QTest.mouseMove(view, start + (end - start) * (i / 10))
        qtbot.wait(30)
    QTest.mouseRelease(view, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, end)
    qtbot.wait(30)


def calibrate(qtbot, win):
    panel = win.condition_panel
    win.condition_dock.raise_()
    assert panel.dataset.findText("cooking") >= 0  # offered once a model is loaded
    panel.dataset.setCurrentText("cooking")
    errors = []
    panel.error_occurred.connect(lambda title, msg: errors.append(msg))
    with qtbot.waitSignal(panel.finished, timeout=120000) as blocker:
        qtbot.mouseClick(panel.calibrate_button, Qt.MouseButton.LeftButton)
    assert not errors, errors
    return panel, blocker.args[0]


def test_histogram_counts_follow_the_dragged_threshold(qtbot, ready):  # noqa: F811
    panel, result = calibrate(qtbot, ready)
    cal = result.calibration
    assert result.computed and result.num_prompts == 64
    assert panel.current_layer() == cal.layer  # the best layer is shown first
    row = cal.layers.index(cal.layer)
    scores, labels = cal.scores[row].tolist(), cal.labels.tolist()

    # at the calibrated point the view agrees with core's F1
    assert panel.threshold_value() == pytest.approx(cal.threshold, abs=1e-6)
    assert panel.side.currentData() == cal.side
    tp, fp, fn, tn = count(scores, labels, panel.threshold_value(), cal.side)
    assert panel.confusion_now() == (tp, fp, fn, tn)
    f1 = 2 * tp / (2 * tp + fp + fn)
    assert f1 == pytest.approx(cal.f1, abs=1e-6)
    assert f"F1 {cal.f1:.3f}" in panel.counts.text()

    # the two histograms hold every prompt once
    assert sum(panel.pos_curve.getData()[1]) == sum(labels)
    assert sum(panel.neg_curve.getData()[1]) == len(labels) - sum(labels)

    # drag the line to the middle of the scores: the counts follow, live
    lo, hi = min(scores), max(scores)
    target = lo + 0.4 * (hi - lo)
    seen = []
    panel.line.sigPositionChanged.connect(lambda *_: seen.append(panel.counts.text()))
    drag_line(qtbot, panel, target)
    assert len(seen) >= 5, "the counts change while dragging, not only at the end"
    assert len(set(seen)) > 1, seen
    dragged = panel.threshold_value()
    assert dragged == pytest.approx(target, abs=(hi - lo) * 0.05)  # where the mouse let go (pixel rounding)
    assert panel.threshold.value() == pytest.approx(dragged, abs=1e-4)
    for side in ("above", "below"):
        panel.side.setCurrentIndex(panel.side.findData(side))
        tp, fp, fn, tn = count(scores, labels, dragged, side)
        assert panel.confusion_now() == (tp, fp, fn, tn)
        assert f"TP {tp}   FP {fp}   FN {fn}   TN {tn}" in panel.counts.text()
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        assert f"precision {p:.3f}   recall {r:.3f}" in panel.counts.text()

    # typing a threshold moves the line too
    panel.threshold.setValue(round(lo + 0.7 * (hi - lo), 4))
    assert panel.line.value() == pytest.approx(panel.threshold.value())
    assert panel.confusion_now() == count(scores, labels, panel.threshold.value(), panel.side.currentData())

    # another layer: its histogram and its own best point from the table
    other = next(layer for layer in cal.layers if layer != cal.layer)
    panel.layer.setCurrentIndex(panel.layer.findData(other))
    _l, thr, side, _f1, _p, _r = cal.table[cal.layers.index(other)]
    assert panel.threshold_value() == pytest.approx(thr, abs=1e-6) and panel.side.currentData() == side
    assert panel.confusion_now() == count(cal.scores[cal.layers.index(other)].tolist(), labels, thr, side)

    ready.resize(1024, 700)  # the smallest window every panel must fit (tests/ui/test_layout.py)
    qtbot.wait(100)
    assert clipped(ready.condition_dock) == []
    ready.resize(1366, 768)
    panel.layer.setCurrentIndex(panel.layer.findData(cal.layer))
    qtbot.wait(100)
    assert clipped(ready.condition_dock) == []
    ARTIFACTS.mkdir(exist_ok=True)
    assert ready.grab().save(str(ARTIFACTS / "condition_view_1366x768.png"))


def test_use_this_gate_fills_the_generation_pane_and_generates_gated(qtbot, ready):  # noqa: F811
    from steerdesk.core.condition import ConditionGate, gate_scores

    panel, result = calibrate(qtbot, ready)
    cal = result.calibration
    panel.set_threshold(round(cal.threshold + 0.001, 4))
    qtbot.mouseClick(panel.use_button, Qt.MouseButton.LeftButton)
    g = ready.generation_panel.gate_group
    assert g.isChecked() and g.body.isVisibleTo(g)
    assert g.layer.value() == cal.layer and g.side.currentData() == cal.side
    assert g.threshold.value() == pytest.approx(round(cal.threshold + 0.001, 4))
    assert g.conditions() is result.conditions  # handed across in memory
    assert "cooking" in g.file.text()
    gate = g.gate()
    assert gate.layer == cal.layer and gate.read == cal.read

    gp = ready.generation_panel
    gp.max_tokens.setValue(6)
    with qtbot.waitSignal(gp.finished, timeout=60000) as blocker:
        qtbot.mouseClick(gp.generate_button, Qt.MouseButton.LeftButton)
    rows = blocker.args[0].rows
    from steerdesk.core.models import load_model

    lm = load_model(ready.controller.model_info.name, device="cpu", dtype="float32")
    score = float(gate_scores(lm, [gp.prompt.toPlainText().strip()],
                              ConditionGate(cal.layer, gate.direction, gate.threshold, gate.side, gate.read))[0])
    assert rows[1].gate_score == pytest.approx(score, abs=1e-5)
    assert rows[1].gate_open == (score > gate.threshold if gate.side == "above" else score < gate.threshold)


def test_stop_calibration_leaves_nothing_half_done(qtbot, window, tiny_model_dirs):
    from test_window import load

    load(qtbot, window, tiny_model_dirs["tiny-a"])
    panel = window.condition_panel
    window.condition_dock.raise_()
    panel.dataset.setCurrentText("cooking")
    done, stopped = [], []
    panel.finished.connect(done.append)
    window.controller.job_cancelled.connect(stopped.append)
    qtbot.mouseClick(panel.calibrate_button, Qt.MouseButton.LeftButton)
    assert panel.stop_button.isEnabled() and not panel.calibrate_button.isEnabled()
    qtbot.mouseClick(panel.stop_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(panel.calibrate_button.isEnabled, timeout=60000)
    assert not done and panel.choice() is None and not panel.use_button.isEnabled()
    assert not panel.stop_button.isEnabled()


def test_bad_condition_set_is_one_line(qtbot, window, tiny_model_dirs, tmp_path):
    from test_window import load

    load(qtbot, window, tiny_model_dirs["tiny-a"])
    panel = window.condition_panel
    errors = []
    panel.error_occurred.connect(lambda title, msg: errors.append((title, msg)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "on": true}\n{"prompt": "b"}\n')
    panel.dataset.setCurrentText(str(bad))
    qtbot.mouseClick(panel.calibrate_button, Qt.MouseButton.LeftButton)
    assert errors == [("Cannot calibrate", f"{bad}:2: expected a JSON object with 'prompt' and 'on'.")]
    assert panel.dataset.currentText() == str(bad) and panel.calibrate_button.isEnabled()


def test_the_empty_histogram_has_whole_prompt_counts(qtbot, window):
    """Before any calibration the axes read CAST scores -1..1 and prompt counts, not
    'prompts (x0.001)' from -500 to 500 (pyqtgraph's SI prefix on an empty plot)."""
    from PySide6.QtWidgets import QApplication

    plot = window.condition_panel.plot
    window.condition_dock.raise_()
    QApplication.processEvents()
    (x0, x1), (y0, y1) = plot.getViewBox().viewRange()
    assert x0 <= -1.0 and x1 >= 1.0 and y0 == 0 and y1 == 1
    axis = plot.getAxis("left")
    assert not axis.autoSIPrefix and "x0.001" not in axis.labelString()
