"""``steerdesk sweep``: score steering on held-out pairs over a layer x scale grid (the ``sweep`` job)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..core.errors import SteerdeskError
from .common import (
    POSITIONS_HELP,
    dataset_spec,
    gate_from_args,
    heldout_pairs_args,
    load_model,
    load_vectors_for,
    model_arg,
    note_in_sample,
    positions_arg,
    progress_bar,
)

NAME = "sweep"
OUTPUTS = {"output": (".json",), "png": (".png",), "record": (".json",)}
"""Files this command writes and the endings their formats go with (checked before any work)."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers action)."""
    p: argparse.ArgumentParser = sub.add_parser(NAME, help="score steering on held-out pairs over a layer x scale grid")
    model_arg(p)
    heldout_pairs_args(p)
    p.add_argument("--layers", help="e.g. 0-29 or 10,14,18 (default: every layer)")
    p.add_argument("--scales", default="0,0.5,1,2",
                   help="comma-separated scales, negative ones too: --scales -2,0,2 (default 0,0.5,1,2)")
    p.add_argument("--sets", help="extra rows steering several layers at once: NAME=LAYERS;... e.g. mid=12-15")
    p.add_argument("--mode", choices=["add", "project", "clamp"], default="add")
    p.add_argument("--normalize", action="store_true", help="scale the unit vector instead of the raw one")
    p.add_argument("--positions", type=positions_arg, default="all",
                   help=POSITIONS_HELP + "; a reply's token k counts as generated token k")
    p.add_argument("--condition", help="condition vector file: steer only the pairs whose prompt opens its gate "
                   "(needs --condition-layer and --threshold, e.g. from 'steerdesk calibrate'); closed pairs "
                   "are scored unsteered, KL on neutral texts is not gated")
    p.add_argument("--condition-layer", type=int, help="the gate's layer")
    p.add_argument("--threshold", type=float, help="the gate's threshold on the CAST score (-1..1)")
    p.add_argument("--gate-side", choices=["above", "below"], default="above",
                   help="open the gate when the score is above (default) or below the threshold")
    p.add_argument("--fluency-budget", type=float, default=0.5,
                   help="largest fluency loss (nats/token) the best cell may have (default 0.5)")
    p.add_argument("--kl", action="store_true", help="also measure KL to unsteered on built-in neutral texts")
    p.add_argument("--kl-texts", help="measure KL on these neutral texts instead (one per line)")
    p.add_argument("--system", help="system message used when formatting examples")
    p.add_argument("--batch-size", type=int, default=16, help="texts per batch (default 16)")
    p.add_argument("--max-rows", type=int, default=64, help="rows (configuration x text) per forward pass")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="run full forward passes instead of reusing the unsteered blocks below each layer")
    p.add_argument("-o", "--output", required=True, help="result JSON")
    p.add_argument("--png", help="also draw the margin heatmap to this PNG")
    p.add_argument("--record", metavar="RECIPE", help="also write a JSON recipe of this run (see 'run')")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    return p


def run(args: argparse.Namespace) -> int:
    """Sweep, write the result JSON (PNG, recipe), print the table or a JSON summary; exit code 0."""
    from .. import jobs
    from ..core.datasets import parse_lines, read_text, resolve_dataset
    from ..core.evaluate import NEUTRAL_TEXTS
    from ..core.parsing import parse_layers, parse_scales, parse_sets
    from ..core.sweep import format_table, heatmap_png

    scales = parse_scales(args.scales)
    if not 0.0 <= args.heldout < 1.0:
        raise SteerdeskError("--heldout must be in [0, 1).")
    if args.max_pairs is not None and args.max_pairs < 1:
        raise SteerdeskError("--max-pairs must be at least 1.")
    if args.fluency_budget < 0:
        raise SteerdeskError("--fluency-budget must be >= 0.")
    if not Path(args.vector).is_file():
        raise SteerdeskError(f"Vector file not found: {args.vector}")
    if args.condition and (args.condition_layer is None or args.threshold is None):
        raise SteerdeskError("--condition needs --condition-layer and --threshold (see 'steerdesk calibrate').")
    if not args.condition and (args.condition_layer is not None or args.threshold is not None):
        raise SteerdeskError("--condition-layer and --threshold set a gate: they need --condition.")
    if args.condition and not Path(args.condition).is_file():
        raise SteerdeskError(f"Condition vector file not found: {args.condition}")
    loaded = resolve_dataset(args.dataset, args.target_file)
    held = loaded.split(args.heldout)[1] if args.heldout else loaded
    neutral = None
    if args.kl_texts:
        neutral = parse_lines(read_text(Path(args.kl_texts)))
        if not neutral:
            raise SteerdeskError(f"{args.kl_texts} holds no text.")
    elif args.kl:
        neutral = list(NEUTRAL_TEXTS)
    lm = load_model(args)
    vs = load_vectors_for(args.vector, lm.info)
    note_in_sample(vs, held)
    n = lm.info.num_layers
    layers = parse_layers(args.layers, n) if args.layers else list(range(n))
    sets = parse_sets(args.sets, n) if args.sets else None
    gate = gate_from_args(args, lm)
    spec = jobs.SweepSpec(vectors=vs, heldout=held, layers=tuple(layers), scales=tuple(scales),
                          sets={k: tuple(v) for k, v in sets.items()} if sets else None, mode=args.mode,
                          normalize=args.normalize, positions=args.positions, fluency_budget=args.fluency_budget,
                          neutral=tuple(neutral) if neutral else None, system=args.system, max_pairs=args.max_pairs,
                          batch_size=args.batch_size, max_rows=args.max_rows, prefix_reuse=not args.no_prefix_reuse,
                          vector_path=str(Path(args.vector).resolve()), dataset=loaded,
                          dataset_spec=dataset_spec(args), heldout_fraction=args.heldout, model=args.model,
                          gate=gate)
    bar = progress_bar("sweep")
    result = jobs.sweep.run(lm, spec, jobs.JobContext(on_progress=lambda done, total, _msg: bar(done, total)))
    result.save(args.output)
    if args.png:
        heatmap_png(result, args.png)
    if args.record:
        jobs.sweep.record(lm, spec, result).save(args.record)
    if args.json:
        print(json.dumps({"output": args.output, "png": args.png, "best": result.best, "baseline": result.baseline,
                          "seconds": result.seconds, "path": result.path, "positions": result.settings["positions"],
                          **({"gate": {k: v for k, v in result.gate.items() if k not in ("scores", "open")}}
                             if result.gate is not None else {})}))
    else:
        print(format_table(result))
        print(f"wrote {args.output}" + (f" and {args.png}" if args.png else "")
              + f" in {result.seconds:.1f} s")
    return 0
