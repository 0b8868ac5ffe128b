"""``steerdesk info``: describe a model."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .common import load_model, model_arg

NAME = "info"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers action)."""
    p: argparse.ArgumentParser = sub.add_parser(NAME, help="describe a model")
    model_arg(p)
    p.add_argument("--json", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    """Print the model's info (and how the CPU kernel was chosen); exit code 0."""
    from ..core.kernels import current_choice

    lm = load_model(args)
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
