"""Helpers shared by the CLI subcommands: model options, model and vector loading, progress, naming."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.models import LoadedModel, ModelInfo
from ..core.vectors import VectorSet

POSITIONS_HELP = ("tokens to steer: all, prompt, generated, first:N (the first N generated tokens), "
                  "gen:A-B or gen:A- (generated tokens A..B, 0-based, inclusive), prompt:A-B (prompt tokens A..B)")


def positions_arg(text: str) -> str:
    """argparse ``type`` for ``--positions``: the text, checked by ``core.parsing.parse_positions``.

    Raises ``argparse.ArgumentTypeError`` (argparse's one-line usage error, exit 2) for text
    that is neither a named position nor a token window.
    """
    from ..core.errors import SteerdeskError
    from ..core.parsing import parse_positions

    try:
        parse_positions(text)
    except SteerdeskError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.replace(" ", "")


def model_arg(p: argparse.ArgumentParser) -> None:
    """Add ``--model/-m``, ``--device``, ``--dtype``, ``--device-map`` and ``--trust-remote-code``."""
    p.add_argument("--model", "-m", default="default",
                   help="Hugging Face id, local folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", help="auto (bf16/fp16 on GPU, fp32 on CPU), float32, float16, bfloat16")
    p.add_argument("--device-map", default=None, help="e.g. 'auto' to spread a large model over GPUs")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model's own Python code (unsafe)")
    p.add_argument("--quantize", choices=["none", "int8", "int4"], default="none",
                   help="int8 / int4: weight-only quantised linears for faster CPU decoding (int8 ~2x, int4 in "
                        "llama.cpp's Q4_1 blocks ~2.5x), slightly different outputs")


def heldout_pairs_args(p: argparse.ArgumentParser) -> None:
    """``--vector``, ``--dataset``, ``--target-file``, ``--heldout`` and ``--max-pairs``: the inputs of
    the jobs that score a vector on held-out pairs (sweep, search)."""
    p.add_argument("--vector", required=True, help="steerdesk .safetensors or llama.cpp .gguf control vector")
    p.add_argument("--dataset", required=True,
                   help="held-out JSONL/CSV file or bundled name (or the base .txt with --target-file)")
    p.add_argument("--target-file", help="target .txt list when --dataset is the base .txt list")
    p.add_argument("--heldout", type=float, default=0.0, metavar="F",
                   help="use only the held-out part of the dataset's split F (the rows 'compute --heldout F' "
                        "left out)")
    p.add_argument("--max-pairs", type=int, help="use at most this many pairs")


def load_model(args: argparse.Namespace) -> LoadedModel:
    """Load the model the options of :func:`model_arg` name (the ``load`` job; messages on stderr).

    Raises ``SteerdeskError`` when the model cannot be found or loaded.
    """
    from .. import jobs

    spec = jobs.LoadSpec(spec=args.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                         trust_remote_code=args.trust_remote_code, quantize=args.quantize)
    return jobs.load.run(None, spec, jobs.JobContext(on_progress=say_loading))


def say_loading(done: int, total: int, message: str) -> None:
    """Print a model load's messages on stderr; the counted steps (``total`` > 0, for the window's
    progress bar) are not printed, so the CLI says what it always said ("Loading ...")."""
    if total == 0:
        print(message, file=sys.stderr)


def load_vectors_for(path: str, info: ModelInfo) -> VectorSet:
    """Load a vector file and refuse it (``SteerdeskError``) if it does not fit the model ``info``;
    a set computed on a model of another name but the same shape is used, with a note on stderr."""
    from ..core.vectors import load_vectors

    vs = load_vectors(path, model_layers=info.num_layers)
    vs.check_compatible(info)
    note = vs.other_model_note(info)
    if note:
        print(f"steerdesk: note: {path}: {note}", file=sys.stderr)
    return vs


def note_in_sample(vs: VectorSet, scored: Any) -> None:
    """Print a note on stderr when the pairs ``scored`` hold those ``vs`` was computed from."""
    note = vs.in_sample_note(scored)
    if note:
        print(f"steerdesk: note: {note}", file=sys.stderr)


def gate_from_args(args: argparse.Namespace, lm: LoadedModel) -> Any:
    """The ``ConditionGate`` of ``--condition F --condition-layer L --threshold T --gate-side S`` for
    the loaded model ``lm`` (None without ``--condition``). Raises ``SteerdeskError`` for a file that
    does not fit the model, is not a condition set, or has no direction at the layer."""
    if not args.condition:
        return None
    from ..core.condition import ConditionGate, condition_read

    cs = load_vectors_for(args.condition, lm.info)
    cs.require_layers([args.condition_layer])
    gate = ConditionGate(args.condition_layer, cs.directions[args.condition_layer], args.threshold,
                         args.gate_side, condition_read(cs))
    gate.check(lm)
    return gate


def dataset_spec(args: argparse.Namespace) -> str | None:
    """How a recipe names the dataset again (None for two .txt lists: the rows get embedded)."""
    if args.target_file:
        return None
    path = Path(args.dataset)
    return str(path.resolve()) if path.exists() else args.dataset


def progress_bar(label: str) -> Callable[[int, int], None]:
    """A ``(done, total)`` callback drawing ``label done/total`` on stderr when it is a terminal."""
    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\r{label} {done}/{total}", end="" if done < total else "\n", file=sys.stderr)
    return progress


#: Arguments that name files a run reads (checked against the outputs: none may be written over).
INPUT_ARGS = ("vector", "condition", "dataset", "target_file", "kl_texts", "recipe", "model", "study")


def check_outputs(args: argparse.Namespace, outputs: dict[str, tuple[str, ...]]) -> None:
    """Refuse, before the model loads, output files that cannot be written or would replace an input.

    ``outputs`` maps an argument name (``"output"``, ``"png"``, ...) to the file endings its format
    goes with (see :func:`steerdesk.core.fileio.check_output_file`); arguments left unset are
    skipped. Two outputs of one run may not name the same file either. Raises ``SteerdeskError``.
    """
    from ..core.errors import SteerdeskError
    from ..core.fileio import check_output_file

    inputs = tuple(str(v) for name in INPUT_ARGS if isinstance(v := getattr(args, name, None), str))
    seen: dict[Path, str] = {}
    for name, suffixes in outputs.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        flag = "-o/--output" if name == "output" else "--" + name.replace("_", "-")
        target = check_output_file(value, suffixes=suffixes, inputs=inputs, what=f"{flag} file")
        key = target.resolve()
        if key in seen:
            raise SteerdeskError(f"{seen[key]} and {flag} name the same file ({value}): give each its own.")
        seen[key] = flag
