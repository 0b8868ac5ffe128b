"""``steerdesk demo``: run the whole workflow in the window and save a screenshot."""

from __future__ import annotations

import argparse
from typing import Any

NAME = "demo"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers action)."""
    p: argparse.ArgumentParser = sub.add_parser(NAME, help="run the whole workflow in the window and save a screenshot")
    p.add_argument("--screenshot", help="PNG to save the window to")
    p.add_argument("--model", default="default")
    p.add_argument("--max-new-tokens", type=int, default=48)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the window's demo (needs Qt); its exit code."""
    from ..ui.demo import run_demo

    return int(run_demo(args.screenshot, model=args.model, max_new_tokens=args.max_new_tokens))
