"""Search (issue 16): space, Pareto helpers, batched scores = evaluate(), seeds, SQLite study, resume, refusals."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tinylm import NUM_LAYERS, rude4, strong_vectors

from steerdesk import jobs
from steerdesk.core.errors import Cancelled, SteerdeskError
from steerdesk.core.evaluate import NEUTRAL_TEXTS, evaluate
from steerdesk.core.records import RunRecord
from steerdesk.core.search import (
    Evaluator,
    SearchSpace,
    TrialSettings,
    best_within_budget,
    load_result,
    pareto_mask,
    read_study,
    search,
    settings_for,
    start_points,
)
from steerdesk.core.sweep import sweep
from steerdesk.core.vectors import VectorSet, load_vectors
from steerdesk.jobs.rerun import rerun

NEUTRAL = tuple(NEUTRAL_TEXTS[:3])


def _vs(lm, factor: float = 1.0, seed: int = 1) -> VectorSet:
    d = strong_vectors(lm, factor, seed=seed)
    return VectorSet(d, torch.ones(d.shape[0]), {"model": lm.info.name, "architecture": lm.info.architecture,
                                                      "method": "random", "read_position": "last"})


def _state(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


# ----------------------------------------------------------------------------- space / helpers

@pytest.mark.parametrize("arch", ["llama"])
def test_space_parse_and_empty_spaces_are_one_line_errors(tiny, arch):
    vs = _vs(tiny)
    base = SearchSpace.default(vs, tiny.info.num_layers)
    assert (base.first_layer, base.last_layer, base.max_span) == (0, NUM_LAYERS - 1, 4)
    sp = SearchSpace.parse("layers=1-3;span=2;scale=-1..0.5;modes=add,clamp;normalize=yes", base)
    assert (sp.first_layer, sp.last_layer, sp.max_span, sp.scale_min, sp.scale_max) == (1, 3, 2, -1.0, 0.5)
    assert sp.modes == ("add", "clamp") and sp.normalize == (True,)
    sp.check(vs, tiny.info.num_layers)
    assert set(sp.distributions()) == {"start", "span", "scale", "mode"}  # normalize has one value: not searched
    for text, words in [("layers=3-1", "empty"), ("span=0", "empty"), ("scale=2..1", "empty"), ("modes=", "empty"),
                        ("modes=warp", "Unknown steering mode"), ("layers=0-9", "out of range"),
                        ("scale=0..0;modes=add,project", "changes nothing")]:
        with pytest.raises(SteerdeskError) as info:
            SearchSpace.parse(text, base).check(vs, tiny.info.num_layers)
        assert words in str(info.value) and "\n" not in str(info.value), text
    for text in ("span=x", "layers", "colour=red", "normalize=maybe"):
        with pytest.raises(SteerdeskError):
            SearchSpace.parse(text, base)


@pytest.mark.parametrize("arch", ["llama"])
def test_space_refuses_layers_without_direction(tiny, arch):
    d = strong_vectors(tiny, 1.0)
    d[1] = 0
    vs = VectorSet(d, torch.ones(d.shape[0]), {"architecture": tiny.info.architecture})
    default = SearchSpace.default(vs, tiny.info.num_layers)  # the longest covered run: layers 2-3
    assert (default.first_layer, default.last_layer) == (2, 3)
    with pytest.raises(SteerdeskError, match="no direction for layer 1"):
        SearchSpace.parse("layers=0-3", default).check(vs, tiny.info.num_layers)


@pytest.mark.parametrize("arch", ["llama"])
def test_settings_for_clips_the_range_and_maps_normalised_scales(tiny, arch):
    vs = _vs(tiny)
    space = SearchSpace(first_layer=1, last_layer=3, max_span=4)
    s = settings_for({"start": 2, "span": 4, "scale": 0.5, "mode": "add", "normalize": False}, space, vs)
    assert s.layers == (2, 3) and s.scale == 0.5  # clipped at the last layer
    n = settings_for({"start": 1, "span": 2, "scale": 0.5, "mode": "clamp", "normalize": True}, space, vs)
    mean_norm = float((vs.directions[1].norm() + vs.directions[2].norm()) / 2)
    assert n.scale == pytest.approx(0.5 * mean_norm, rel=1e-6) and n.searched_scale == 0.5
    p = settings_for({"start": 1, "span": 1, "scale": 0.5, "mode": "project", "normalize": True}, space, vs)
    assert p.scale == 0.5  # project's scale is a fraction of the component, whatever normalize says
    # One normalised add layer at the mapped scale is the raw add at the searched scale.
    one = settings_for({"start": 3, "span": 1, "scale": 0.7, "mode": "add", "normalize": True}, space, vs)
    raw, unit = TrialSettings((3,), 0.7, "add", False).steers(vs)[0], one.steers(vs)[0]
    h = torch.randn(5, tiny.info.hidden_size)
    assert torch.allclose(h + raw.scale * raw.vector, h + unit.scale * unit.vector / unit.vector.norm(), atol=1e-5)


def test_pareto_mask_matches_a_brute_force_definition():
    rng = random.Random(0)
    for _ in range(30):
        pts = [(rng.choice([0.0, 0.5, 1.0, rng.random()]), rng.choice([0.1, 0.2, rng.random()])) for _ in range(12)]
        pts.append((float("nan"), 0.0))
        mask = pareto_mask([p[0] for p in pts], [p[1] for p in pts])
        for i, (m, k) in enumerate(pts):
            if not math.isfinite(m):
                assert not mask[i]
                continue
            dominated = any(m2 >= m and k2 <= k and (m2, k2) != (m, k) for m2, k2 in pts if math.isfinite(m2))
            assert mask[i] == (not dominated), (pts, i)
    assert pareto_mask([1.0, 1.0], [0.5, 0.5]) == [True, True]  # equal points do not dominate each other


# ----------------------------------------------------------------------------- scores

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_scores_equal_evaluate_of_each_configuration(tiny, arch):
    vs = _vs(tiny, 0.5)
    batch = [TrialSettings((0, 1), 0.8, "add", False), TrialSettings((2,), 1.5, "clamp", True),
             TrialSettings((1, 2, 3), 0.6, "project", False), TrialSettings((3,), -1.0, "add", False)]
    ev = Evaluator.prepare(tiny, vs, rude4(), neutral=NEUTRAL, batch_size=3, max_rows=7)
    got = ev.score(batch, engine="scorer")  # full forwards: the same arithmetic as evaluate()
    for s, (m, kl, f) in zip(batch, got):
        want = evaluate(tiny, rude4(), s.steers(vs), neutral=NEUTRAL)
        assert m == pytest.approx(want.margin_delta, abs=1e-5)
        assert f == pytest.approx(want.fluency_delta, abs=1e-5)
        assert kl == pytest.approx(want.kl, abs=1e-6)
    assert got[1][0] != got[0][0]  # the rows really are different configurations


def test_start_points_spread_single_layers_over_depth():
    """Layer i of k is first + floor((i + 0.5) * n / k): worked out by hand for the cases below."""
    full = SearchSpace(first_layer=0, last_layer=29)
    assert start_points(full, 5) == [{"start": s, "span": 1, "scale": 1.0, "mode": "add", "normalize": False}
                                     for s in (3, 9, 15, 21, 27)]
    # 10 layers from 4, 4 points: 4 + floor(1.25), floor(3.75), floor(6.25), floor(8.75) -> 5, 7, 10, 12
    part = SearchSpace(first_layer=4, last_layer=13, scale_min=0.5, scale_max=1.5, modes=("clamp", "project"))
    assert [p["start"] for p in start_points(part, 4)] == [5, 7, 10, 12]
    assert start_points(part, 4)[0] == {"start": 5, "span": 1, "scale": 1.0, "mode": "clamp", "normalize": False}
    # unsearched dimensions are not parameters; more points than layers: each layer once
    narrow = SearchSpace(first_layer=2, last_layer=3, max_span=1, modes=("add",), normalize=(True,))
    assert start_points(narrow, 5) == [{"start": 2, "scale": 1.0}, {"start": 3, "scale": 1.0}]
    assert start_points(full, 0) == []


@pytest.mark.parametrize("arch", ["llama"])
def test_a_new_study_starts_with_the_spread_points_and_a_resume_does_not_add_them(tiny, arch, tmp_path):
    vs = _vs(tiny)
    space = SearchSpace.default(vs, NUM_LAYERS)
    res = search(tiny, vs, rude4(), tmp_path / "s.db", trials=6, batch=2, seed=3, neutral=NEUTRAL)
    starts = start_points(space, 4)  # max(batch, 4) points
    assert [t.params for t in res.trials[:4]] == starts
    assert all(t.params not in starts for t in res.trials[4:])
    more = search(tiny, vs, rude4(), tmp_path / "s.db", trials=10, batch=2, neutral=NEUTRAL)
    assert [t.params for t in more.trials[:6]] == [t.params for t in res.trials]
    assert sum(t.params in starts for t in more.trials) == 4  # not enqueued again on resume
    rand = search(tiny, vs, rude4(), tmp_path / "r.db", trials=4, batch=2, seed=3, neutral=NEUTRAL,
                  spread_start=False)
    assert not any(t.params in starts for t in rand.trials)
    # a budget below the start batch takes the first points only, and nothing is left waiting
    few = search(tiny, vs, rude4(), tmp_path / "f.db", trials=2, batch=2, seed=3, neutral=NEUTRAL)
    assert [t.params for t in few.trials] == start_points(space, 2)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sweep_engine_scores_equal_evaluate_of_each_configuration(tiny, arch):
    """``engine="sweep"`` (prefix reuse, packing) gives each trial what ``evaluate`` gives it alone:
    ranges starting at different layers, every mode, normalisation, and an identity (x0 add)."""
    vs = _vs(tiny, 0.5)
    batch = [TrialSettings((0, 1), 0.8, "add", False), TrialSettings((2,), 1.5, "clamp", True),
             TrialSettings((1, 2, 3), 0.6, "project", False), TrialSettings((3,), -1.0, "add", False),
             TrialSettings((1,), 0.0, "add", False)]
    ev = Evaluator.prepare(tiny, vs, rude4(), neutral=NEUTRAL, batch_size=3, max_rows=7)
    got = ev.score(batch, engine="sweep")
    for s, (m, kl, f) in zip(batch, got):
        want = evaluate(tiny, rude4(), s.steers(vs), neutral=NEUTRAL)
        assert m == pytest.approx(want.margin_delta, abs=1e-4)
        assert f == pytest.approx(want.fluency_delta, abs=1e-4)
        assert kl == pytest.approx(want.kl, abs=1e-4)
    assert got[-1] == (0.0, 0.0, 0.0)
    with pytest.raises(SteerdeskError, match="Unknown scoring engine"):
        ev.score(batch, engine="fast")


# Every mode, normalisation, multi-layer ranges starting at every layer, a negative scale, and
# identities (x0 add, x0 project): two batches, as a search scores them one after the other.
RECORDED_BATCHES = [
    [TrialSettings((0, 1), 0.8, "add", False), TrialSettings((2,), 1.5, "clamp", True),
     TrialSettings((1, 2, 3), 0.6, "project", False), TrialSettings((3,), -1.0, "add", False),
     TrialSettings((1,), 0.0, "add", False)],
    [TrialSettings((2, 3), 1.2, "add", True), TrialSettings((0,), 0.7, "clamp", False),
     TrialSettings((1, 2), 0.4, "project", True), TrialSettings((2,), 0.0, "project", False),
     TrialSettings((0, 1, 2, 3), 0.5, "add", False), TrialSettings((3,), 0.9, "clamp", True)],
]


def _assert_equal_to_evaluate(tiny, vs, batches, got):
    for batch, scores in zip(batches, got):
        assert len(scores) == len(batch)
        for s, (m, kl, f) in zip(batch, scores):
            want = evaluate(tiny, rude4(), s.steers(vs), neutral=NEUTRAL)
            assert m == pytest.approx(want.margin_delta, abs=1e-4), s
            assert f == pytest.approx(want.fluency_delta, abs=1e-4), s
            assert kl == pytest.approx(want.kl, abs=1e-4), s


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_recorded_engine_records_once_and_scores_equal_evaluate(tiny, arch, monkeypatch):
    """The default engine: the unsteered pass (block inputs at every layer, KL reference,
    self-check) runs once per evaluator; every batch after it runs only steered tails, and each
    trial gets what ``evaluate`` gives it alone."""
    from steerdesk.core import sweep_engine as engine_mod

    recordings = []

    class Counted(engine_mod.Capture):
        def __enter__(self):
            recordings.append(sorted(self.starts))
            return super().__enter__()

    monkeypatch.setattr(engine_mod, "Capture", Counted)
    vs = _vs(tiny, 0.5)
    ev = Evaluator.prepare(tiny, vs, rude4(), neutral=NEUTRAL, batch_size=3, max_rows=7)
    assert ev.engine == "recorded"
    got = [ev.score(b) for b in RECORDED_BATCHES]
    rec = ev.recording
    assert rec is not None and rec.path == "prefix" and rec.packed is not None  # prefix reuse and packing ran
    assert rec.recorded == list(range(NUM_LAYERS))
    # One recording per layout, all in the first batch; the second batch recorded nothing.
    assert len(recordings) == len(rec.layouts) and all(r == rec.recorded for r in recordings)
    assert rec.record() is rec.base and rec.base.margin == pytest.approx(ev.base.margin, abs=1e-12)
    _assert_equal_to_evaluate(tiny, vs, RECORDED_BATCHES, got)
    assert got[0][-1] == (0.0, 0.0, 0.0) and got[1][3] == (0.0, 0.0, 0.0)  # identities are the baseline
    assert len({g[0] for g in got[1]}) == len(got[1])  # the rows really are different configurations
    assert ev.score([]) == []


@pytest.mark.parametrize("arch", ["llama"])
def test_recorded_engine_over_the_memory_budget_falls_back_and_stays_exact(tiny, arch):
    """A budget for two layers' block inputs records two spread layers (trials start at the recorded
    layer below theirs); a budget for none runs full forward passes; both equal ``evaluate``."""
    vs = _vs(tiny, 0.5)
    kw = dict(neutral=NEUTRAL, batch_size=3, max_rows=7)
    whole = Evaluator.prepare(tiny, vs, rude4(), **kw)
    whole.score(RECORDED_BATCHES[0][:1])
    assert whole.recording is not None
    per_layer = whole.recording.layer_bytes(whole.recording.layouts)
    assert per_layer > 0
    two = Evaluator.prepare(tiny, vs, rude4(), cache_budget=2 * per_layer + 1, **kw)
    got = [two.score(b) for b in RECORDED_BATCHES]
    assert two.recording is not None and two.recording.path == "prefix"
    assert two.recording.recorded == [0, 2]
    assert sum(c.nbytes() for c in two.recording.caps.values()) <= 2 * per_layer + 1
    _assert_equal_to_evaluate(tiny, vs, RECORDED_BATCHES, got)
    none = Evaluator.prepare(tiny, vs, rude4(), cache_budget=1, **kw)
    got = [none.score(b) for b in RECORDED_BATCHES]
    assert none.recording is not None and none.recording.path == "full" and none.recording.recorded == []
    assert none.recording.packed is None and not none.recording.caps
    _assert_equal_to_evaluate(tiny, vs, RECORDED_BATCHES, got)


@pytest.mark.parametrize("arch", ["llama"])
def test_recorded_engine_scores_a_batch_it_cannot_run_by_its_own_sweep(tiny, arch, tmp_path):
    """Recorded for layers 2-3 and ``all`` positions: a trial starting at layer 0, or steering the
    generated tokens only (other packing), is scored by a sweep-engine run of its batch instead."""
    vs = _vs(tiny, 0.5)
    ev = Evaluator.prepare(tiny, vs, rude4(), neutral=NEUTRAL, batch_size=3, max_rows=7, layers=[2, 3])
    first = [TrialSettings((2, 3), 0.8, "add", False), TrialSettings((3,), 1.0, "clamp", False)]
    low = [TrialSettings((0, 1), 0.8, "add", False)]
    generated = [TrialSettings((2,), 1.2, "add", False, positions="generated")]
    got = [ev.score(b) for b in (first, low, generated)]
    assert ev.recording is not None and ev.recording.recorded == [2, 3]
    assert not ev.recording.supports([s.steers(vs) for s in low])
    assert not ev.recording.supports([s.steers(vs) for s in generated])
    _assert_equal_to_evaluate(tiny, vs, [first, low, generated], got)
    with pytest.raises(SteerdeskError, match="Unknown scoring engine"):
        Evaluator.prepare(tiny, vs, rude4(), neutral=NEUTRAL, engine="fast")
    with pytest.raises(SteerdeskError, match="Unknown scoring engine"):
        search(tiny, vs, rude4(), tmp_path / "s.db", engine="fast", neutral=NEUTRAL)
    assert not (tmp_path / "s.db").exists()


# ----------------------------------------------------------------------------- studies

@pytest.mark.parametrize("arch", ["llama"])
def test_same_seed_same_trials_and_resume_equals_an_uninterrupted_run(tiny, arch, tmp_path):
    vs = _vs(tiny)
    kw = dict(batch=3, neutral=NEUTRAL)
    a = search(tiny, vs, rude4(), tmp_path / "a.db", trials=9, seed=7, **kw)
    b = search(tiny, vs, rude4(), tmp_path / "b.db", trials=9, seed=7, **kw)
    c = search(tiny, vs, rude4(), tmp_path / "c.db", trials=9, seed=8, **kw)
    key = lambda r: [(t.params, t.margin_delta, t.kl) for t in r.trials]
    assert key(a) == key(b)
    assert [t.params for t in a.trials] != [t.params for t in c.trials]
    assert len(a.evaluated) == 9 and a.batches == 3
    # Stopped after 2 batches (6 trials), resumed to 9: the same 9 trials as the run above.
    part = search(tiny, vs, rude4(), tmp_path / "d.db", trials=6, seed=7, **kw)
    assert len(part.evaluated) == 6
    resumed = search(tiny, vs, rude4(), tmp_path / "d.db", trials=9, **kw)  # seed, space: the stored ones
    assert resumed.evaluated_before == 6 and resumed.evaluated_now == 3 and resumed.seed == 7
    assert key(resumed) == key(a)
    # A study at its budget runs nothing more.
    again = search(tiny, vs, rude4(), tmp_path / "d.db", trials=9, **kw)
    assert again.evaluated_now == 0 and key(again) == key(a)
    # The Pareto set and the best trial follow from the stored values.
    front = [t for t in a.trials if t.on_front]
    assert front and all(not (o.margin_delta >= t.margin_delta and o.kl <= t.kl and o is not t
                                and (o.margin_delta, o.kl) != (t.margin_delta, t.kl))
                         for t in front for o in a.trials if o.state == "complete")
    best = a.best
    assert best is not None and best is best_within_budget(a.trials, a.fluency_budget)
    assert all(t.margin_delta <= best.margin_delta for t in a.trials if t.within_budget)


@pytest.mark.parametrize("arch", ["llama"])
def test_study_holds_identity_space_seed_and_reads_back_without_a_model(tiny, arch, tmp_path):
    vs = _vs(tiny)
    path = tmp_path / "s.db"
    space = SearchSpace(first_layer=1, last_layer=3, max_span=2, modes=("add", "clamp"))
    res = search(tiny, vs, rude4(), path, trials=4, batch=2, space=space, seed=3, neutral=NEUTRAL)
    stored = read_study(path)
    assert stored is not None
    assert stored.attrs["model"]["name"] == tiny.info.name and stored.space == space and stored.seed == 3
    assert stored.attrs["vector"]["directions_sha256"] == res.vector["directions_sha256"]
    assert stored.attrs["evaluation"]["dataset_sha256"] == rude4().sha256()
    import optuna  # Optuna's own tools read the file

    study = optuna.load_study(study_name="steerdesk-search", storage=f"sqlite:///{path}")
    assert len(study.trials) == 4 and len(study.best_trials) >= 1
    loaded = load_result(path)  # no model: settings from the trials' stored attributes
    assert [t.settings for t in loaded.trials] == [t.settings for t in res.trials]
    assert [t.on_front for t in loaded.trials] == [t.on_front for t in res.trials]
    obj = json.loads(json.dumps(res.to_dict()))
    assert obj["format"] == "steerdesk.search/1" and len(obj["trials"]) == 4
    assert [p["number"] for p in obj["pareto"]] == [t.number for t in res.pareto]
    csv_lines = res.pareto_csv().splitlines()
    assert csv_lines[0].startswith("trial,margin_delta,kl") and len(csv_lines) == 1 + len(res.pareto)


@pytest.mark.parametrize("arch", ["llama"])
def test_the_second_half_is_refined_around_the_best_trial(tiny, arch, tmp_path):
    """Trials from ``refine_from`` on are proposed inside the trust region of the best trial (margin
    projected to the fluency budget's edge) when their batch was asked (stored attribute ``refine``),
    keep its span, mode and normalisation, and the study stores where the phase starts;
    ``refine=False`` makes a study without it."""
    from steerdesk.core.search_refine import centre_of, edge_factor, region
    from steerdesk.core.search_study import trial_results

    vs = _vs(tiny)
    res = search(tiny, vs, rude4(), tmp_path / "s.db", trials=10, batch=2, seed=4, neutral=NEUTRAL)
    stored = read_study(tmp_path / "s.db")
    assert res.refine_from == 5 and stored.refine_from == 5
    # batches of 2: the batch asked with 4 evaluated trials is the sampler's, those from 6 on refine
    assert [t.phase for t in res.trials] == ["start"] * 4 + ["search"] * 2 + ["refine"] * 4
    by_number = {t.number: t for t in stored.trials}
    for t in res.trials[6:]:
        asked_after = t.number - t.number % 2  # the trials told before this one's batch was asked
        told = trial_results([x for x in stored.trials if x.number < asked_after], res.space, vs, res.fluency_budget)
        centre = centre_of(told, res.fluency_budget)
        assert centre is not None and by_number[t.number].user_attrs["refine"] == centre.number
        searched, fixed = region(res.space, centre.params, edge_factor(centre.fluency_delta, res.fluency_budget))
        assert {k: t.params[k] for k in fixed} == fixed
        assert all(d.low <= t.params[k] <= d.high for k, d in searched.items())
    assert "refine phase from 5 evaluated trials (4 so far)" in res.summary()
    assert load_result(tmp_path / "s.db").refine_from == 5
    off = search(tiny, vs, rude4(), tmp_path / "off.db", trials=10, batch=2, seed=4, neutral=NEUTRAL, refine=False)
    assert off.refine_from is None and all(t.phase != "refine" for t in off.trials)
    assert [t.params for t in off.trials[:6]] == [t.params for t in res.trials[:6]]  # the same until the phase


@pytest.mark.parametrize("arch", ["llama"])
def test_bad_input_is_refused_with_the_study_file_untouched(tiny, arch, tmp_path, fresh_tiny):
    vs = _vs(tiny)
    kw = dict(batch=2, neutral=NEUTRAL)
    good = tmp_path / "good.db"
    search(tiny, vs, rude4(), good, trials=2, seed=1, **kw)
    before = _state(good)

    def refused(path, words, **over):
        args = dict(trials=4, **kw)
        args.update(over)
        lm = args.pop("lm", tiny)
        vectors = args.pop("vectors", vs)
        with pytest.raises(SteerdeskError) as info:
            search(lm, vectors, args.pop("heldout", rude4()), path, **args)
        msg = str(info.value)
        assert "\n" not in msg and words in msg, msg
        return msg

    refused(good, "another vector set", vectors=_vs(tiny, seed=5))
    other = fresh_tiny("qwen2")
    refused(good, "made for model", lm=other, vectors=_vs(other))
    held = rude4()
    held.examples = held.examples[:3]
    refused(good, "another held-out set", heldout=held)
    refused(good, "seed 1", seed=2)
    refused(good, "refine phase on", refine=False)
    refused(good, "search space", space=SearchSpace(first_layer=0, last_layer=1))
    refused(good, "trial budget", trials=0)
    refused(good, "empty", space=SearchSpace(first_layer=2, last_layer=1))
    assert _state(good) == before
    # Foreign and unreadable files.
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database\n" * 10)
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    foreign = tmp_path / "foreign.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE notes (x TEXT)")
    con.execute("INSERT INTO notes VALUES ('keep me')")
    con.commit()
    con.close()
    import optuna

    other_study = tmp_path / "other.db"
    optuna.create_study(study_name="someone-else", storage=f"sqlite:///{other_study}").optimize(
        lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    for path, words in [(garbage, "not an SQLite"), (empty, "empty file"), (foreign, "not an Optuna study"),
                        (other_study, "no steerdesk search")]:
        state = _state(path)
        refused(path, words)
        assert _state(path) == state, path
    # A budget of 0 or an empty space on a new file creates nothing.
    for over in ({"trials": 0}, {"space": SearchSpace(first_layer=0, last_layer=3, modes=())}):
        refused(tmp_path / "new.db", "", **over)
        assert not (tmp_path / "new.db").exists()


@pytest.mark.parametrize("arch", ["llama"])
def test_stop_keeps_what_was_found_and_resume_retries_the_batch_in_flight(tiny, arch, tmp_path):
    import threading

    vs = _vs(tiny)
    path = tmp_path / "stop.db"
    cancel = threading.Event()
    calls = {"n": 0}
    real = Evaluator.score

    def score(self, batch, cancel=None):
        calls["n"] += 1
        if calls["n"] == 3:  # Stop pressed while the third batch is being scored
            assert cancel is not None
            cancel.set()
            raise Cancelled("stop")
        return real(self, batch, cancel)

    Evaluator.score = score  # type: ignore[method-assign]
    try:
        res = search(tiny, vs, rude4(), path, trials=10, batch=2, seed=4, neutral=NEUTRAL, cancel=cancel)
    finally:
        Evaluator.score = real  # type: ignore[method-assign]
    assert res.stopped and len(res.evaluated) == 4
    assert [t.state for t in res.trials] == ["complete"] * 4 + ["interrupted"] * 2 + ["waiting"] * 2
    done = search(tiny, vs, rude4(), path, trials=10, batch=2, neutral=NEUTRAL)
    assert len(done.evaluated) == 10 and not done.stopped and done.evaluated_now == 6
    assert [(t.params, t.margin_delta) for t in done.trials[:4]] == [(t.params, t.margin_delta) for t in res.trials[:4]]
    retried = {t.retry_of: t.params for t in done.trials if t.retry_of is not None}
    assert retried == {4: res.trials[4].params, 5: res.trials[5].params}


_CHILD = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {tests!r})
    import torch
    from transformers import AutoTokenizer
    from tinylm import build_tiny, rude4, strong_vectors
    from steerdesk.core import search as S
    from steerdesk.core.vectors import VectorSet
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained({tok!r})
    lm = build_tiny("llama", tok, tok)
    d = strong_vectors(lm, 1.0)
    vs = VectorSet(d, torch.ones(d.shape[0]), {{"model": lm.info.name, "architecture": lm.info.architecture}})
    real = S.Evaluator.score
    calls = [0]
    def score(self, batch, cancel=None):
        calls[0] += 1
        if calls[0] == 3:  # the third batch: asked (RUNNING in the study), never told
            open({marker!r}, "w").write("scoring")
            time.sleep(120)
        return real(self, batch, cancel)
    S.Evaluator.score = score
    S.search(lm, vs, rude4(), {study!r}, trials=10, batch=3, seed=5, neutral={neutral!r})
""")


@pytest.mark.parametrize("arch", ["llama"])
def test_sigkill_mid_batch_then_resume_keeps_completed_trials_and_reaches_the_budget(
        tiny, arch, tmp_path, smol_folder):
    study, marker = tmp_path / "kill.db", tmp_path / "marker"
    code = _CHILD.format(tests=str(Path(__file__).parent), tok=str(smol_folder), marker=str(marker),
                         study=str(study), neutral=NEUTRAL)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert child.poll() is None, child.stdout.read().decode()[-2000:]  # type: ignore[union-attr]
            assert time.time() < deadline, "the child never reached its third batch"
            time.sleep(0.2)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    stored = read_study(study)
    assert stored is not None
    states = [t.state.name for t in sorted(stored.trials, key=lambda t: t.number)]
    assert states == ["COMPLETE"] * 6 + ["RUNNING"] * 3, states
    kept = {t.number: (t.params, t.values) for t in stored.trials if t.state.name == "COMPLETE"}
    vs = VectorSet(strong_vectors(tiny, 1.0), torch.ones(NUM_LAYERS),
                   {"model": tiny.info.name, "architecture": tiny.info.architecture})
    res = search(tiny, vs, rude4(), study, trials=10, batch=3, neutral=NEUTRAL)
    assert res.evaluated_before == 6 and len(res.evaluated) == 10 and res.seed == 5
    by_number = {t.number: t for t in res.trials}
    for number, (params, values) in kept.items():  # nothing lost, nothing re-scored
        assert by_number[number].params == params and by_number[number].state == "complete"
        assert [by_number[number].margin_delta, by_number[number].kl] == values
    interrupted = [t for t in res.trials if t.state == "interrupted"]
    assert sorted(t.number for t in interrupted) == [6, 7, 8]
    retries = {t.retry_of: t for t in res.trials if t.retry_of is not None}
    assert sorted(retries) == [6, 7, 8]
    for t in interrupted:
        assert retries[t.number].params == t.params and retries[t.number].state == "complete"


# ----------------------------------------------------------------------------- records and export

@pytest.mark.parametrize("arch", ["llama"])
def test_every_trial_is_a_run_record_that_reruns_to_its_scores(tiny, arch, tmp_path):
    vs = _vs(tiny)
    vpath = tmp_path / "v.safetensors"
    from steerdesk.core.vectors import save_vectors

    save_vectors(vs, vpath)
    vs = load_vectors(vpath)
    spec = jobs.SearchSpec(vectors=vs, heldout=rude4(), study=str(tmp_path / "r.db"), trials=4, batch=2, seed=2,
                           neutral=NEUTRAL, vector_path=str(vpath))
    got = []
    res = jobs.run(tiny, spec, jobs.JobContext(on_partial=got.append))
    assert [t.number for t in got] == [0, 1, 2, 3]
    records = jobs.search.trial_records(tiny, spec, res)
    assert len(records) == 4
    for rec, trial in zip(records, res.trials):
        back = RunRecord.from_dict(json.loads(rec.to_json()))
        assert back.kind == "sweep" and back.settings["search"]["trial"] == trial.number
        assert back.settings["sets"] == {f"trial {trial.number}": list(trial.settings.layers)}
        assert back.scales == [trial.settings.scale] and back.mode == trial.settings.mode
    again = rerun(records[1], lm=tiny)  # the sweep engine (prefix reuse) scores it again
    row = again.result.sets[0]
    assert row.margin_delta[0] == pytest.approx(res.trials[1].margin_delta, abs=1e-4)
    assert row.fluency_delta[0] == pytest.approx(res.trials[1].fluency_delta, abs=1e-4)
    best = jobs.record(tiny, spec, res)
    assert best is None or best.settings["search"]["trial"] == res.best.number


@pytest.mark.parametrize("arch", ["llama"])
def test_chosen_trial_exports_as_vector_file_and_generation_recipe(tiny, arch, tmp_path):
    from steerdesk.core.generate import SamplingSettings
    from steerdesk.core.search import export_vectors

    vs = _vs(tiny)
    spec = jobs.SearchSpec(vectors=vs, heldout=rude4(), study=str(tmp_path / "e.db"), trials=2, batch=2,
                           neutral=NEUTRAL)
    res = jobs.run(tiny, spec)
    trial = res.trials[0]
    out = tmp_path / "chosen.safetensors"
    export_vectors(vs, trial, out, study=spec.study)
    back = load_vectors(out)
    settings = json.loads(back.metadata["steering_settings"])
    assert settings["layers"] == list(trial.settings.layers) and settings["scale"] == trial.settings.scale
    assert settings["mode"] == trial.settings.mode and settings["trial"] == trial.number
    assert torch.equal(back.directions, vs.directions)
    rec = jobs.search.export_recipe(tiny, spec, trial, "Hello there", tmp_path / "recipe.json",
                                    sampling=SamplingSettings(max_new_tokens=4))
    loaded = RunRecord.load(tmp_path / "recipe.json")
    assert loaded.kind == "generate" and loaded.steered_rows == [False, True]
    assert loaded.layers == list(trial.settings.layers) and loaded.scales == [trial.settings.scale] * len(loaded.layers)
    assert rerun(loaded, lm=tiny).reproduced
    assert rec.settings["search"]["trial"] == trial.number


# ----------------------------------------------------------------------------- acceptance, reduced

@pytest.mark.parametrize("spread_start", [True, False], ids=["spread-start", "random-start"])
@pytest.mark.parametrize("arch", ["llama"])
def test_reduced_acceptance_search_reaches_the_grid_best_within_budget(tiny, arch, tmp_path, spread_start):
    """Issue 16's acceptance, reduced to a tiny model: the exhaustive grid is its 4 layers x 5 scales
    (20 cells, mode add); the search gets 12 trials in batches of 4 over the default space (ranges of
    1-4 layers, scale 0..2 like the grid, add/clamp/project, normalize no/yes) and must reach >= 95 %
    of the grid's best margin delta within the fluency budget in at least 4 of 5 seeds. (The full
    comparison, 25 trials against 150 cells on SmolLM2, is bench/bench_search.py accept; a 20-cell grid
    leaves no room for a one-sixth budget.) The vectors are 4x the typical activation norm, so the
    margin peaks inside the scale range, as it does on real models, not at its edge. Run with the
    default depth-spread first batch (whose 4 points are 4 of the grid's 20 cells, so by itself it is
    not the test) and with Optuna's random start, where only the sampler's proposals can reach it."""
    vs = _vs(tiny, 4.0)
    scales = [0.0, 0.5, 1.0, 1.5, 2.0]
    grid = sweep(tiny, vs, rude4(), layers=list(range(NUM_LAYERS)), scales=scales, fluency_budget=0.5)
    assert grid.best is not None and grid.best["margin_delta"] > 0
    target = 0.95 * grid.best["margin_delta"]
    reached = []
    for seed in range(5):
        res = search(tiny, vs, rude4(), tmp_path / f"acc{seed}.db", trials=12, batch=4, seed=seed, fluency_budget=0.5,
                     spread_start=spread_start)
        best = res.best
        reached.append(best is not None and best.margin_delta >= target)
    assert sum(reached) >= 4, (reached, grid.best)
