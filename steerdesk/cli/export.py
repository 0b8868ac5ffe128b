"""``steerdesk export``: convert a vector file (e.g. to a llama.cpp GGUF control vector)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..core.errors import SteerdeskError

NAME = "export"
OUTPUTS = {"output": (".gguf", ".safetensors")}
"""Files this command writes and the endings their formats go with (checked before any work)."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers action)."""
    p: argparse.ArgumentParser = sub.add_parser(
        NAME, help="convert a vector file (e.g. to a llama.cpp GGUF control vector)")
    p.add_argument("vector")
    p.add_argument("--format", choices=["gguf", "safetensors"],
                   help="gguf: a llama.cpp control vector; safetensors: steerdesk's own file (default: from the "
                        "output's ending, .gguf or .safetensors)")
    p.add_argument("-o", "--output", required=True, help="the file to write, ending in .gguf or .safetensors")
    return p


def run(args: argparse.Namespace) -> int:
    """Write the converted file and say which layers it holds; exit code 0."""
    from ..core.vectors import export_gguf, format_ranges, load_vectors, save_vectors

    fmt = Path(args.output).suffix.lower().lstrip(".")  # check_outputs allowed only gguf / safetensors
    if args.format and args.format != fmt:
        raise SteerdeskError(f"--format {args.format} writes a .{args.format} file, but the output {args.output} ends "
                             f"in .{fmt}: change one of them.")
    vs = load_vectors(args.vector)
    if fmt == "gguf":
        layers = export_gguf(vs, args.output)
        skipped = [layer for layer in range(vs.num_layers) if layer not in set(layers)]
        print(f"wrote {args.output}: llama.cpp control vector with directions for layers {format_ranges(layers)}"
              + (f"; no direction for layer(s) {format_ranges(skipped)}"
                 + (" (block 0 has no slot in llama.cpp)" if 0 in skipped else "") if skipped else ""))
    else:
        save_vectors(vs, args.output)
        print(f"wrote {args.output}")
    return 0
