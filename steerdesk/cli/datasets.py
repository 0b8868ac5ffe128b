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
    """Print each bundled dataset with its number of pairs; exit code 0."""
    from ..core.datasets import bundled_datasets, load_bundled

    for name in sorted(bundled_datasets()):
        print(f"{name}  ({len(load_bundled(name))} pairs)")
    return 0
