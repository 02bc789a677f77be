"""Triples files (docs/CONTRACT.md §7): {query, pos, negs} JSON lines, as mine.py writes them and train.py reads
them, read line by line with the file and line of every bad one."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


from colintern.errors import UserError
from colintern.data.report import BadRowError, SkipReport, SkippedRow
from colintern.data.datasets import clean_query


log = logging.getLogger("colintern.data.datasets")


def jsonl_objects(path: str | Path, label: str | None = None) -> Iterator[tuple[str, int, Any]]:
    """(where, line number, JSON object or BadRowError) for every non-blank line of a JSONL file, 1-based.

    Each line is decoded on its own, strictly: bytes that are not UTF-8 make that line a bad line ("not valid
    UTF-8"), never a traceback and never U+FFFD replacement characters in the data."""
    label = str(path) if label is None else label
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{label} line {number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield where, number, BadRowError(where, f"not valid UTF-8: byte 0x{raw[err.start]:02x} at byte "
                                                        f"{err.start + 1} of the line")
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                yield where, number, BadRowError(where, f"malformed JSON: {err.msg} at column {err.colno}")
                continue
            if not isinstance(obj, dict):
                obj = BadRowError(where, f"malformed JSON: expected an object, got {type(obj).__name__}")
            yield where, number, obj


@dataclass
class Triple:
    """One training example from a triples file: query, positive page path, hard-negative page paths."""

    query: str
    pos: str
    negs: list[str]
    line: int
    extra: dict[str, Any] = field(default_factory=dict)  # other keys, e.g. mine.py's "scores"


def _parse_triple(obj: dict[str, Any], where: str, line: int) -> Triple:
    """Validate one JSONL object as a triple."""
    query = clean_query(obj.get("query"), where)
    pos = obj.get("pos")
    if not isinstance(pos, str) or not pos.strip():
        raise BadRowError(where, "missing pos: expected a non-empty path string")
    negs = obj.get("negs", [])
    if not isinstance(negs, list) or not all(isinstance(n, str) and n.strip() for n in negs):
        raise BadRowError(where, "bad negs: expected a list of non-empty path strings")
    extra = {k: v for k, v in obj.items() if k not in ("query", "pos", "negs")}
    return Triple(query, pos.strip(), [n.strip() for n in negs], line, extra)


def read_triples_jsonl(path: str, strict: bool = False,
                       report: SkipReport | None = None) -> tuple[list[Triple], list[SkippedRow]]:
    """Read {"query", "pos", "negs"} lines; bad lines ("FILE line N: reason", 1-based) are reported and skipped.

    strict=True raises BadRowError on the first bad line. Blank lines are ignored. Missing "negs" means [].
    Raises UserError if the file is missing or holds no valid triple.
    """
    file = Path(path)
    if not file.is_file():
        raise UserError(f"triples file not found: {path}")
    report = report if report is not None else SkipReport(strict=strict)
    first_skip = report.count
    triples: list[Triple] = []
    for where, number, obj in jsonl_objects(file, str(path)):
        try:
            if isinstance(obj, BadRowError):
                raise obj
            triples.append(_parse_triple(obj, where, number))
        except BadRowError as err:
            if strict:
                raise
            report.add_error(err)
    skipped = report.items[first_skip:]
    if not triples:
        detail = f"; first problem: {skipped[0].where}: {skipped[0].reason}" if skipped else ""
        raise UserError(f"{path}: no valid triples ({len(skipped)} lines skipped){detail}")
    log.info("read %d triples from %s (%d lines skipped)", len(triples), path, len(skipped))
    return triples, skipped
