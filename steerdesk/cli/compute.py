"""``steerdesk compute``: compute steering vectors from a contrast dataset (the ``compute`` job)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import dataset_spec, load_model, model_arg, progress_bar

NAME = "compute"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers action)."""
    p: argparse.ArgumentParser = sub.add_parser(NAME, help="compute steering vectors from a contrast dataset")
    model_arg(p)
    p.add_argument("--dataset", required=True,
                   help="JSONL/CSV file, a bundled name (e.g. neutral_rude), or the base .txt with --target-file")
    p.add_argument("--target-file", help="target .txt list when --dataset is the base .txt list")
    p.add_argument("--method", choices=["mean-diff", "pca"], default="mean-diff")
    p.add_argument("--read", choices=["last", "mean"], default="last",
                   help="last real token, or mean over the reply tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--heldout", type=float, default=0.0,
                   help="fraction of pairs held out (not used for the vector)")
    p.add_argument("--system", help="system message used when formatting examples")
    p.add_argument("-o", "--output", required=True, help="output .safetensors (or .gguf)")
    p.add_argument("--record", metavar="RECIPE", help="also write a JSON recipe of this run (see 'run')")
    p.add_argument("--json", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    """Compute, write the vector file (and recipe), print a summary; exit code 0."""
    from .. import jobs
    from ..core.datasets import resolve_dataset
    from ..core.vectors import export_gguf, save_vectors

    loaded = resolve_dataset(args.dataset, args.target_file)
    if args.heldout:
        loaded.split(args.heldout)  # checks the fraction before the model loads
    lm = load_model(args)
    out = Path(args.output)
    spec = jobs.ComputeSpec(dataset=loaded, method=args.method, read=args.read, batch_size=args.batch_size,
                            system=args.system, heldout=args.heldout, dataset_spec=dataset_spec(args),
                            output=str(out), model=args.model)
    bar = progress_bar("extracting")
    result = jobs.compute.run(lm, spec, jobs.JobContext(on_progress=lambda done, total, _msg: bar(done, total)))
    vs = result.vectors
    if out.suffix.lower() == ".gguf":
        export_gguf(vs, out)
    else:
        save_vectors(vs, out)
    if args.record:
        jobs.compute.record(lm, spec, result).save(args.record)
    rel = vs.relative_strength().tolist()
    summary = {"output": str(out), "layers": vs.num_layers, "hidden_size": vs.hidden_size,
               "examples": result.examples, "seconds": round(result.seconds, 2),
               "relative_norm": [round(x, 4) for x in rel]}
    if args.json:
        print(json.dumps(summary))
    else:
        best = max(range(len(rel)), key=lambda i: rel[i])
        print(f"wrote {out}: {vs.num_layers} layers x {vs.hidden_size} from {result.examples} examples "
              f"in {summary['seconds']} s (largest |v|/|h| {rel[best]:.2f} at layer {best})")
    return 0
