"""``steerdesk compute``: compute steering vectors from a contrast dataset (the ``compute`` job)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..core.optimize import OptimizeSettings
from .common import dataset_spec, load_model, model_arg, progress_bar

NAME = "compute"
OUTPUTS = {"output": (".safetensors", ".gguf"), "record": (".json",)}
"""Files this command writes and the endings their formats go with (checked before any work)."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers action)."""
    p: argparse.ArgumentParser = sub.add_parser(NAME, help="compute steering vectors from a contrast dataset")
    model_arg(p)
    p.add_argument("--dataset", required=True,
                   help="JSONL/CSV file, a bundled name (e.g. neutral_rude), or the base .txt with --target-file")
    p.add_argument("--target-file", help="target .txt list when --dataset is the base .txt list")
    p.add_argument("--method", choices=["mean-diff", "pca", "optimized"], default="mean-diff",
                   help="optimized: start from the mean difference and train the vector on the pairs "
                        "(preference loss, issue 17; needs --layers)")
    p.add_argument("--layers", help="layers to optimise, e.g. 12 or 10-14 (--method optimized only)")
    p.add_argument("--read", choices=["last", "mean"], default="last",
                   help="last real token, or mean over the reply tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--heldout", type=float, default=0.0,
                   help="fraction of pairs held out (not used for the vector)")
    p.add_argument("--system", help="system message used when formatting examples")
    optimize_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split and of the optimisation")
    p.add_argument("-o", "--output", required=True, help="output .safetensors (or .gguf)")
    p.add_argument("--record", metavar="RECIPE", help="also write a JSON recipe of this run (see 'run')")
    p.add_argument("--json", action="store_true")
    return p


def optimize_args(p: argparse.ArgumentParser) -> None:
    """Add the optimized method's settings (an argument group; ``--seed`` and ``--batch-size`` are the
    caller's) to ``p``; :func:`optimize_settings` reads them back."""
    opt = p.add_argument_group("optimized method (defaults: docs/decisions.md, 'Optimized vectors')")
    d = OptimizeSettings()
    opt.add_argument("--epochs", type=int, default=d.epochs, help=f"most epochs (default {d.epochs})")
    opt.add_argument("--patience", type=int, default=d.patience,
                     help=f"epochs without a better validation loss before stopping (default {d.patience})")
    opt.add_argument("--lr", type=float, default=d.lr,
                     help=f"Adam step relative to the mean difference's RMS component (default {d.lr})")
    opt.add_argument("--beta", type=float, default=d.beta, help=f"preference-loss beta (default {d.beta})")
    opt.add_argument("--reply-logprob", choices=["sum", "mean"], default=d.reply_logprob,
                     help=f"reply log-prob in the preference loss: summed (BiPO) or per-token mean "
                          f"(default {d.reply_logprob})")
    opt.add_argument("--kl-weight", type=float, default=d.kl_weight,
                     help=f"weight of the KL to the unsteered model on neutral text (default {d.kl_weight})")
    opt.add_argument("--max-norm", type=float, default=d.max_norm,
                     help=f"bound on |v| / |mean difference| (default {d.max_norm})")
    opt.add_argument("--val-fraction", type=float, default=d.val_fraction,
                     help=f"share of the pairs held out for early stopping (default {d.val_fraction})")


def optimize_settings(args: argparse.Namespace) -> OptimizeSettings:
    """The :class:`OptimizeSettings` of :func:`optimize_args`' options (checked: ``SteerdeskError``)."""
    settings = OptimizeSettings(beta=args.beta, lr=args.lr, kl_weight=args.kl_weight, max_norm=args.max_norm,
                                epochs=args.epochs, patience=args.patience, batch_size=args.batch_size,
                                val_fraction=args.val_fraction, seed=args.seed, reply_logprob=args.reply_logprob)
    settings.check()
    return settings


def run(args: argparse.Namespace) -> int:
    """Compute, write the vector file (and recipe), print a summary; exit code 0."""
    from .. import jobs
    from ..core.datasets import resolve_dataset
    from ..core.errors import SteerdeskError
    from ..core.optimize import MIN_PAIRS, EpochReport
    from ..core.parsing import parse_layers
    from ..core.vectors import export_gguf, save_vectors

    loaded = resolve_dataset(args.dataset, args.target_file)
    used = loaded.split(args.heldout, args.seed)[0] if args.heldout else loaded  # checks the fraction
    optimized = args.method == "optimized"
    settings = None
    if optimized:  # everything that can be refused is refused before the model loads
        if not args.layers:
            raise SteerdeskError("--method optimized trains chosen layers: add --layers (e.g. --layers 12).")
        parse_layers(args.layers)
        settings = optimize_settings(args)
        if len(used) < MIN_PAIRS:
            raise SteerdeskError(
                f"--method optimized needs at least {MIN_PAIRS} pairs to train on, {loaded.name!r} gives {len(used)}: "
                f"one is held out for validation (early stopping) and two train the vector.")
    elif args.layers:
        raise SteerdeskError("--layers applies to --method optimized; mean-diff and pca compute every layer.")
    lm = load_model(args)
    layers = tuple(parse_layers(args.layers, lm.info.num_layers)) if optimized else None
    out = Path(args.output)
    spec = jobs.ComputeSpec(dataset=loaded, method=args.method, read=args.read, batch_size=args.batch_size,
                            system=args.system, heldout=args.heldout, seed=args.seed, dataset_spec=dataset_spec(args),
                            output=str(out), model=args.model, layers=layers, optimize=settings)
    bar = progress_bar("optimizing" if optimized else "extracting")

    def epoch(report: EpochReport) -> None:
        if not args.json and isinstance(report, EpochReport):
            train = "-" if report.train_loss is None else f"{report.train_loss:.4f}"
            print(f"layer {report.layer} epoch {report.epoch}: train {train}, validation {report.val_loss:.4f}",
                  file=sys.stderr)

    ctx = jobs.JobContext(on_progress=lambda done, total, _msg: bar(done, total), on_partial=epoch)
    result = jobs.compute.run(lm, spec, ctx)
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
    if optimized:
        summary["optimize"] = json.loads(vs.metadata["optimize"])
    if args.json:
        print(json.dumps(summary))
    else:
        best = max((i for i in range(len(rel)) if rel[i] == rel[i]), key=lambda i: rel[i], default=0)
        print(f"wrote {out}: {vs.num_layers} layers x {vs.hidden_size} from {result.examples} examples "
              f"in {summary['seconds']} s (largest |v|/|h| {rel[best]:.2f} at layer {best})")
    return 0
