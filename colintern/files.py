"""File helpers every job shares: atomic writes, hashes and fingerprints, locks, complete-line counting.

Atomic means: write a temp file beside the target, fsync it, rename it over the target, fsync the directory.
A reader (or a run killed at any moment) sees the old file or the new one, never a torn one, and a failed write
removes its temp file. Files are created with the process umask (like any other file the run writes).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from colintern.errors import UserError


def note_path(err: OSError, path: str | Path) -> OSError:
    """Name the file an OSError happened on when it does not say (a failed write() does not): the one-line
    message of `colintern.cli.run_cli` then says which file filled the disk."""
    if err.filename is None:
        err.filename = str(path)
    return err


def make_output_dir(path: str | Path, flag: str) -> Path:
    """Create an output folder (and its parents); one line naming `flag` when a file is in the way or the place is
    not writable."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; choose another {flag}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{flag} {path}: part of the path is a file, not a folder; choose another {flag}") from None
    except PermissionError:
        raise UserError(f"{flag} {path}: permission denied; choose another {flag}") from None
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot create it ({err.strerror}); choose another {flag}") from None
    return folder


def display(path: str | Path) -> str:
    """A file name as one printable line: undecodable bytes as \\xNN escapes, line breaks and tabs as \\n \\t."""
    text = os.fsencode(str(path)).decode("utf-8", "backslashreplace")
    return text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def os_error_behind(err: BaseException) -> OSError | None:
    """The OSError an exception is, or was raised while handling (its __cause__/__context__ chain), or None."""
    seen = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def fsync_dir(directory: str | Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call write(f) on a temp file beside `path`, fsync, rename over `path`; the temp file never outlives a
    failure (including KeyboardInterrupt), and the previous `path` stays intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # the umask applies, as for any file
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        # torch.save's zip writer turns a full disk into RuntimeError("unexpected pos"): report the real fault.
        os_error = os_error_behind(err) if isinstance(err, Exception) else None
        if os_error is None:
            raise
        raise note_path(os_error, path) from None
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Indented, key-sorted JSON (diff-friendly), written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def file_digest(path: str | Path, algorithm: str = "sha256", chunk: int = 1 << 22) -> str:
    """Hex digest of a file's bytes, read in chunks (identifies checkpoints and data files in fingerprints)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    return file_digest(path, "sha256")


def fingerprint(obj: Any, n: int = 16) -> str:
    """Stable short hash (first n hex digits of sha256) of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def sha1_of_parts(*parts: Any) -> str:
    """sha1 over the JSON of each part, NUL-separated. Training checkpoints store these values (phase identity and
    fingerprint), so the function must not change: a resumed run compares against them."""
    h = hashlib.sha1()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: str | Path, blocking: bool = True) -> Iterator[bool]:
    """flock on path: yields True when held, False when not blocking and someone else holds it.

    The kernel releases the lock when its holder dies, so a crashed shard never blocks the others.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def count_complete_lines(path: str | Path) -> tuple[int, int]:
    """(number of newline-terminated lines, byte size of those lines) in a file; a torn last line is ignored."""
    n, size = 0, 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            n += 1
            size += len(line)
    return n, size


def byte_offset_of_line(path: str | Path, n_lines: int) -> int:
    """Byte offset where line n_lines (0-based) starts, i.e. the size of the first n_lines lines."""
    size = 0
    with open(path, "rb") as f:
        for i, line in enumerate(f):
            if i >= n_lines:
                break
            size += len(line)
    return size


def json_line(obj: object) -> str:
    """One JSON line that is valid UTF-8 whatever the file names: a byte that is not UTF-8 (held as a lone
    surrogate, as Python keeps such names) is written as its \\udcXX escape, which json.loads and os.fsencode turn
    back into the original name."""
    text = json.dumps(obj, ensure_ascii=False)
    return re.sub(r"[\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", text)
