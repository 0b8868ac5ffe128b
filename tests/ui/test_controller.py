"""The controller and worker with a FAKE job (no model): outcomes, stop, stale drops, coalescing, shutdown.

A fake Spec type is registered in ``steerdesk.jobs.JOBS`` for each test; the worker runs it on
its real thread exactly as it runs a real job.
"""

from __future__ import annotations

import threading
import time
import types
from dataclasses import dataclass, field

import pytest

from steerdesk import jobs
from steerdesk.core.errors import Cancelled, SteerdeskError


@dataclass(frozen=True)
class FakeSpec:
    """``steps`` steps; each checks cancel (unless ``ignore_cancel``), reports progress, a partial and text."""

    label: str = "a"
    steps: int = 3
    delay: float = 0.0
    chunks_per_step: int = 1
    ignore_cancel: bool = False
    raises: BaseException | None = field(default=None, compare=False)
    started: threading.Event | None = field(default=None, compare=False)  # set when the run begins
    gate: threading.Event | None = field(default=None, compare=False)  # the run waits for it before step 0
    stopped_result: bool = False  # return what it has when stopped (like generate) instead of raising


def fake_run(lm, spec: FakeSpec, ctx):
    if spec.started is not None:
        spec.started.set()
    if spec.gate is not None:
        assert spec.gate.wait(10), "the test never opened the gate"
    if spec.raises is not None:
        raise spec.raises
    done = []
    for i in range(spec.steps):
        if ctx.cancel.is_set() and spec.stopped_result:
            break
        if not spec.ignore_cancel:
            ctx.check()
        ctx.progress(i + 1, spec.steps, "faking")
        ctx.partial((spec.label, i))
        for _ in range(spec.chunks_per_step):
            if ctx.on_text is not None:
                ctx.on_text(0, "x")
        done.append(i)
        time.sleep(spec.delay)
    return {"label": spec.label, "done": done, "seconds": 0.25}


def fake_record(lm, spec: FakeSpec, result):
    return types.SimpleNamespace(kind="fake", label=spec.label, seconds=result["seconds"],
                                 stopped=len(result["done"]) < spec.steps)


@pytest.fixture
def controller(qtbot, monkeypatch):
    """A real controller and worker thread with the fake job registered and a stand-in model."""
    module = types.ModuleType("fake_job")
    module.NAME = "fake"
    module.TITLE = "Fake job failed"
    module.run = fake_run
    module.record = fake_record
    monkeypatch.setitem(jobs.JOBS, FakeSpec, module)
    from steerdesk.ui.controller import ModelController

    c = ModelController()
    c._worker.lm = types.SimpleNamespace(name="stand-in model")  # jobs other than load need one
    yield c
    c.shutdown(5000)
    qtbot.waitUntil(c.thread.isFinished, timeout=10000)


class Log:
    """Everything a handle and the controller emit, in order."""

    def __init__(self, controller, handle) -> None:
        self.events: list[tuple] = []
        for name in ("progress", "partial", "text", "steps", "finished", "failed", "cancelled", "ended"):
            getattr(handle, name).connect(lambda *a, n=name: self.events.append((n, *a)))
        controller.finished.connect(lambda kind, r: self.events.append(("controller.finished", kind, r)))
        controller.job_cancelled.connect(lambda kind: self.events.append(("controller.cancelled", kind)))

    def names(self) -> list[str]:
        """Signal names in order (the controller's prefixed ``controller.``)."""
        return [e[0] for e in self.events]


def test_a_job_reports_progress_partials_result_and_record(qtbot, controller):
    busy, records = [], []
    controller.busy_changed.connect(busy.append)
    controller.record_ready.connect(records.append)
    handle = controller.submit(FakeSpec(steps=3))
    log = Log(controller, handle)
    assert handle.kind == "fake" and controller.busy
    with qtbot.waitSignal(handle.ended, timeout=10000):
        pass
    assert [e[1:] for e in log.events if e[0] == "progress"] == [(1, 3, "faking"), (2, 3, "faking"), (3, 3, "faking")]
    assert [e[1] for e in log.events if e[0] == "partial"] == [("a", 0), ("a", 1), ("a", 2)]
    finished = [e for e in log.events if e[0] == "finished"]
    assert finished == [("finished", {"label": "a", "done": [0, 1, 2], "seconds": 0.25})]
    assert log.names()[-1] == "ended" and ("controller.finished", "fake", finished[0][1]) in log.events
    assert busy == [True, False] and not controller.busy
    # The record comes after the result by design (it never delays it): it may arrive after ``ended``.
    qtbot.waitUntil(lambda: len(records) == 1, timeout=5000)
    assert len(records) == 1 and records[0].seconds == 0.25 and not records[0].stopped


def test_stop_mid_job_cancels_and_nothing_arrives_after(qtbot, controller):
    started = threading.Event()
    handle = controller.submit(FakeSpec(steps=1000, delay=0.005, started=started))
    log = Log(controller, handle)
    qtbot.waitUntil(lambda: any(e[0] == "partial" for e in log.events), timeout=10000)
    with qtbot.waitSignal(handle.ended, timeout=10000):
        controller.stop("fake")
        stop_index = len(log.events)
    after = log.events[stop_index:]
    assert [e[0] for e in after] == ["cancelled", "controller.cancelled", "ended"]
    assert not any(e[0] == "finished" for e in log.events)
    assert not controller.busy


def test_a_job_stopped_before_its_result_is_in_the_history_marked_stopped(qtbot, controller):
    from steerdesk.ui.panels.analysis_panel import HistoryTab
    from steerdesk.ui.requests import StoppedRun

    history = HistoryTab()
    qtbot.addWidget(history)
    controller.record_ready.connect(history.add)
    handle = controller.submit(FakeSpec(steps=1000, delay=0.005))
    log = Log(controller, handle)
    qtbot.waitUntil(lambda: any(e[0] == "partial" for e in log.events), timeout=10000)
    with qtbot.waitSignal(handle.ended, timeout=10000):
        controller.stop("fake")
    qtbot.waitUntil(lambda: len(history.records) == 1, timeout=5000)
    run = history.records[0]
    assert isinstance(run, StoppedRun) and run.kind == "fake" and 0 < run.seconds < 10
    assert "fake (stopped after" in history.list.item(0).text()
    assert not history.export_button.isEnabled()  # nothing to re-run
    assert '"stopped": true' in history.details.toPlainText()


def test_stopped_job_that_returns_is_recorded_as_stopped_not_shown(qtbot, controller):
    records = []
    controller.record_ready.connect(records.append)
    handle = controller.submit(FakeSpec(steps=1000, delay=0.005, stopped_result=True))
    log = Log(controller, handle)
    qtbot.waitUntil(lambda: any(e[0] == "partial" for e in log.events), timeout=10000)
    with qtbot.waitSignal(handle.ended, timeout=10000):
        controller.stop()
    assert "cancelled" in log.names() and "finished" not in log.names()
    qtbot.waitUntil(lambda: len(records) == 1, timeout=5000)
    assert records[0].stopped


def test_a_newer_job_of_the_same_kind_drops_the_stale_result(qtbot, controller):
    gate = threading.Event()
    first = controller.submit(FakeSpec(label="old", steps=2, gate=gate, ignore_cancel=True))
    old_log = Log(controller, first)
    second = controller.submit(FakeSpec(label="new", steps=2))
    new_log = Log(controller, second)
    assert first.request.cancel.is_set() and not controller.is_current(first) and controller.is_current(second)
    gate.set()  # the old job runs to the end anyway (it ignores its stop Event)
    with qtbot.waitSignal(second.ended, timeout=10000):
        pass
    assert [n for n in old_log.names() if not n.startswith("controller.")] == ["ended"]  # nothing but its end
    finished = [e for e in new_log.events if e[0] == "controller.finished"]
    assert [e[2]["label"] for e in finished] == ["new"]  # the stale one never reached the controller's listeners
    assert not controller.busy


def test_a_job_whose_result_has_no_time_is_recorded_with_the_measured_wall_time(qtbot, controller, monkeypatch):
    @dataclass(frozen=True)
    class TimedSpec(FakeSpec):
        pass

    timed = types.ModuleType("timed_job")
    timed.NAME, timed.TITLE, timed.run = "timed", "Timed failed", fake_run
    timed.record = lambda lm, spec, result, seconds=0.0: types.SimpleNamespace(seconds=seconds)
    monkeypatch.setitem(jobs.JOBS, TimedSpec, timed)
    records = []
    controller.record_ready.connect(records.append)
    handle = controller.submit(TimedSpec(steps=4, delay=0.05))
    with qtbot.waitSignal(handle.ended, timeout=10000):
        pass
    qtbot.waitUntil(lambda: bool(records), timeout=5000)
    assert 0.2 <= records[0].seconds < 5.0  # the worker's wall time, not 0.0


def test_other_kinds_do_not_supersede_each_other(qtbot, controller, monkeypatch):
    @dataclass(frozen=True)
    class OtherSpec(FakeSpec):
        pass

    other = types.ModuleType("other_job")
    other.NAME, other.TITLE, other.run = "other", "Other failed", fake_run
    monkeypatch.setitem(jobs.JOBS, OtherSpec, other)
    a = controller.submit(FakeSpec(steps=2))
    b = controller.submit(OtherSpec(label="b", steps=2))
    assert not a.request.cancel.is_set()
    results = []
    a.finished.connect(results.append)
    b.finished.connect(results.append)
    with qtbot.waitSignal(b.ended, timeout=10000):
        pass
    assert sorted(r["label"] for r in results) == ["a", "b"]


def test_streamed_text_is_coalesced_and_complete_before_the_result(qtbot, controller):
    handle = controller.submit(FakeSpec(steps=50, chunks_per_step=20, delay=0.002))
    texts: list[str] = []
    at_finish = {}
    handle.text.connect(lambda row, chunk: texts.append(chunk))
    handle.finished.connect(lambda r: at_finish.setdefault("text", "".join(texts)))
    emitted = []
    controller.text_generated.connect(lambda row, chunk: emitted.append(chunk))
    with qtbot.waitSignal(handle.ended, timeout=20000):
        pass
    assert at_finish["text"] == "x" * 1000  # every chunk, flushed before the result
    assert 1 <= len(texts) < 200  # 1000 chunks reached the GUI in far fewer updates (~every 33 ms)
    assert emitted == texts


def test_failures_are_typed_and_cancelled_is_not_a_user_error(qtbot, controller):
    assert not issubclass(Cancelled, SteerdeskError)
    errors = []
    controller.failed.connect(errors.append)
    for exc in (RuntimeError("boom"), SteerdeskError("fix your input")):
        handle = controller.submit(FakeSpec(raises=exc))
        with qtbot.waitSignal(handle.ended, timeout=10000):
            pass
    bug, user = errors
    assert bug.title == "Fake job failed" and not bug.user_error and "RuntimeError: boom" in bug.message
    assert "Traceback" in bug.details
    assert user.user_error and user.message == "fix your input"
    # A Cancelled raised inside a job is a stop, never an error dialog.
    handle = controller.submit(FakeSpec(raises=Cancelled("Stopped.")))
    log = Log(controller, handle)
    with qtbot.waitSignal(handle.ended, timeout=10000):
        pass
    assert "cancelled" in log.names() and len(errors) == 2


def test_jobs_need_a_model_except_a_load(qtbot, controller):
    controller._worker.lm = None
    errors = []
    controller.failed.connect(errors.append)
    handle = controller.submit(FakeSpec())
    with qtbot.waitSignal(handle.ended, timeout=10000):
        pass
    assert errors and errors[0].user_error and "No model is loaded" in errors[0].message


def test_shutdown_with_a_job_running_ends_the_thread_quickly(qtbot, controller):
    handle = controller.submit(FakeSpec(steps=100000, delay=0.01))
    log = Log(controller, handle)
    qtbot.waitUntil(lambda: any(e[0] == "partial" for e in log.events), timeout=10000)
    t0 = time.perf_counter()
    assert controller.shutdown(3000)
    assert controller.thread.isFinished() and time.perf_counter() - t0 < 1.0
    assert handle.request.cancel.is_set()
