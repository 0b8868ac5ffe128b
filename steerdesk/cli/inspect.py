"""``steerdesk inspect``: per-layer diagnostics of a vector file on a contrast dataset (``diagnose`` job)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..core.errors import SteerdeskError
from .common import load_model, load_vectors_for, model_arg, progress_bar

NAME = "inspect"


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
    if args.heldout:
        ds = ds.split(args.heldout)[1]
    lm = load_model(args)
    vs = load_vectors_for(args.vector, lm.info)
    bar = progress_bar("reading")
    diag = jobs.diagnose.run(lm, jobs.DiagnoseSpec(vectors=vs, dataset=ds, read=args.read, system=args.system,
                                                   batch_size=args.batch_size),
                             jobs.JobContext(on_progress=lambda done, total, _msg: bar(done, total)))
    if args.json:
        print(json.dumps(diag.to_dict()))
    else:
        print(diag.format_table())
    return 0
