"""``steerdesk datasets``: list the bundled datasets."""

from __future__ import annotations

import argparse
from typing import Any

NAME = "datasets"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers action)."""
    p: argparse.ArgumentParser = sub.add_parser(NAME, help="list the bundled datasets")
    return p


def run(args: argparse.Namespace) -> int:
    """Print each bundled dataset with its number of pairs, then each bundled condition set
    (for ``calibrate``) with its prompts; exit code 0."""
    from ..core.condition import bundled_conditions, load_condition_set
    from ..core.datasets import bundled_datasets, load_bundled

    for name in sorted(bundled_datasets()):
        print(f"{name}  ({len(load_bundled(name))} pairs)")
    for name in sorted(bundled_conditions()):
        cs = load_condition_set(name)
        held = cs.part("heldout")
        print(f"{name}  (condition set: {len(cs.prompts)} prompts, {len(cs.positives())} on-topic; "
              f"{len(held.prompts)} held out)")
    return 0
