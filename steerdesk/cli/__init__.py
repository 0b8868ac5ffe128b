"""Headless command line over the same jobs the window uses.

One module per subcommand (``steerdesk/cli/<name>.py``, exposing ``NAME``, ``add_parser(sub)``
and ``run(args)``), registered in :data:`SUBCOMMANDS`: a new subcommand is one module and one
entry there. Shared option and loading helpers live in :mod:`steerdesk.cli.common`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from types import ModuleType

from ..core.errors import Cancelled, SteerdeskError
from .common import check_outputs, dataset_spec, load_model, load_vectors_for, model_arg, progress_bar

log = logging.getLogger("steerdesk")

SUBCOMMANDS: tuple[str, ...] = (
    "info", "compute", "generate", "sweep", "inspect", "run", "export", "datasets", "demo", "install_desktop",
    "bake", "search", "calibrate",
)
"""Modules of :mod:`steerdesk.cli` that are subcommands, in the order ``--help`` lists them."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.split(" ", 1)[1] if " " in self.prog else ""  # "steerdesk generate" -> "generate"
        raise SteerdeskError(f"{command}: {message}" if command else message)


_model_arg = model_arg  # the name before the CLI became a package


def subcommand_modules() -> list[ModuleType]:
    """The modules of :data:`SUBCOMMANDS`, imported (each has ``NAME``, ``add_parser``, ``run``)."""
    return [importlib.import_module(f"{__name__}.{name}") for name in SUBCOMMANDS]


def build_parser() -> argparse.ArgumentParser:
    """The ``steerdesk`` parser with every subcommand of :data:`SUBCOMMANDS`."""
    parser = _Parser(prog="steerdesk", description="Activation steering workbench (headless CLI).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for module in subcommand_modules():
        module.add_parser(sub)
    return parser


def commands() -> dict[str, Callable[[argparse.Namespace], int]]:
    """Subcommand name -> its ``run(args)``."""
    return {module.NAME: module.run for module in subcommand_modules()}


_NEGATIVE_NUMBERS = re.compile(r"^-(?:\d|\.\d)[\d.eE+\-,;: ]*$")


def join_negative_values(argv: Sequence[str]) -> list[str]:
    """``--scales -2,0,2`` -> ``--scales=-2,0,2`` (argparse reads ``-2,0,2`` as an option).

    argparse only takes a lone ``-2`` / ``-0.5`` as a value; a negative number list, ``-.5`` or
    ``-1e-3`` after an option fails with "expected one argument". A token that starts with
    ``-`` and then a digit is never one of steerdesk's options, so it is joined to the long
    option before it. Works the same for every option that takes numbers or number lists.
    """
    out: list[str] = []
    for token in argv:
        prev = out[-1] if out else ""
        if (_NEGATIVE_NUMBERS.match(token) and prev.startswith("--") and "=" not in prev
                and prev not in _FLAG_OPTIONS):
            out[-1] = f"{prev}={token}"
        else:
            out.append(token)
    return out


def _flag_options(parser: argparse.ArgumentParser) -> set[str]:
    """Long options of every subcommand that take no value (never joined with a value)."""
    flags: set[str] = set()
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:  # noqa: SLF001 - argparse exposes no public list
            if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
                stack.extend(action.choices.values())
            elif action.nargs == 0:
                flags.update(o for o in action.option_strings if o.startswith("--"))
    return flags


_FLAG_OPTIONS: set[str] = set()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one CLI command; user errors print one line on stderr and return 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="steerdesk: %(message)s")
    try:
        parser = build_parser()
        _FLAG_OPTIONS.update(_flag_options(parser))
        args = parser.parse_args(join_negative_values(argv))
        if not args.command:
            parser.print_help()
            return 0
        module = {m.NAME: m for m in subcommand_modules()}[args.command]
        check_outputs(args, getattr(module, "OUTPUTS", {}))  # before any work: nothing is lost to a bad path
        return int(module.run(args))
    except (SteerdeskError, Cancelled) as exc:  # a stop (never set by the CLI) stays one line
        if debug:
            traceback.print_exc()
        print(f"steerdesk: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("steerdesk: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line unless --debug
        if debug:
            traceback.print_exc()
        else:
            print(f"steerdesk: internal error: {type(exc).__name__}: {exc} (run with --debug for details)",
                  file=sys.stderr)
        return 1


__all__ = ["SUBCOMMANDS", "build_parser", "commands", "dataset_spec", "join_negative_values", "load_model",
           "load_vectors_for", "main", "model_arg", "progress_bar", "subcommand_modules"]
