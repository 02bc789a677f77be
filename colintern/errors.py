"""User-facing errors: one clear line, no stack trace (scripts print them through `colintern.cli.run_cli`)."""
from __future__ import annotations


class UserError(Exception):
    """Bad input or configuration that the user must fix; CLIs print str(e) on one line and exit 2."""
