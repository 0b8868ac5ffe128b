"""``steerdesk bake``: write a Hugging Face checkpoint with an ``add`` steering folded into its weights.

The folder loads with plain ``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` (no steerdesk, no
remote code) and serves with vLLM or converts to GGUF (docs/scale-out.md). Bad input -- a mode
or folder that cannot be used, vectors made for another model, a full disk -- is one line on
stderr and exit code 2, and leaves no folder behind.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

NAME = "bake"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``bake`` on the subcommand action ``sub`` (from ``add_subparsers``)."""
    from .common import model_arg

    p: argparse.ArgumentParser = sub.add_parser(
        NAME, help="bake a steering into a standalone Hugging Face checkpoint folder",
        description="Fold 'add' steering into a bias of each steered block and write a checkpoint folder that "
                    "plain transformers, vLLM and convert_hf_to_gguf.py load without steerdesk.")
    model_arg(p)
    p.add_argument("--vector", required=True, help="steerdesk .safetensors or llama.cpp .gguf control vector")
    p.add_argument("--layers", required=True, help="e.g. 12,15 or 10-14")
    p.add_argument("--scale", type=float, default=1.0, help="steering strength, e.g. 1.5 or -2")
    p.add_argument("--mode", choices=["add", "project", "clamp"], default="add",
                   help="only 'add' can be baked exactly (project / clamp are refused with the reason)")
    p.add_argument("--normalize", action="store_true", help="scale the unit vector instead of the raw one")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="checkpoint folder to write")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``steerdesk bake``; raises ``SteerdeskError`` for bad input (printed as one line, exit 2)."""
    from .. import jobs
    from ..core.bake import check_out_dir, check_settings
    from ..core.parsing import parse_layers
    from .common import load_model, load_vectors_for

    # What can be refused without the model is refused before it loads.
    check_settings(args.mode)
    check_out_dir(args.output, args.force, inputs=(args.vector,))
    parse_layers(args.layers)
    lm = load_model(args)
    vs = load_vectors_for(args.vector, lm.info)
    steering = jobs.SteeringSpec(vectors=vs, layers=tuple(parse_layers(args.layers, lm.info.num_layers)),
                                 scale=args.scale, mode=args.mode, normalize=args.normalize,
                                 vector_path=str(Path(args.vector).resolve()))
    spec = jobs.BakeSpec(steering=steering, out_dir=args.output, force=args.force)

    def progress(done: int, total: int, msg: str) -> None:
        if sys.stderr.isatty():
            print(f"[{done}/{total}] {msg}", file=sys.stderr)

    result = jobs.run(lm, spec, jobs.JobContext(on_progress=progress))
    plan = result.plan
    if args.json:
        print(json.dumps({"output": str(result.out_dir), "layers": list(plan.layers), "scale": args.scale,
                          "mode": args.mode, "normalize": args.normalize,
                          "source_model_type": plan.source_model_type, "target_model_type": plan.target_model_type,
                          "re_expressed": plan.re_expressed, "bias_slot": plan.slot,
                          "exact_up_to_tokens": plan.max_tokens, "notes": list(plan.notes),
                          "max_logit_diff": result.max_logit_diff, "seconds": round(result.seconds, 2)}))
    else:
        print(result.summary())
        print(f"load it with: AutoModelForCausalLM.from_pretrained({str(result.out_dir)!r})")
    return 0
