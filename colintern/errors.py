"""User-facing errors: one clear line, no stack trace."""
from __future__ import annotations

import logging
import sys
from typing import Callable


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
