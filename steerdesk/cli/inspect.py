"""``steerdesk inspect``: per-layer diagnostics of a vector file on a contrast dataset (``diagnose`` job);
with ``--compare``, which method steers best on the dataset's held-out pairs (``compare`` job, issue 17)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..core.errors import SteerdeskError
from ..core.method_compare import METHODS
from ..core.sweep_result import DEFAULT_BUDGET
from .common import dataset_spec, load_model, load_vectors_for, model_arg, note_in_sample, progress_bar
from .compute import optimize_args, optimize_settings

NAME = "inspect"
OUTPUTS = {"record": (".json",)}
"""Files this command writes and the endings their formats go with (checked before any work)."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers action)."""
    p: argparse.ArgumentParser = sub.add_parser(
        NAME, help="per-layer diagnostics of a vector file on a contrast dataset")
    p.add_argument("vector", help="steerdesk .safetensors or llama.cpp .gguf control vector")
    model_arg(p)
    p.add_argument("--dataset", required=True, help="JSONL/CSV file or bundled name (held-out pairs recommended)")
    p.add_argument("--target-file", help="target .txt list when --dataset is the base .txt list")
    p.add_argument("--heldout", type=float, default=0.0, metavar="F",
                   help="use only the held-out part of the dataset's split F")
    p.add_argument("--read", choices=["last", "mean"], help="read position (default: the vector file's)")
    p.add_argument("--system", help="system message used when formatting examples")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print every number (incl. the layer x layer cosines)")
    c = p.add_argument_group("--compare: mean-diff vs pca vs optimized vs prompting (needs --heldout)")
    c.add_argument("--compare", action="store_true",
                   help="compute each method from the training part, sweep each (and this file) over the same "
                        "--layers x --scales on the held-out part, and show each one's best margin delta within "
                        "--budget beside the prompt baseline (--instruction)")
    c.add_argument("--layers", help="layers compared, e.g. 12,15 or 10-14 (--compare)")
    c.add_argument("--scales", default="0.25,0.5,0.75,1,1.5,2,3", help="scales compared (--compare)")
    c.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                   help=f"fluency budget, nats/token (default {DEFAULT_BUDGET})")
    c.add_argument("--instruction", help="system-message instruction of the prompt baseline, e.g. 'Reply rudely.'")
    c.add_argument("--methods", default=",".join(METHODS), help="methods compared (default: all three)")
    c.add_argument("--seed", type=int, default=0, help="seed of the held-out split and of the optimisation")
    c.add_argument("--record", metavar="RECIPE", help="also write a JSON recipe of the comparison (see 'run')")
    optimize_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Diagnose and print the table (or every number as JSON); exit code 0."""
    from .. import jobs
    from ..core.datasets import resolve_dataset

    if not 0.0 <= args.heldout < 1.0:
        raise SteerdeskError("--heldout must be in [0, 1).")
    if not Path(args.vector).is_file():
        raise SteerdeskError(f"Vector file not found: {args.vector}")
    ds = resolve_dataset(args.dataset, args.target_file)
    if args.compare:
        return compare(args, ds)
    if args.heldout:
        ds = ds.split(args.heldout)[1]
    lm = load_model(args)
    vs = load_vectors_for(args.vector, lm.info)
    note_in_sample(vs, ds)
    bar = progress_bar("reading")
    diag = jobs.diagnose.run(lm, jobs.DiagnoseSpec(vectors=vs, dataset=ds, read=args.read, system=args.system,
                                                   batch_size=args.batch_size),
                             jobs.JobContext(on_progress=lambda done, total, _msg: bar(done, total)))
    if args.json:
        print(json.dumps(diag.to_dict()))
    else:
        print(diag.format_table())
    return 0


def compare(args: argparse.Namespace, ds: Any) -> int:
    """``--compare``: every refusal before the model loads, then the ``compare`` job; exit code 0."""
    from .. import jobs
    from ..core.optimize import EpochReport
    from ..core.parsing import parse_layers, parse_scales

    if not args.heldout:
        raise SteerdeskError("--compare scores on held-out pairs: add --heldout (e.g. --heldout 0.25).")
    if not args.layers:
        raise SteerdeskError("--compare needs the layers to compare over (e.g. --layers 12,15).")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SteerdeskError(f"Unknown method {bad[0]!r} in --methods; use {', '.join(METHODS)}.")
    parse_layers(args.layers)
    scales = tuple(parse_scales(args.scales))
    settings = optimize_settings(args)
    ds.split(args.heldout, args.seed)  # refuses a fraction that leaves no training or held-out pairs
    lm = load_model(args)
    vs = load_vectors_for(args.vector, lm.info)
    spec = jobs.CompareSpec(dataset=ds, layers=tuple(parse_layers(args.layers, lm.info.num_layers)), scales=scales,
                            heldout=args.heldout, seed=args.seed, budget=args.budget, instruction=args.instruction,
                            methods=methods, extra=((Path(args.vector).name, vs),), optimize=settings,
                            read=args.read or "last", batch_size=args.batch_size, dataset_spec=dataset_spec(args),
                            model=args.model)
    bar = progress_bar("comparing")

    def epoch(report: EpochReport) -> None:
        if not args.json and isinstance(report, EpochReport):
            print(f"optimized layer {report.layer} epoch {report.epoch}: validation {report.val_loss:.4f}",
                  file=sys.stderr)

    t0 = time.perf_counter()
    result = jobs.method_compare.run(lm, spec, jobs.JobContext(
        on_progress=lambda done, total, _msg: bar(done, total), on_partial=epoch))
    if args.record:
        jobs.method_compare.record(lm, spec, result, seconds=time.perf_counter() - t0).save(args.record)
    print(json.dumps(result.to_dict()) if args.json else result.format_table())
    return 0
