"""``steerdesk search``: find steering settings with a multi-objective Optuna search (the ``search`` job).

Margin delta on held-out pairs (up) versus KL to the unsteered model on neutral text (down), over
layer range x scale x mode x normalize; the study lives in a SQLite file (``--study``) that a later
call resumes. Writes the Pareto set as JSON (``-o``) and CSV (``--csv``), one run record per trial
(``--records``), and the chosen trial (``--pick``) as a vector file, a generation recipe and/or a
baked checkpoint folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..core.errors import SteerdeskError
from .common import (
    dataset_spec,
    heldout_pairs_args,
    load_model,
    load_vectors_for,
    model_arg,
    note_in_sample,
    progress_bar,
)

NAME = "search"
OUTPUTS = {"output": (".json",), "csv": (".csv",), "export_vector": (".safetensors", ".gguf"),
           "export_recipe": (".json",)}
"""Files this command writes and the endings their formats go with (checked before any work)."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers action)."""
    p: argparse.ArgumentParser = sub.add_parser(
        NAME, help="search layer range, scale, mode and normalize for margin vs KL (Optuna, resumable study)")
    model_arg(p)
    heldout_pairs_args(p)
    p.add_argument("--study", required=True,
                   help="SQLite study file: created, or resumed when it exists (readable with Optuna's tools)")
    p.add_argument("--trials", type=int, default=25, help="total evaluated trials the study should hold (default 25)")
    p.add_argument("--batch", type=int, default=5, help="trials proposed and scored together (default 5)")
    p.add_argument("--space", help="search space, e.g. 'layers=8-22;span=3;scale=0..2;modes=add,clamp;normalize=both' "
                                   "(default: every covered layer, span 1-4, scale 0..2, all modes, normalize no/yes; "
                                   "a resumed study keeps its own)")
    p.add_argument("--seed", type=int, help="sampler seed (default 0; a resumed study keeps its own)")
    p.add_argument("--sampler", choices=["tpe", "nsga2", "gp"], help="Optuna sampler (default tpe)")
    p.add_argument("--random-start", action="store_true",
                   help="start a new study with Optuna's random trials instead of the default first batch "
                        "(single layers spread over depth, middle scale, add)")
    p.add_argument("--no-refine", action="store_true",
                   help="a new study without the refine phase (by default about the second half of the trials is "
                        "proposed near the best trial within the fluency budget; a resumed study keeps its own)")
    p.add_argument("--fluency-budget", type=float,
                   help="largest fluency loss (nats/token) the best trial may have (default 0.5)")
    p.add_argument("--kl-texts", help="neutral texts for the KL objective, one per line (default: built-in)")
    p.add_argument("--system", help="system message used when formatting examples")
    p.add_argument("--batch-size", type=int, default=16, help="texts per scoring batch (default 16)")
    p.add_argument("--max-rows", type=int, default=64, help="rows (configuration x text) per forward pass")
    p.add_argument("-o", "--output", help="write the result (Pareto set, best, every trial) as JSON")
    p.add_argument("--csv", help="write the Pareto set as CSV")
    p.add_argument("--records", metavar="DIR",
                   help="write one run record (recipe) per trial here (default: STUDY-records next to the study)")
    p.add_argument("--no-records", action="store_true", help="do not write per-trial run records")
    p.add_argument("--pick", default="best", help="the trial to export: a trial number or 'best' (default)")
    p.add_argument("--export-vector", metavar="PATH", help="write the vectors with the picked settings in metadata")
    p.add_argument("--export-recipe", metavar="PATH",
                   help="generate --prompt with the picked settings (unsteered row first) and save the recipe")
    p.add_argument("--export-baked", metavar="DIR",
                   help="bake the picked settings into a checkpoint folder (add mode only; see 'bake')")
    p.add_argument("--prompt", default="Tell me about your weekend.", help="prompt of --export-recipe")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated for --export-recipe")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.trials < 1:
        raise SteerdeskError("--trials must be at least 1.")
    if args.batch < 1:
        raise SteerdeskError("--batch must be at least 1.")
    if not 0.0 <= args.heldout < 1.0:
        raise SteerdeskError("--heldout must be in [0, 1).")
    if args.max_pairs is not None and args.max_pairs < 1:
        raise SteerdeskError("--max-pairs must be at least 1.")
    if args.fluency_budget is not None and not args.fluency_budget >= 0:
        raise SteerdeskError("--fluency-budget must be >= 0.")
    if args.max_new_tokens < 1:
        raise SteerdeskError("--max-new-tokens must be at least 1.")
    if args.pick != "best" and not args.pick.isdigit():
        raise SteerdeskError("--pick takes a trial number or 'best'.")
    if not Path(args.vector).is_file():
        raise SteerdeskError(f"Vector file not found: {args.vector}")


def run(args: argparse.Namespace) -> int:
    """Search (or resume), write the outputs, print the Pareto front or a JSON summary; exit code 0."""
    from .. import jobs
    from ..core.datasets import parse_lines, read_text, resolve_dataset
    from ..core.evaluate import NEUTRAL_TEXTS
    from ..core.search import SearchSpace, export_vectors, read_study

    _check_args(args)
    read_study(args.study)  # an unreadable or foreign study file is refused before the model loads
    if args.export_baked:  # before the search, not after it (a folder that exists, a missing parent)
        from ..core.bake import check_out_dir

        check_out_dir(args.export_baked, False, inputs=(args.vector,))
    loaded = resolve_dataset(args.dataset, args.target_file)
    held = loaded.split(args.heldout)[1] if args.heldout else loaded
    neutral = tuple(NEUTRAL_TEXTS)
    if args.kl_texts:
        neutral = tuple(parse_lines(read_text(Path(args.kl_texts))))
        if not neutral:
            raise SteerdeskError(f"{args.kl_texts} holds no text.")
    lm = load_model(args)
    vs = load_vectors_for(args.vector, lm.info)
    note_in_sample(vs, held)
    space = None
    if args.space:
        space = SearchSpace.parse(args.space, SearchSpace.default(vs, lm.info.num_layers))
        space.check(vs, lm.info.num_layers)
    spec = jobs.SearchSpec(vectors=vs, heldout=held, study=str(args.study), trials=args.trials, batch=args.batch,
                           space=space, seed=args.seed, sampler=args.sampler, fluency_budget=args.fluency_budget,
                           neutral=neutral, system=args.system, max_pairs=args.max_pairs, batch_size=args.batch_size,
                           max_rows=args.max_rows, spread_start=not args.random_start,
                           refine=False if args.no_refine else None,
                           vector_path=str(Path(args.vector).resolve()), dataset=loaded,
                           dataset_spec=dataset_spec(args), heldout_fraction=args.heldout, model=args.model)
    bar = progress_bar("search")
    result = jobs.search.run(lm, spec, jobs.JobContext(on_progress=lambda done, total, _msg: bar(done, total)))
    if args.output:
        result.save_json(args.output)
    if args.csv:
        result.save_csv(args.csv)
    records_dir = None
    if not args.no_records:
        study = Path(args.study)
        records_dir = Path(args.records) if args.records else study.with_name(study.stem + "-records")
        records_dir.mkdir(parents=True, exist_ok=True)
        for t, rec in zip([t for t in result.trials if t.state in ("complete", "failed")],
                          jobs.search.trial_records(lm, spec, result)):
            rec.save(records_dir / f"trial-{t.number:04d}.json")
    picked = result.best if args.pick == "best" else result.trial(int(args.pick))
    exporting = args.export_vector or args.export_recipe or args.export_baked
    if exporting and (picked is None or picked.state != "complete"):
        raise SteerdeskError("No trial to export: " + ("no trial is within the fluency budget (pick one with --pick N)."
                                                      if picked is None else f"trial {picked.number} was not scored."))
    if args.export_vector and picked is not None:
        export_vectors(vs, picked, args.export_vector, study=str(args.study))
    if args.export_recipe and picked is not None:
        from ..core.generate import SamplingSettings

        jobs.search.export_recipe(lm, spec, picked, args.prompt, args.export_recipe,
                                  sampling=SamplingSettings(max_new_tokens=args.max_new_tokens))
    if args.export_baked and picked is not None:
        jobs.run(lm, jobs.search.bake_spec_for(spec, picked, args.export_baked))
    if args.json:
        best = result.best
        print(json.dumps({"study": str(args.study), "evaluated": len(result.evaluated),
                          "evaluated_now": result.evaluated_now, "stopped": result.stopped,
                          "best": best.to_dict() if best else None, "pareto": [t.to_dict() for t in result.pareto],
                          "picked": picked.number if picked else None, "output": args.output, "csv": args.csv,
                          "records": str(records_dir) if records_dir else None, "seconds": result.seconds}))
    else:
        print(result.summary())
        wrote = [p for p in (args.output, args.csv, args.export_vector, args.export_recipe, args.export_baked) if p]
        if records_dir is not None:
            wrote.append(f"{records_dir}/ ({len(result.evaluated)} records)")
        if wrote:
            print("wrote " + ", ".join(str(w) for w in wrote), file=sys.stderr)
    return 0
