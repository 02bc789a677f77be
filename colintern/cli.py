"""The conventions every script shares: one error format, one log format, one way to run main().

- `run_cli(main, argv)`: a `UserError` (bad input the user must fix) becomes exactly one line `error: ...` on stderr
  and exit status 2, never a traceback; Ctrl-C exits 130 with one warning; argparse's exits become statuses.
- `setup_logging(verbose)`: the same timestamped format for every script, on the `colintern` logger hierarchy
  (every script logs as `colintern.<script>`); `-v` shows details.

No torch here: the plot scripts import this module and start quickly.
"""
from __future__ import annotations

import errno
import logging
import sys
from typing import Callable

from colintern.errors import UserError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATEFMT = "%H:%M:%S"
# bitsandbytes warns on every CPU import that its 4-bit CPU kernels are missing (ColIntern never runs 4-bit on a
# CPU); shown with -v only.
QUIET_LIBRARIES = ("bitsandbytes",)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (so captured and redirected stderr both work)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(verbose: bool = False, *, quiet: bool = False, default: int = logging.INFO) -> None:
    """Send the `colintern` loggers to stderr in one format: `default` level (INFO for jobs, WARNING for the plot
    scripts), DEBUG with verbose (INFO for scripts whose default is WARNING), WARNING when quiet (e.g. ranks > 0)."""
    level = logging.WARNING if quiet else (max(logging.DEBUG, default - 10) if verbose else default)
    logger = logging.getLogger("colintern")
    logger.handlers[:] = [h for h in logger.handlers if not isinstance(h, _StderrHandler)]
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt=LOG_DATEFMT))
    logger.addHandler(handler)
    logger.setLevel(level)
    for name in QUIET_LIBRARIES:  # their warnings are about features ColIntern does not use
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)


# Faults of the output location the user can fix (a full disk, no permission, a file where a folder should be).
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                 errno.EEXIST}


def output_error_message(err: OSError, out_flag: str) -> str:
    """One line for an OSError of OUTPUT_ERRNOS: what happened, to which file, and what to do."""
    where = err.filename or "an output file"
    reason = (err.strerror or str(err)).lower()
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on device while writing {where}; free space or choose another {out_flag}"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {where}: {reason}; choose another {out_flag}"
    return f"cannot write {where}: {reason} (a file stands where a folder should, or the " \
           f"reverse); choose another {out_flag}"


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None,
            out_flag: str = "output location") -> int:
    """Run a script's main(argv) and return its exit status: a UserError, or a fault of the output location
    (full disk, no permission, a file in the way; `out_flag` is the flag to change), becomes one 'error: ...' line
    on stderr and status 2; argparse's exits (--help: 0, a usage error: 2, its message printed) become statuses."""
    try:
        return main(argv) or 0
    except SystemExit as exit_:
        return 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
    except UserError as err:
        message = str(err).replace("\n", " ")  # always exactly one line
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 2
    except OSError as err:
        if err.errno not in OUTPUT_ERRNOS:
            raise  # not the user's to fix: a bug, with its traceback
        print(f"error: {output_error_message(err, out_flag)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("colintern").warning("interrupted")
        return 130
