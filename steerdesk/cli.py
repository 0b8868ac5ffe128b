"""Headless command line over the same core the window uses."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from .core.errors import Cancelled, SteerdeskError

log = logging.getLogger("steerdesk")


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise SteerdeskError(f"{self.prog}: {message}")


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default="default",
                   help="Hugging Face id, local folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", help="auto (bf16/fp16 on GPU, fp32 on CPU), float32, float16, bfloat16")
    p.add_argument("--device-map", default=None, help="e.g. 'auto' to spread a large model over GPUs")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model's own Python code (unsafe)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="steerdesk", description="Activation steering workbench (headless CLI).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("info", help="describe a model")
    _model_arg(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("compute", help="compute steering vectors from a contrast dataset")
    _model_arg(p)
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

    p = sub.add_parser("generate", help="generate text, optionally steered")
    _model_arg(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--system")
    p.add_argument("--vector", help="steerdesk .safetensors or llama.cpp .gguf control vector")
    p.add_argument("--layers", help="e.g. 12,15 or 10-14 (required with --vector)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="steering strength, e.g. 1.5 or -2 (negative steers away; 0 = identity)")
    p.add_argument("--mode", choices=["add", "project", "clamp"], default="add")
    p.add_argument("--normalize", action="store_true", help="scale the unit vector instead of the raw one")
    p.add_argument("--positions", choices=["all", "prompt", "generated"], default="all")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--compare", action="store_true", help="also generate unsteered, in the same batch")
    p.add_argument("--no-stream", action="store_true", help="print only when done")
    p.add_argument("--record", metavar="RECIPE", help="also write a JSON recipe of this run (see 'run')")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("sweep", help="score steering on held-out pairs over a layer x scale grid")
    _model_arg(p)
    p.add_argument("--vector", required=True, help="steerdesk .safetensors or llama.cpp .gguf control vector")
    p.add_argument("--dataset", required=True,
                   help="held-out JSONL/CSV file or bundled name (or the base .txt with --target-file)")
    p.add_argument("--target-file", help="target .txt list when --dataset is the base .txt list")
    p.add_argument("--heldout", type=float, default=0.0, metavar="F",
                   help="use only the held-out part of the dataset's split F (the rows 'compute --heldout F' "
                        "left out)")
    p.add_argument("--max-pairs", type=int, help="use at most this many pairs")
    p.add_argument("--layers", help="e.g. 0-29 or 10,14,18 (default: every layer)")
    p.add_argument("--scales", default="0,0.5,1,2",
                   help="comma-separated scales, negative ones too: --scales -2,0,2 (default 0,0.5,1,2)")
    p.add_argument("--sets", help="extra rows steering several layers at once: NAME=LAYERS;... e.g. mid=12-15")
    p.add_argument("--mode", choices=["add", "project", "clamp"], default="add")
    p.add_argument("--normalize", action="store_true", help="scale the unit vector instead of the raw one")
    p.add_argument("--positions", choices=["all", "prompt", "generated"], default="all",
                   help="steer all tokens, the prompt only, or the reply only")
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

    p = sub.add_parser("inspect", help="per-layer diagnostics of a vector file on a contrast dataset")
    p.add_argument("vector", help="steerdesk .safetensors or llama.cpp .gguf control vector")
    _model_arg(p)
    p.add_argument("--dataset", required=True, help="JSONL/CSV file or bundled name (held-out pairs recommended)")
    p.add_argument("--target-file", help="target .txt list when --dataset is the base .txt list")
    p.add_argument("--heldout", type=float, default=0.0, metavar="F",
                   help="use only the held-out part of the dataset's split F")
    p.add_argument("--read", choices=["last", "mean"], help="read position (default: the vector file's)")
    p.add_argument("--system", help="system message used when formatting examples")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print every number (incl. the layer x layer cosines)")

    p = sub.add_parser("run", help="re-run a recorded generation, computation or sweep (a JSON recipe)")
    p.add_argument("recipe", help="recipe JSON (written by --record or the window's history)")
    p.add_argument("--model", "-m", help="load this model instead of the recorded one")
    p.add_argument("--device", help="device (default: the recorded one when it is the CPU, else auto)")
    p.add_argument("--allow-changes", action="store_true",
                   help="re-run even if the dataset, vector file or chat template changed")
    p.add_argument("-o", "--output", help="write the recomputed vectors / sweep result here")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export", help="convert a vector file (e.g. to a llama.cpp GGUF control vector)")
    p.add_argument("vector")
    p.add_argument("--format", choices=["gguf", "safetensors"], default="gguf")
    p.add_argument("-o", "--output", required=True)

    sub.add_parser("datasets", help="list the bundled datasets")

    p = sub.add_parser("demo", help="run the whole workflow in the window and save a screenshot")
    p.add_argument("--screenshot", help="PNG to save the window to")
    p.add_argument("--model", default="default")
    p.add_argument("--max-new-tokens", type=int, default=48)

    p = sub.add_parser("install-desktop", help="install a desktop launcher and icons for this install")
    p.add_argument("--prefix", help="data folder (default: ~/.local/share)")
    return parser


def _load_model(args: argparse.Namespace) -> Any:
    from . import jobs

    spec = jobs.LoadSpec(spec=args.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                         trust_remote_code=args.trust_remote_code)
    return jobs.run(None, spec, jobs.JobContext(on_progress=lambda done, total, msg: print(msg, file=sys.stderr)))


def load_vectors_for(path: str, info: Any) -> Any:
    """Load a vector file and refuse it if it does not fit the model."""
    from .core.vectors import load_vectors

    vs = load_vectors(path, model_layers=info.num_layers)
    vs.check_compatible(info)
    return vs


def cmd_info(args: argparse.Namespace) -> int:
    from .core.kernels import current_choice

    lm = _load_model(args)
    info = lm.info.to_dict()
    choice = current_choice() if lm.info.cpu_linear else None
    if choice is not None:  # how the CPU kernel was chosen: forced / cached / probed, measured ratio
        info["cpu_linear_why"] = choice.describe()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k.ljust(width)}  {v}")
    return 0


def cmd_compute(args: argparse.Namespace) -> int:
    from . import jobs
    from .core.datasets import resolve_dataset
    from .core.vectors import export_gguf, save_vectors

    loaded = resolve_dataset(args.dataset, args.target_file)
    if args.heldout:
        loaded.split(args.heldout)  # checks the fraction before the model loads
    lm = _load_model(args)
    out = Path(args.output)
    spec = jobs.ComputeSpec(dataset=loaded, method=args.method, read=args.read, batch_size=args.batch_size,
                            system=args.system, heldout=args.heldout, dataset_spec=_dataset_spec(args),
                            output=str(out), model=args.model)
    bar = _progress_bar("extracting")
    result = jobs.run(lm, spec, jobs.JobContext(on_progress=lambda done, total, _msg: bar(done, total)))
    vs = result.vectors
    if out.suffix.lower() == ".gguf":
        export_gguf(vs, out)
    else:
        save_vectors(vs, out)
    if args.record:
        jobs.record(lm, spec, result).save(args.record)
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


def cmd_generate(args: argparse.Namespace) -> int:
    from . import jobs
    from .core.generate import SamplingSettings
    from .core.steering import parse_layers

    sampling = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed)
    sampling.check()
    if args.vector and not args.layers:
        raise SteerdeskError("--vector needs --layers (e.g. --layers 15 or 12-16).")
    if args.compare and not args.vector:
        raise SteerdeskError("--compare needs --vector.")
    lm = _load_model(args)
    steering = None
    if args.vector:
        vs = load_vectors_for(args.vector, lm.info)
        steering = jobs.SteeringSpec(vectors=vs, layers=tuple(parse_layers(args.layers, lm.info.num_layers)),
                                     scale=args.scale, mode=args.mode, normalize=args.normalize,
                                     positions=args.positions, vector_path=args.vector)
    spec = jobs.GenerateSpec.single(args.prompt, steering, compare=args.compare, sampling=sampling,
                                    system=args.system, model=args.model)
    stream_row = len(spec.prompts) - 1
    streaming = not args.json and not args.no_stream

    def on_text(row: int, chunk: str) -> None:
        if row == stream_row:
            sys.stdout.write(chunk)
            sys.stdout.flush()

    result = jobs.run(lm, spec, jobs.JobContext(on_text=on_text if streaming else None))
    if args.record:
        jobs.record(lm, spec, result).save(args.record)
    results = result.rows
    steered = results[-1]
    if args.json:
        obj: dict[str, Any] = {"text": steered.text, "token_ids": steered.token_ids,
                               "finish_reason": steered.finish_reason}
        if args.compare:
            u = results[0]
            obj["unsteered"] = {"text": u.text, "token_ids": u.token_ids, "finish_reason": u.finish_reason}
        print(json.dumps(obj, ensure_ascii=False))
        return 0
    if streaming:
        print()
    else:
        print(steered.text)
    if args.compare:
        print("\n--- unsteered ---")
        print(results[0].text)
    return 0


def _dataset_spec(args: argparse.Namespace) -> str | None:
    """How a recipe names the dataset again (None for two .txt lists: the rows get embedded)."""
    if args.target_file:
        return None
    path = Path(args.dataset)
    return str(path.resolve()) if path.exists() else args.dataset


def _progress_bar(label: str) -> Any:
    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\r{label} {done}/{total}", end="" if done < total else "\n", file=sys.stderr)
    return progress


def _sweep_table(result: Any) -> str:
    """Margin deltas, one row per layer (set): ``steerdesk.core.sweep.format_table``."""
    from .core.sweep import format_table

    return format_table(result)


def cmd_sweep(args: argparse.Namespace) -> int:
    from . import jobs
    from .core.datasets import parse_lines, resolve_dataset
    from .core.datasets import _read_text  # noqa: PLC2701 - same error messages as dataset files
    from .core.evaluate import NEUTRAL_TEXTS
    from .core.steering import parse_layers
    from .core.sweep import heatmap_png, parse_scales, parse_sets

    scales = parse_scales(args.scales)
    if not 0.0 <= args.heldout < 1.0:
        raise SteerdeskError("--heldout must be in [0, 1).")
    if args.max_pairs is not None and args.max_pairs < 1:
        raise SteerdeskError("--max-pairs must be at least 1.")
    if args.fluency_budget < 0:
        raise SteerdeskError("--fluency-budget must be >= 0.")
    if not Path(args.vector).is_file():
        raise SteerdeskError(f"Vector file not found: {args.vector}")
    loaded = resolve_dataset(args.dataset, args.target_file)
    held = loaded.split(args.heldout)[1] if args.heldout else loaded
    neutral = None
    if args.kl_texts:
        neutral = parse_lines(_read_text(Path(args.kl_texts)))
        if not neutral:
            raise SteerdeskError(f"{args.kl_texts} holds no text.")
    elif args.kl:
        neutral = list(NEUTRAL_TEXTS)
    lm = _load_model(args)
    vs = load_vectors_for(args.vector, lm.info)
    n = lm.info.num_layers
    layers = parse_layers(args.layers, n) if args.layers else list(range(n))
    sets = parse_sets(args.sets, n) if args.sets else None
    spec = jobs.SweepSpec(vectors=vs, heldout=held, layers=tuple(layers), scales=tuple(scales),
                          sets={k: tuple(v) for k, v in sets.items()} if sets else None, mode=args.mode,
                          normalize=args.normalize, positions=args.positions, fluency_budget=args.fluency_budget,
                          neutral=tuple(neutral) if neutral else None, system=args.system, max_pairs=args.max_pairs,
                          batch_size=args.batch_size, max_rows=args.max_rows, prefix_reuse=not args.no_prefix_reuse,
                          vector_path=str(Path(args.vector).resolve()), dataset=loaded,
                          dataset_spec=_dataset_spec(args), heldout_fraction=args.heldout, model=args.model)
    bar = _progress_bar("sweep")
    result = jobs.run(lm, spec, jobs.JobContext(on_progress=lambda done, total, _msg: bar(done, total)))
    result.save(args.output)
    if args.png:
        heatmap_png(result, args.png)
    if args.record:
        jobs.record(lm, spec, result).save(args.record)
    if args.json:
        print(json.dumps({"output": args.output, "png": args.png, "best": result.best, "baseline": result.baseline,
                          "seconds": result.seconds, "path": result.path}))
    else:
        print(_sweep_table(result))
        print(f"wrote {args.output}" + (f" and {args.png}" if args.png else "")
              + f" in {result.seconds:.1f} s")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import jobs
    from .core.datasets import resolve_dataset

    if not 0.0 <= args.heldout < 1.0:
        raise SteerdeskError("--heldout must be in [0, 1).")
    if not Path(args.vector).is_file():
        raise SteerdeskError(f"Vector file not found: {args.vector}")
    ds = resolve_dataset(args.dataset, args.target_file)
    if args.heldout:
        ds = ds.split(args.heldout)[1]
    lm = _load_model(args)
    vs = load_vectors_for(args.vector, lm.info)
    bar = _progress_bar("reading")
    diag = jobs.run(lm, jobs.DiagnoseSpec(vectors=vs, dataset=ds, read=args.read, system=args.system,
                                          batch_size=args.batch_size),
                    jobs.JobContext(on_progress=lambda done, total, _msg: bar(done, total)))
    if args.json:
        print(json.dumps(diag.to_dict()))
    else:
        print(diag.format_table())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .core.records import RunRecord, rerun

    recipe = RunRecord.load(args.recipe)
    if args.model:
        recipe.model = args.model
    streaming = recipe.kind == "generate" and not args.json and len(recipe.prompts) == 1

    def on_text(row: int, chunk: str) -> None:
        sys.stdout.write(chunk)
        sys.stdout.flush()

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr)

    out = rerun(recipe, device=args.device, allow_changes=args.allow_changes, output=args.output,
                progress=progress, on_text=on_text if streaming else None)
    if args.json:
        print(json.dumps({"kind": recipe.kind, "reproduced": out.reproduced, "differences": out.differences,
                          "record": out.record.to_dict()}, ensure_ascii=False))
        return 0
    if recipe.kind == "generate":
        if streaming:
            print()
        else:
            for i, row in enumerate(out.record.outputs["rows"]):
                print(f"--- row {i} ---\n{row['text']}")
    elif recipe.kind == "sweep":
        print(_sweep_table(out.result))
    else:
        print(f"recomputed {out.result.num_layers} layers" + (f", wrote {args.output}" if args.output else ""))
    verdict = "reproduced the recorded outputs" if out.reproduced else "did NOT reproduce the recorded outputs"
    print(f"{recipe.kind}: {verdict}" + "".join(f"\n  - {d}" for d in out.differences))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .core.vectors import export_gguf, load_vectors, save_vectors

    vs = load_vectors(args.vector)
    if args.format == "gguf":
        from .core.vectors import _ranges

        layers = export_gguf(vs, args.output)
        skipped = [layer for layer in range(vs.num_layers) if layer not in set(layers)]
        print(f"wrote {args.output}: llama.cpp control vector with directions for layers {_ranges(layers)}"
              + (f"; no direction for layer(s) {_ranges(skipped)}" + (" (block 0 has no slot in llama.cpp)"
                                                                      if 0 in skipped else "") if skipped else ""))
    else:
        save_vectors(vs, args.output)
        print(f"wrote {args.output}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from .core.datasets import bundled_datasets, load_bundled

    for name in sorted(bundled_datasets()):
        print(f"{name}  ({len(load_bundled(name))} pairs)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .ui.demo import run_demo

    return run_demo(args.screenshot, model=args.model, max_new_tokens=args.max_new_tokens)


def cmd_install_desktop(args: argparse.Namespace) -> int:
    from .desktop import install_desktop

    written = install_desktop(args.prefix)
    for path in written:
        print(f"wrote {path}")
    return 0


COMMANDS = {"demo": cmd_demo, "install-desktop": cmd_install_desktop,
            "info": cmd_info, "compute": cmd_compute, "generate": cmd_generate, "export": cmd_export,
            "datasets": cmd_datasets, "sweep": cmd_sweep, "inspect": cmd_inspect, "run": cmd_run}


_NEGATIVE_NUMBERS = re.compile(r"^-(?:\d|\.\d)[\d.eE+\-,;: ]*$")


def join_negative_values(argv: Sequence[str]) -> list[str]:
    """``--scales -2,0,2`` -> ``--scales=-2,0,2`` (argparse reads ``-2,0,2`` as an option).

    argparse only takes a lone ``-2`` / ``-0.5`` as a value; a negative number list, ``-.5`` or
    ``-1e-3`` after an option fails with "expected one argument". A token that starts with
    ``-`` and then a digit is never one of steerdesk's options, so it is joined to the long
    option before it. Works the same for every option that takes numbers or number lists.
    """
    out: list[str] = []
    for token in argv:
        prev = out[-1] if out else ""
        if (_NEGATIVE_NUMBERS.match(token) and prev.startswith("--") and "=" not in prev
                and prev not in _FLAG_OPTIONS):
            out[-1] = f"{prev}={token}"
        else:
            out.append(token)
    return out


def _flag_options(parser: argparse.ArgumentParser) -> set[str]:
    """Long options of every subcommand that take no value (never joined with a value)."""
    flags: set[str] = set()
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:  # noqa: SLF001 - argparse exposes no public list
            if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
                stack.extend(action.choices.values())
            elif action.nargs == 0:
                flags.update(o for o in action.option_strings if o.startswith("--"))
    return flags


_FLAG_OPTIONS: set[str] = set()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one CLI command; user errors print one line on stderr and return 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="steerdesk: %(message)s")
    try:
        parser = build_parser()
        _FLAG_OPTIONS.update(_flag_options(parser))
        args = parser.parse_args(join_negative_values(argv))
        if not args.command:
            parser.print_help()
            return 0
        return COMMANDS[args.command](args)
    except (SteerdeskError, Cancelled) as exc:  # a stop (never set by the CLI) stays one line
        if debug:
            traceback.print_exc()
        print(f"steerdesk: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("steerdesk: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line unless --debug
        if debug:
            traceback.print_exc()
        else:
            print(f"steerdesk: internal error: {type(exc).__name__}: {exc} (run with --debug for details)",
                  file=sys.stderr)
        return 1
