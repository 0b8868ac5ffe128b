"""``steerdesk export``: convert a vector file (e.g. to a llama.cpp GGUF control vector)."""

from __future__ import annotations

import argparse
from typing import Any

NAME = "export"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers action)."""
    p: argparse.ArgumentParser = sub.add_parser(
        NAME, help="convert a vector file (e.g. to a llama.cpp GGUF control vector)")
    p.add_argument("vector")
    p.add_argument("--format", choices=["gguf", "safetensors"], default="gguf")
    p.add_argument("-o", "--output", required=True)
    return p


def run(args: argparse.Namespace) -> int:
    """Write the converted file and say which layers it holds; exit code 0."""
    from ..core.vectors import export_gguf, format_ranges, load_vectors, save_vectors

    vs = load_vectors(args.vector)
    if args.format == "gguf":
        layers = export_gguf(vs, args.output)
        skipped = [layer for layer in range(vs.num_layers) if layer not in set(layers)]
        print(f"wrote {args.output}: llama.cpp control vector with directions for layers {format_ranges(layers)}"
              + (f"; no direction for layer(s) {format_ranges(skipped)}"
                 + (" (block 0 has no slot in llama.cpp)" if 0 in skipped else "") if skipped else ""))
    else:
        save_vectors(vs, args.output)
        print(f"wrote {args.output}")
    return 0
