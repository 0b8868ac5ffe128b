"""``steerdesk install-desktop``: install a desktop launcher and icons for this install."""

from __future__ import annotations

import argparse
from typing import Any

NAME = "install-desktop"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers action)."""
    p: argparse.ArgumentParser = sub.add_parser(NAME, help="install a desktop launcher and icons for this install")
    p.add_argument("--prefix", help="data folder (default: ~/.local/share)")
    return p


def run(args: argparse.Namespace) -> int:
    """Write the launcher and icons, one line per file; exit code 0."""
    from ..desktop import install_desktop

    written = install_desktop(args.prefix)
    for path in written:
        print(f"wrote {path}")
    return 0
