"""``steerdesk generate``: generate text, optionally steered (the ``generate`` job)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..core.errors import SteerdeskError
from .common import POSITIONS_HELP, gate_from_args, load_model, load_vectors_for, model_arg, positions_arg

NAME = "generate"
OUTPUTS = {"record": (".json",)}
"""Files this command writes and the endings their formats go with (checked before any work)."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers action)."""
    p: argparse.ArgumentParser = sub.add_parser(NAME, help="generate text, optionally steered")
    model_arg(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--system")
    p.add_argument("--vector", help="steerdesk .safetensors or llama.cpp .gguf control vector")
    p.add_argument("--layers", help="e.g. 12,15 or 10-14 (required with --vector)")
    p.add_argument("--scale", type=float,
                   help="steering strength, e.g. 1.5 or -2 (negative steers away; 0 = identity; default 1)")
    p.add_argument("--mode", choices=["add", "project", "clamp"], help="default add")
    p.add_argument("--normalize", action="store_true", help="scale the unit vector instead of the raw one")
    p.add_argument("--positions", type=positions_arg, help=POSITIONS_HELP + " (default all)")
    p.add_argument("--condition", help="condition vector file: steer only prompts that open its gate "
                   "(needs --condition-layer and --threshold, e.g. from 'steerdesk calibrate')")
    p.add_argument("--condition-layer", type=int, help="the gate's layer")
    p.add_argument("--threshold", type=float, help="the gate's threshold on the CAST score (-1..1)")
    p.add_argument("--gate-side", choices=["above", "below"], default="above",
                   help="open the gate when the score is above (default) or below the threshold")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--compare", action="store_true", help="also generate unsteered, in the same batch")
    p.add_argument("--no-stream", action="store_true", help="print only when done")
    p.add_argument("--record", metavar="RECIPE", help="also write a JSON recipe of this run (see 'run')")
    p.add_argument("--json", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    """Generate (streaming the steered row unless ``--json``/``--no-stream``); exit code 0."""
    from .. import jobs
    from ..core.generate import SamplingSettings
    from ..core.parsing import parse_layers

    sampling = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed)
    sampling.check()
    ignored = [flag for flag, given in (("--seed", args.seed is not None), ("--top-p", args.top_p != 1.0)) if given]
    if sampling.greedy and ignored:
        print(f"steerdesk: note: {' and '.join(ignored)} apply to sampling (--temperature > 0); greedy decoding "
              f"(temperature 0) does not use them.", file=sys.stderr)
    if not args.prompt.strip():
        raise SteerdeskError("The prompt is empty.")
    if args.vector and not args.layers:
        raise SteerdeskError("--vector needs --layers (e.g. --layers 15 or 12-16).")
    steering_flags = [flag for flag, given in (("--layers", args.layers), ("--scale", args.scale is not None),
                                               ("--mode", args.mode is not None), ("--normalize", args.normalize),
                                               ("--positions", args.positions is not None)) if given]
    if steering_flags and not args.vector:
        raise SteerdeskError(f"{', '.join(steering_flags)} set the steering: add --vector (without it nothing is "
                             f"steered).")
    if args.compare and not args.vector:
        raise SteerdeskError("--compare needs --vector.")
    if args.condition and (args.condition_layer is None or args.threshold is None):
        raise SteerdeskError("--condition needs --condition-layer and --threshold (see 'steerdesk calibrate').")
    if args.condition and not args.vector:
        raise SteerdeskError("--condition gates steering: it needs --vector.")
    lm = load_model(args)
    gate = gate_from_args(args, lm)
    steering = None
    if args.vector:
        vs = load_vectors_for(args.vector, lm.info)
        steering = jobs.SteeringSpec(vectors=vs, layers=tuple(parse_layers(args.layers, lm.info.num_layers)),
                                     scale=1.0 if args.scale is None else args.scale, mode=args.mode or "add",
                                     normalize=args.normalize, positions=args.positions or "all",
                                     vector_path=args.vector)
    spec = jobs.GenerateSpec.single(args.prompt, steering, compare=args.compare, sampling=sampling,
                                    system=args.system, model=args.model, gate=gate)
    stream_row = len(spec.prompts) - 1
    streaming = not args.json and not args.no_stream

    def on_text(row: int, chunk: str) -> None:
        if row == stream_row:
            sys.stdout.write(chunk)
            sys.stdout.flush()

    if args.compare and not args.json:
        print("--- steered ---", flush=True)
    result = jobs.generate.run(lm, spec, jobs.JobContext(on_text=on_text if streaming else None))
    if args.record:
        jobs.generate.record(lm, spec, result).save(args.record)
    results = result.rows
    steered = results[-1]
    if args.json:
        obj: dict[str, Any] = {"text": steered.text, "token_ids": steered.token_ids,
                               "finish_reason": steered.finish_reason}
        if gate is not None:
            obj["gate"] = {"score": steered.gate_score, "open": steered.gate_open}
        if args.compare:
            u = results[0]
            obj["unsteered"] = {"text": u.text, "token_ids": u.token_ids, "finish_reason": u.finish_reason}
        print(json.dumps(obj, ensure_ascii=False))
        return 0
    if streaming:
        print()
    else:
        print(steered.text)
    if gate is not None:
        state = "open: steered" if steered.gate_open else "closed: not steered"
        print(f"[gate {state}; score {steered.gate_score:.4f}, {gate.describe()}]", file=sys.stderr)
    if args.compare:
        print("\n--- unsteered ---")
        print(results[0].text)
    return 0
