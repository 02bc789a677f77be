"""User-facing errors: one clear line, no stack trace."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable


class UserError(Exception):
    """Bad input or configuration that the user must fix; CLIs print str(e) on one line and exit 2."""


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a script's main(); a UserError becomes one 'error: ...' line on stderr and exit status 2."""
    try:
        return main(argv) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("colintern").warning("interrupted")
        return 130


def run_script(prog: str, parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Any],
               log: logging.Logger, argv: list[str] | None = None) -> tuple[int, Any]:
    """Parse argv, send `log` to stderr as 'PROG: LEVEL: message' (INFO with -v/--verbose, else WARNING), run.

    Returns (exit status, run's result or None): 0 after a run or --help, 2 after a usage error (argparse already
    printed it) or a UserError, printed as exactly one line 'PROG: error: ...' with no traceback.
    """
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, message already printed by argparse)
        return (0 if e.code is None else int(e.code)), None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: %(levelname)s: %(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    try:
        return 0, run(args)
    except UserError as e:
        message = str(e).replace("\n", " ")  # always exactly one line
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2, None
