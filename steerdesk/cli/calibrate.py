"""``steerdesk calibrate``: find the CAST gate (condition layer, threshold, side) with the best F1
on a labelled condition set (the ``calibrate`` job)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..core.errors import SteerdeskError
from .common import load_model, load_vectors_for, model_arg, progress_bar

NAME = "calibrate"
OUTPUTS = {"output": (".json",)}
"""Files this command writes and the endings their formats go with (checked before any work)."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers action)."""
    p: argparse.ArgumentParser = sub.add_parser(
        NAME, help="calibrate a conditional-steering gate (condition layer x threshold, best F1)")
    model_arg(p)
    p.add_argument("--condition", required=True,
                   help="condition vector file (.safetensors); with --compute it is computed and written there")
    p.add_argument("--dataset", required=True,
                   help="condition set: JSONL of {prompt, on: true/false, split: train/heldout} or a bundled "
                        "name (e.g. cooking); calibrated on its held-out split")
    p.add_argument("--compute", action="store_true",
                   help="compute the condition vectors from the dataset's train split first")
    p.add_argument("--read", choices=["mean", "last"], default="mean",
                   help="with --compute: average the prompt's tokens or take its last token (default mean)")
    p.add_argument("--layers", help="condition layers to search, e.g. 4-20 (default: every layer)")
    p.add_argument("--thresholds", type=int, default=50, help="thresholds tried per layer (default 50)")
    p.add_argument("--system", help="system message used when formatting prompts")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default 16)")
    p.add_argument("-o", "--output", help="also write the result (best point, per-layer table, scores) as JSON")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    """Calibrate and print the best gate and the per-layer table (or JSON); exit code 0."""
    from .. import jobs
    from ..core.condition import load_condition_set
    from ..core.parsing import parse_layers
    from ..core.vectors import save_vectors

    if args.thresholds < 1:
        raise SteerdeskError("--thresholds must be at least 1.")
    dataset = load_condition_set(args.dataset)
    path = Path(args.condition)
    if not args.compute and not path.is_file():
        raise SteerdeskError(f"Condition vectors not found: {path} (add --compute to compute them there).")
    lm = load_model(args)
    conditions = None if args.compute else load_vectors_for(str(path), lm.info)
    layers = tuple(parse_layers(args.layers, lm.info.num_layers)) if args.layers else None
    spec = jobs.CalibrateSpec(dataset=dataset, conditions=conditions, read=args.read, layers=layers,
                              num_thresholds=args.thresholds, system=args.system, batch_size=args.batch_size)
    bar = progress_bar("calibrate")
    result = jobs.calibrate.run(lm, spec, jobs.JobContext(on_progress=lambda d, t, m: bar(d, t)))
    if result.computed:
        save_vectors(result.conditions, path)
    cal = result.calibration
    obj = {"condition": str(path), "dataset": dataset.name, "prompts": result.num_prompts,
           "computed": result.computed, "seconds": round(result.seconds, 3), **cal.to_json()}
    if args.output:
        full = dict(obj, layers=cal.layers, labels=[bool(x) for x in cal.labels],
                    scores=[[round(float(v), 6) for v in row] for row in cal.scores])
        Path(args.output).write_text(json.dumps(full, indent=1) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(obj))
        return 0
    op = ">" if cal.side == "above" else "<"
    print(f"best gate: layer {cal.layer}, score {op} {cal.threshold:.4f} ({cal.read}) "
          f"F1 {cal.f1:.3f}, precision {cal.precision:.3f}, recall {cal.recall:.3f} "
          f"on {result.num_prompts} prompts")
    print("layer  side   threshold      F1  precision  recall")
    for layer, t, side, f1, p, r in cal.table:
        star = " *" if layer == cal.layer else ""
        print(f"{layer:5d}  {side:5s}  {t:9.4f}  {f1:6.3f}  {p:9.3f}  {r:6.3f}{star}")
    return 0
