"""Search benchmark (issue 16): acceptance versus the exhaustive grid, and batched trial scoring.

Workload: SmolLM2-135M-Instruct (float32, CPU), a bundled set split 75/25 (``Dataset.split(0.25)``:
the training part gives the mean-diff vectors, the held-out part is scored), KL on the built-in
``NEUTRAL_TEXTS``, fluency budget 0.5 nats/token.

``accept``: per dataset, the exhaustive grid (``core.sweep.sweep``, 30 layers x scales 0, 0.5, 1,
1.5, 2, mode add) and its best margin delta within the fluency budget; then ``--seeds`` searches
(``core.search.search``, 25 trials = one sixth of the grid, batches of 5, the default space: ranges
of 1-4 layers, scale 0..2, add/clamp/project, normalize no/yes; the default start batch, sampler and
refine phase unless ``--random-start`` / ``--sampler`` / ``--no-refine``), each in a fresh study. A
seed "reaches" the grid when its best margin delta within the budget is >= 95 % of the grid's.
``--batch 4`` moves the start points off layer 15, where both bundled grids peak (the stress case).

``speed``: the same 25 trial settings scored several ways, alternating in one process (``--order``;
each contender builds its own evaluator, so its time includes tokenising and the unsteered pass):

* **batched**: what the search does: 5 batches of 5 trials with the default engine
  (``Evaluator.score``, ``recorded``: the unsteered pass and the block inputs at every layer
  recorded once, then only the trials' steered tails, prefix reuse and packing);
* **batched_scorer**: 5 batches of 5, each one ``TextScorer.score`` call (full forwards; the
  search's engine before the third session);
* **batched_sweep**: 5 batches of 5, each one sweep-engine run (block inputs recorded per batch);
* **one_at_a_time**: texts and baseline once, then 25 ``TextScorer.score`` calls of one trial;
* **one_at_a_time_recorded**: the recorded engine with batches of one trial;
* **per_trial_evaluate**: ``core.evaluate.evaluate`` per trial (what an Optuna objective calling
  the public one-configuration API costs: tokenising and the baseline again for every trial).

The trial settings: ``--trials-json F`` when F exists, else those of ``--study``, else those of a
fresh 25-trial seed-0 search with the defaults on the ``neutral_rude`` held-out part (written to F).

Usage::

    nice .venv/bin/python bench/bench_search.py accept --json accept.json
    nice .venv/bin/python bench/bench_search.py speed --json speed.json
    .venv/bin/python bench/bench_search.py speed --trials-json trials.json --order batched,one_at_a_time,batched
    .venv/bin/python bench/bench_search.py accept --quick          # 1 dataset, 2 seeds, 6 layers
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCALES = [0.0, 0.5, 1.0, 1.5, 2.0]
BUDGET = 0.5


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict[str, Any]:
    import optuna
    import torch
    import transformers

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "optuna": optuna.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def setup(lm: Any, name: str, max_pairs: int | None) -> tuple[Any, Any]:
    """(vectors from the training part, held-out part) of a bundled set."""
    from steerdesk.core.datasets import load_bundled
    from steerdesk.core.extract import compute_vectors

    train, held = load_bundled(name).split(0.25)
    vs = compute_vectors(lm, train, batch_size=16)
    if max_pairs:
        held.examples = held.examples[:max_pairs]
    return vs, held


def cmd_accept(args: argparse.Namespace, lm: Any, out: dict[str, Any]) -> None:
    from steerdesk.core.evaluate import NEUTRAL_TEXTS
    from steerdesk.core.search import SearchSpace, best_within_budget, search, start_points
    from steerdesk.core.sweep import sweep

    layers = list(range(6, 12)) if args.quick else list(range(lm.info.num_layers))
    out["accept"] = []
    for name in args.datasets.split(","):
        vs, held = setup(lm, name, args.max_pairs)
        t0 = time.perf_counter()
        la = loadavg()
        prev = _previous_grid(args.grid_from, name, len(layers) * len(SCALES), len(held), vs)
        if prev is not None:  # the same grid measured by an earlier run (same vectors, same pairs)
            best, g_s, la = prev["grid_best"], prev["grid_seconds"], prev["grid_loadavg"]
            cells = {k: prev[k] for k in ("grid_margin", "grid_fluency") if k in prev}
            log(f"{name}: grid taken from {args.grid_from}")
        else:
            grid = sweep(lm, vs, held, layers=layers, scales=SCALES, fluency_budget=BUDGET)
            g_s = time.perf_counter() - t0
            best = grid.best
            cells = {"grid_margin": grid.margin_delta, "grid_fluency": grid.fluency_delta}
        assert best is not None
        log(f"{name}: grid {len(layers)}x{len(SCALES)} in {g_s:.0f} s, best L{best['layer']} x{best['scale']}: "
            f"margin {best['margin_delta']:+.4f}, fluency {best['fluency_delta']:+.4f}")
        entry: dict[str, Any] = {"dataset": name, "vector_sha256": _vector_sha(vs), "heldout_pairs": len(held),
                                 "grid_cells": len(layers) * len(SCALES),
                                 "grid_seconds": round(g_s, 1), "grid_loadavg": la, "grid_best": best, **cells, "seeds": []}
        space = None
        if args.space:
            space = SearchSpace.parse(args.space, SearchSpace.default(vs, lm.info.num_layers))
        if args.quick:
            space = SearchSpace.default(vs, lm.info.num_layers)
            space = SearchSpace(first_layer=layers[0], last_layer=layers[-1], max_span=space.max_span)
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as tmp:
                la = loadavg()
                t0 = time.perf_counter()
                study = Path(args.keep) / f"{name}-seed{seed}.db" if args.keep else Path(tmp) / "study.db"
                res = search(lm, vs, held, study, trials=args.trials, batch=args.batch, seed=seed,
                             space=space, neutral=list(NEUTRAL_TEXTS), fluency_budget=BUDGET, sampler=args.sampler,
                             refine=False if args.no_refine else None,
                             spread_start=not args.random_start)
                s_s = time.perf_counter() - t0
            b = res.best
            starts = start_points(res.space, min(max(args.batch, 4), args.trials)) if not args.random_start else []
            proposed = [t for t in res.trials if not any(t.params == p for p in starts)]
            bp = best_within_budget(proposed, res.fluency_budget)
            ratio_proposed = (bp.margin_delta / best["margin_delta"]) if bp is not None and bp.margin_delta else None
            ratio = (b.margin_delta / best["margin_delta"]) if b is not None and b.margin_delta is not None else None
            row = {"seed": seed, "space": res.space.to_dict(), "seconds": round(s_s, 1), "loadavg": la,
                   "best": b.to_dict() if b is not None else None, "ratio": ratio,
                   "reached": ratio is not None and ratio >= 0.95, "pareto_size": len(res.pareto),
                   "best_is_start_point": b is not None and any(b.params == p for p in starts),
                   "best_phase": b.phase if b is not None else None, "refine_from": res.refine_from,
                   "best_sampler_proposed": bp.to_dict() if bp is not None else None,
                   "ratio_sampler_proposed": ratio_proposed}
            entry["seeds"].append(row)
            log(f"{name} seed {seed}: {s_s:.0f} s, best {b.settings.label() if b and b.settings else None} "
                f"margin {b.margin_delta if b else None}, ratio {ratio}; without the start points {ratio_proposed}")
            if args.json:
                Path(args.json).write_text(json.dumps({**out, "partial": [entry]}, indent=1))
        entry["reached"] = sum(1 for r in entry["seeds"] if r["reached"])
        out["accept"].append(entry)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))


def _vector_sha(vs: Any) -> str:
    from steerdesk.core.sweep import vector_identity

    return str(vector_identity(vs)["directions_sha256"])


def _previous_grid(path: str | None, name: str, cells: int, pairs: int, vs: Any) -> dict[str, Any] | None:
    """A grid of an earlier ``accept`` run with the same dataset, cells, pairs and vector hash."""
    if not path:
        return None
    for entry in json.loads(Path(path).read_text()).get("accept", []) + json.loads(Path(path).read_text()).get(
            "partial", []):
        if (entry.get("dataset") == name and entry.get("grid_cells") == cells and entry.get("heldout_pairs") == pairs
                and entry.get("vector_sha256") == _vector_sha(vs)):
            return dict(entry)
    return None


def _speed_settings(args: argparse.Namespace, lm: Any, vs: Any, held: Any, neutral: list[str]) -> tuple[list[Any], str]:
    """The trial settings to time, and where they come from (see ``--study`` / ``--trials-json``)."""
    from steerdesk.core.search import SearchSpace, load_result, search, settings_for

    if args.trials_json and Path(args.trials_json).exists():  # the settings of an earlier run
        obj = json.loads(Path(args.trials_json).read_text())
        space = SearchSpace.from_dict(obj["space"])
        return [settings_for(p, space, vs) for p in obj["params"]][:args.trials], f"{args.trials_json} ({obj['source']})"
    if args.study:  # the trials of an earlier search (e.g. accept --keep), read without writing
        res = load_result(args.study, vs)
        source = f"study {args.study}"
    else:  # a fresh seed-0 search with the defaults (default space and engine, depth-spread start)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = search(lm, vs, held, Path(tmp) / "study.db", trials=args.trials, batch=args.batch, seed=0,
                         neutral=neutral)
            log(f"seed-0 search: {time.perf_counter() - t0:.1f} s")
        source = (f"a fresh {args.trials}-trial seed-0 search (batches of {args.batch}, default space, "
                  "neutral_rude held-out part)")
    trials = [t for t in res.trials if t.settings is not None][:args.trials]
    if args.trials_json:
        Path(args.trials_json).write_text(json.dumps({"source": source, "space": res.space.to_dict(),
                                                      "params": [t.params for t in trials],
                                                      "settings": [t.settings.to_dict() for t in trials if t.settings]},
                                                     indent=1) + "\n")
    return [t.settings for t in trials if t.settings is not None], source


def cmd_speed(args: argparse.Namespace, lm: Any, out: dict[str, Any]) -> None:
    from steerdesk.core.evaluate import NEUTRAL_TEXTS, evaluate
    from steerdesk.core.search import Evaluator

    vs, held = setup(lm, "neutral_rude", args.max_pairs)
    neutral = list(NEUTRAL_TEXTS)
    settings, source = _speed_settings(args, lm, vs, held, neutral)
    log(f"{len(settings)} trial settings from {source}")
    out["speed_trials"] = {"source": source, "settings": [s.to_dict() for s in settings]}
    layers = range(lm.info.num_layers)
    recordings: list[dict[str, Any]] = []

    def batches(engine: str, size: int) -> list[tuple[float, float, float]]:
        ev = Evaluator.prepare(lm, vs, held, neutral=neutral, engine=engine, layers=layers)
        got: list[tuple[float, float, float]] = []
        for i in range(0, len(settings), size):
            got.extend(ev.score(settings[i:i + size]))
        rec = ev.recording
        if rec is not None:
            recordings.append({"engine": engine, "path": rec.path, "packed": rec.packed is not None,
                               "recorded_layers": rec.recorded,
                               "recorded_bytes": sum(c.nbytes() for c in rec.caps.values())})
        return got

    def per_trial_evaluate() -> list[tuple[float, float, float]]:
        got = []
        for s in settings:
            e = evaluate(lm, held, s.steers(vs), neutral=neutral)
            got.append((e.margin_delta, e.kl if e.kl is not None else float("nan"), e.fluency_delta))
        return got

    fns = {
        # what the search does: the default engine (recorded once per search), batches of --batch
        "batched": lambda: batches("recorded", args.batch),
        "batched_scorer": lambda: batches("scorer", args.batch),  # one TextScorer.score call per batch
        "batched_sweep": lambda: batches("sweep", args.batch),  # one Sweeper run per batch
        "one_at_a_time": lambda: batches("scorer", 1),  # shared texts and baseline, 25 calls of 1 trial
        "one_at_a_time_recorded": lambda: batches("recorded", 1),  # the recorded engine, batches of 1
        "per_trial_evaluate": per_trial_evaluate,  # core.evaluate.evaluate per trial (the naive loop)
    }
    order = args.order.split(",")
    unknown = [n for n in order if n not in fns]
    if unknown:
        raise SystemExit(f"unknown --order entries {unknown}; use {', '.join(fns)}")
    runs: list[dict[str, Any]] = []
    results: dict[str, list[tuple[float, float, float]]] = {}
    for name in order:
        la = loadavg()
        c0, t0 = time.process_time(), time.perf_counter()
        results[name] = fns[name]()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        runs.append({"what": name, "wall": round(wall, 2), "cpu": round(cpu, 2), "loadavg": la,
                     "loadavg_end": loadavg()})
        log(f"{name}: {wall:.1f} s wall, {cpu:.1f} s CPU (load {la} -> {runs[-1]['loadavg_end']})")
        if args.json:
            Path(args.json).write_text(json.dumps({**out, "speed_runs": runs, "recordings": recordings}, indent=1))
    names = list(dict.fromkeys(order))
    mean = {n: {k: round(sum(r[k] for r in runs if r["what"] == n) / sum(1 for r in runs if r["what"] == n), 2)
                for k in ("cpu", "wall")} for n in names}
    ref = "batched" if "batched" in names else names[0]
    exact = "per_trial_evaluate" if "per_trial_evaluate" in names else names[0]
    out["speed"] = {
        "runs": runs, "trials": len(settings), "batch": args.batch, "recordings": recordings, "mean": mean,
        "reference": ref,
        "cpu_ratio": {n: round(mean[n]["cpu"] / mean[ref]["cpu"], 3) for n in names if n != ref},
        "wall_ratio": {n: round(mean[n]["wall"] / mean[ref]["wall"], 3) for n in names if n != ref},
        "max_abs_diff_vs": exact,
        "max_abs_diff": {n: max(abs(x - y) for a, c in zip(results[n], results[exact]) for x, y in zip(a, c))
                         for n in names if n != exact},
    }
    log(f"CPU time / {ref}'s: {out['speed']['cpu_ratio']}; wall / {ref}'s: {out['speed']['wall_ratio']}; "
        f"max |diff| vs {exact}: {out['speed']['max_abs_diff']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["accept", "speed"])
    ap.add_argument("--datasets", default="neutral_rude,formal_casual")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--trials", type=int, default=25)
    ap.add_argument("--batch", type=int, default=5)
    ap.add_argument("--max-pairs", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="one dataset, 2 seeds, 6 layers, 8 pairs (smoke run)")
    ap.add_argument("--json", help="write every number here (updated as it goes)")
    ap.add_argument("--sampler", default=None, help="accept: the search's sampler (default: the product's)")
    ap.add_argument("--space", help="accept: search space overrides (SearchSpace.parse), e.g. 'modes=add;normalize=no'")
    ap.add_argument("--no-refine", action="store_true", help="accept: searches without the refine phase")
    ap.add_argument("--random-start", action="store_true",
                    help="accept: Optuna's random first batch instead of the default depth-spread start points")
    ap.add_argument("--keep", metavar="DIR", help="accept: keep each search's study file in DIR")
    ap.add_argument("--order", default="batched,one_at_a_time,per_trial_evaluate,batched,one_at_a_time",
                    help="speed: contenders in run order (batched = the search's default engine, batched_scorer, "
                         "batched_sweep, one_at_a_time, one_at_a_time_recorded, per_trial_evaluate)")
    ap.add_argument("--study", help="speed: take the 25 trial settings from this study (read-only)")
    ap.add_argument("--trials-json", help="speed: read the trial settings from this file; when it does not exist, "
                                          "write the ones used (from --study or a fresh seed-0 search) to it")
    ap.add_argument("--grid-from", help="reuse the grid of an earlier accept run's JSON (same vectors and pairs)")
    args = ap.parse_args()
    if args.quick:
        args.datasets, args.seeds, args.max_pairs = args.datasets.split(",")[0], min(args.seeds, 2), 8

    import torch

    from steerdesk.core.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(device="cpu", dtype="float32")
    out: dict[str, Any] = {"machine": machine(), "model": lm.info.name, "args": vars(args)}
    log(f"machine: {out['machine']}")
    if args.what == "accept":
        cmd_accept(args, lm, out)
    else:
        cmd_speed(args, lm, out)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
