"""Entry point: the window with no arguments, the headless CLI with a subcommand."""

from __future__ import annotations

import sys

# Printed above the command line's own --help: what the entry does besides the subcommands.
ENTRY_HELP = """\
steerdesk                 open the window (needs a display: README, "System packages")
steerdesk --self-test     check this install headless: load the model, compute, generate
steerdesk COMMAND ...     the command line below (also installed as steerdesk-cli)
"""


def main(argv: list[str] | None = None) -> int:
    import os

    # Nothing reaches the network except a model download the user asked for.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    args = sys.argv[1:] if argv is None else argv
    if "--self-test" in args:
        from .selftest import main as selftest_main

        return selftest_main(list(args))
    if args[:1] in (["-h"], ["--help"]):
        print(ENTRY_HELP)
    if args:
        from .cli import main as cli_main

        return cli_main(args)
    from .startup import refuse_without_display

    if (code := refuse_without_display()) is not None:  # one line, not Qt's abort (issue 13)
        return code
    from .ui.launch import run_gui

    return run_gui()


if __name__ == "__main__":
    raise SystemExit(main())
