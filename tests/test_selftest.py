"""``steerdesk --self-test``: passes on a working install, fails naming the broken step."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from steerdesk import selftest
from steerdesk.app import main as app_main

pytestmark = pytest.mark.slow

STEPS = ["load model", "load dataset", "compute vector", "generate", "steering changes output", "search"]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread: on a loaded 2-core machine a second one makes every matmul wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(lm, **kwargs) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = selftest.run_self_test(lm, qt=False, out=out, **kwargs)
    return code, out.getvalue().splitlines()


@pytest.fixture(scope="module")
def passed(smol):
    """One full in-process run on the already loaded SmolLM2; keeps its vectors and texts."""
    out = io.StringIO()
    test = selftest.SelfTest(lm=smol, qt=False, out=out)
    code = test.run()
    return code, out.getvalue().splitlines(), test


def test_passes_on_the_embedded_model_with_one_line_per_step(passed) -> None:
    code, lines, test = passed
    assert code == 0, lines
    assert [line.split(" (")[0] for line in lines[:-1]] == [f"ok   {step}" for step in STEPS]
    assert all(" s)" in line for line in lines[:-1])  # each step is timed
    assert lines[-1].startswith("self-test passed")
    plain, steered = test.results
    assert len(plain.token_ids) == selftest.TOKENS and plain.token_ids != steered.token_ids
    assert f"{selftest.SEARCH_TRIALS} trials stored in SQLite" in lines[-2]


def test_search_step_scores_equal_a_per_trial_evaluate(passed) -> None:
    """The self-test's 3 trials: distinct stored trials in the asked space, each scored as the public
    one-configuration ``evaluate`` scores its settings on the same held-out pairs and neutral texts."""
    from steerdesk.core.datasets import Dataset, load_bundled
    from steerdesk.core.evaluate import evaluate

    code, _, test = passed
    assert code == 0
    result = test.search
    assert len(result.evaluated) == selftest.SEARCH_TRIALS and not result.stopped
    full = load_bundled(selftest.DATASET)
    held = Dataset(examples=full.examples[selftest.PAIRS:selftest.PAIRS + selftest.SEARCH_PAIRS],
                   name=selftest.DATASET, paired=full.paired)
    for t in result.evaluated:
        s = t.settings
        assert s is not None and s.mode == "add" and len(s.layers) == 1
        assert selftest.LAYER - 1 <= s.layers[0] <= selftest.LAYER + 1 and 0.5 <= s.scale <= 1.5
        e = evaluate(test.lm, held, s.steers(test.vectors), neutral=list(selftest.SEARCH_NEUTRAL))
        assert t.margin_delta == pytest.approx(e.margin_delta, abs=1e-4)
        assert t.kl == pytest.approx(e.kl, abs=1e-4)
        assert t.fluency_delta == pytest.approx(e.fluency_delta, abs=1e-4)
    assert result.pareto and result.best is not None


def test_fails_when_the_search_stores_fewer_trials(passed, monkeypatch: pytest.MonkeyPatch) -> None:
    """A search that stops after 2 trials is caught at the stored-trial count, step named."""
    from steerdesk import jobs
    from steerdesk.core import extract

    _, _, done = passed
    monkeypatch.setattr(extract, "compute_vectors", lambda *a, **k: done.vectors)
    real = jobs.search.run
    monkeypatch.setattr(jobs.search, "run", lambda lm, spec, ctx: real(lm, replace(spec, trials=2), ctx))
    code, lines = _run(done.lm)
    assert code == 1 and lines[-1] == "self-test FAILED at 'search'"
    assert lines[-2].startswith("FAIL search") and "stored 2 evaluated trials, expected 3" in lines[-2]


def test_fails_when_the_pareto_export_does_not_read_back(passed, monkeypatch: pytest.MonkeyPatch) -> None:
    from steerdesk.core import extract, search

    _, _, done = passed
    monkeypatch.setattr(extract, "compute_vectors", lambda *a, **k: done.vectors)
    monkeypatch.setattr(search.SearchResult, "pareto_csv", lambda self: "trial,margin_delta\n")
    code, lines = _run(done.lm)
    assert code == 1 and lines[-1] == "self-test FAILED at 'search'"
    assert "Pareto export reads back" in lines[-2] and "[] (CSV)" in lines[-2]


def test_fails_when_the_generator_ignores_steering(passed, monkeypatch: pytest.MonkeyPatch) -> None:
    """A generator that returns unsteered text for the steered row is caught, step named."""
    from steerdesk.core import extract, generate

    _, _, done = passed
    real = generate.generate
    monkeypatch.setattr(extract, "compute_vectors", lambda *a, **k: done.vectors)  # already tested above

    def unsteered(lm, prompts, steering=None, **kwargs):
        return real(lm, prompts, [[] for _ in prompts], **kwargs)

    monkeypatch.setattr(generate, "generate", unsteered)
    code, lines = _run(done.lm)
    assert code == 1
    assert lines[-2].startswith("FAIL steering changes output") and "equals unsteered" in lines[-2]
    assert lines[-1] == "self-test FAILED at 'steering changes output'"
    assert [line.split(" (")[0] for line in lines[:4]] == [f"ok   {s}" for s in STEPS[:4]]


def test_fails_when_generation_produces_nothing(passed, monkeypatch: pytest.MonkeyPatch) -> None:
    from steerdesk.core import extract, generate

    _, _, done = passed
    monkeypatch.setattr(extract, "compute_vectors", lambda *a, **k: done.vectors)
    empty = replace(done.results[0], text="", token_ids=[])
    monkeypatch.setattr(generate, "generate", lambda *a, **k: [done.results[0], empty])
    code, lines = _run(done.lm)
    assert code == 1 and lines[-2].startswith("FAIL generate") and "steered row generated no tokens" in lines[-2]


def test_fails_on_a_non_finite_vector(passed, monkeypatch: pytest.MonkeyPatch) -> None:
    from steerdesk.core import extract

    _, _, done = passed
    bad = replace(done.vectors, directions=done.vectors.directions.clone())
    bad.directions[3, 0] = float("nan")
    monkeypatch.setattr(extract, "compute_vectors", lambda *a, **k: bad)
    code, lines = _run(done.lm)
    assert code == 1 and lines[-1] == "self-test FAILED at 'compute vector'"
    assert "NaN" in lines[-2]


def test_fails_when_the_bundled_dataset_is_missing(smol, monkeypatch: pytest.MonkeyPatch) -> None:
    from steerdesk.core import datasets
    from steerdesk.core.errors import SteerdeskError

    def missing(name):
        raise SteerdeskError(f"No bundled dataset {name!r}")

    monkeypatch.setattr(datasets, "load_bundled", missing)
    code, lines = _run(smol)
    assert code == 1
    assert lines[-2].startswith("FAIL load dataset") and "No bundled dataset 'neutral_rude'" in lines[-2]
    assert len(lines) == 3  # load model ok, the failure, the summary: later steps do not run


def test_model_failure_through_the_app_entry(capsys: pytest.CaptureFixture[str]) -> None:
    """``steerdesk --self-test`` dispatches before the CLI parser and exits non-zero."""
    code = app_main(["--self-test", "--no-qt", "--model", "/nonexistent/model.gguf"])
    out = capsys.readouterr().out.splitlines()
    assert code == 1
    assert out[0].startswith("FAIL load model") and "not found" in out[0]
    assert out[-1] == "self-test FAILED at 'load model'"


def test_real_entry_in_a_subprocess(smol_folder) -> None:
    """The whole thing as a user runs it: ``python -m steerdesk --self-test`` (Qt step included)."""
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "steerdesk", "--self-test"], capture_output=True,
                          text=True, env=env, timeout=900)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [line.split(" (")[0] for line in lines[:-1]] == [f"ok   {s}" for s in ["qt offscreen", *STEPS]]
    assert lines[-1].startswith("self-test passed")
