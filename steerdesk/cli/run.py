"""``steerdesk run``: re-run a recorded generation, computation or sweep (a JSON recipe)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

NAME = "run"
OUTPUTS = {"output": (".safetensors", ".gguf", ".json")}
"""Files this command writes and the endings their formats go with (checked before any work; the
recipe's kind narrows the ending, see ``jobs.rerun``)."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers action)."""
    p: argparse.ArgumentParser = sub.add_parser(
        NAME, help="re-run a recorded generation, computation or sweep (a JSON recipe)")
    p.add_argument("recipe", help="recipe JSON (written by --record or the window's history)")
    p.add_argument("--model", "-m", help="load this model instead of the recorded one")
    p.add_argument("--device", help="device (default: the recorded one when it is the CPU, else auto)")
    p.add_argument("--allow-changes", action="store_true",
                   help="re-run even if the dataset, vector file or chat template changed")
    p.add_argument("-o", "--output", help="write the recomputed vectors / sweep result here")
    p.add_argument("--json", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    """Re-run the recipe (the ``rerun`` job), print its outputs and whether they reproduce the
    recorded ones; exit code 0."""
    from .. import jobs
    from ..core.records import RunRecord
    from ..core.sweep_result import format_table
    from .common import say_loading  # prints the load's messages; no counts (the re-run's are not shown either)

    recipe = RunRecord.load(args.recipe)
    if args.model:
        recipe.model = args.model
    streaming = recipe.kind == "generate" and not args.json and len(recipe.prompts) == 1

    def on_text(row: int, chunk: str) -> None:
        sys.stdout.write(chunk)
        sys.stdout.flush()

    spec = jobs.RerunSpec(recipe=recipe, device=args.device, allow_changes=args.allow_changes, output=args.output)
    out = jobs.rerun.run(None, spec, jobs.JobContext(on_progress=say_loading, on_text=on_text if streaming else None))
    if args.json:
        print(json.dumps({"kind": recipe.kind, "reproduced": out.reproduced, "differences": out.differences,
                          "record": out.record.to_dict()}, ensure_ascii=False))
        return 0
    if recipe.kind == "generate":
        if streaming:
            print()
        else:
            flags = list(recipe.steered_rows or [])
            for i, row in enumerate(out.record.outputs["rows"]):
                which = "" if i >= len(flags) else " (steered)" if flags[i] else " (unsteered)"
                print(f"--- row {i}{which}: {recipe.prompts[i] if i < len(recipe.prompts) else ''} ---\n{row['text']}")
    elif recipe.kind == "sweep":
        print(format_table(out.result))
    elif recipe.kind in ("diagnose", "compare"):
        print(out.result.format_table())
    elif recipe.kind == "versus":
        for c in out.result.conditions:
            print(f"--- {c.name}: margin {c.margin_delta:+.3f}, fluency {c.fluency_delta:+.3f} ---\n{c.text}")
    elif recipe.kind == "grid":
        for row in out.result:
            where = "unsteered" if row.layer is None else f"layer {row.layer} x{row.scale:g}"
            print(f"--- {where}: {row.prompt} ---\n{'(no vector)' if row.text is None else row.text}")
    else:
        print(f"recomputed {out.result.num_layers} layers" + (f", wrote {args.output}" if args.output else ""))
    verdict = "reproduced the recorded outputs" if out.reproduced else "did NOT reproduce the recorded outputs"
    print(f"{recipe.kind}: {verdict}" + "".join(f"\n  - {d}" for d in out.differences))
    return 0
