"""The files of a search index folder and how they are checked (docs/CONTRACT.md §10, "Integrity").

Every file the index stores carries a checksum, so damage is found instead of giving other rankings in silence:
    index.json            its own sha256 in the field "checksum" (over the key-sorted JSON of every other field)
    header.json           what the index was built with (model, checkpoint, config, DPI, pool factor), written once,
                          with its own "checksum": index.json can be rebuilt from it and the segments
    seg-NNNNN/manifest.json  sha256 and size of tokens.f16 and pages.json, pages and tokens, the files it holds,
                          with its own "checksum"; index.json keeps a copy of it per segment
Checks come in two strengths:
    cheap    (every open) both JSON checksums, every file present with its recorded size, pages.json's sha256 (a
             small file), offsets and lengths that fit tokens.f16; tokens.f16 is hashed only when its mtime is not
             the one recorded when it was written (it was rewritten, or the folder copied without keeping times)
    full     (search.py verify, export, index) tokens.f16 hashed as well, and every value finite
Indexes written before checksums (format 1) get the structural checks and the finiteness check only.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from colintern.files import atomic_write_json, file_sha256

TOKENS, PAGES, MANIFEST = "tokens.f16", "pages.json", "manifest.json"


def json_checksum(obj: dict[str, Any]) -> str:
    """sha256 of the key-sorted JSON of every field but "checksum" (what a stored "checksum" field holds)."""
    body = {k: v for k, v in obj.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def write_checked_json(path: Path, obj: dict[str, Any]) -> None:
    """Write obj (atomically) with a "checksum" field added in the file (obj itself is left as it is)."""
    atomic_write_json(path, {**obj, "checksum": json_checksum(obj)})


def read_checked_json(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(the object without its "checksum" field, "") when it parses and its checksum (if any) matches, else
    (None, why not)."""
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None, "missing"
    except OSError as err:
        return None, f"unreadable ({err.strerror})"
    except (UnicodeDecodeError, ValueError):
        return None, "not valid JSON (truncated or overwritten)"
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    if "checksum" in obj and obj.pop("checksum") != json_checksum(obj):
        return None, "its checksum does not match its content (edited or damaged)"
    return obj, ""


def segment_number(name: str) -> int:
    """seg-00012 -> 12 (page uids are built from it, so they survive dropping another segment)."""
    return int(name.split("-", 1)[1])


def file_record(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"bytes": stat.st_size, "sha256": file_sha256(path), "mtime_ns": stat.st_mtime_ns}


def write_manifest(folder: Path, pages: list[dict[str, Any]], dim: int) -> dict[str, Any]:
    """manifest.json of a segment folder whose tokens.f16 and pages.json are written; returns it."""
    manifest = {"tokens": file_record(folder / TOKENS), "pages_file": file_record(folder / PAGES),
                "n_pages": len(pages), "n_tokens": sum(p["length"] for p in pages), "dim": dim,
                "files": sorted({p["file"] for p in pages})}
    write_checked_json(folder / MANIFEST, manifest)
    return manifest


def check_segment(folder: Path, record: dict[str, Any] | None, dim: int, full: bool) -> tuple[list | None, str]:
    """(the segment's pages, "") when it is intact, else (None, "FILE: what is wrong").

    `record` is index.json's copy of the manifest (None for a format-1 index). Cheap unless `full` (module doc)."""
    if not folder.is_dir():
        return None, f"{folder.name}/: the segment folder is missing"
    if record is not None:
        manifest, why = read_checked_json(folder / MANIFEST)
        if manifest is None:
            return None, f"{folder.name}/{MANIFEST}: {why}"
        if manifest != {k: v for k, v in record.items() if k != "verified_mtime_ns"}:
            return None, f"{folder.name}/{MANIFEST}: does not match what index.json recorded for this segment"
    tokens, pages_path = folder / TOKENS, folder / PAGES
    for path in (tokens, pages_path):
        if not path.is_file():
            return None, f"{folder.name}/{path.name}: missing"
    size = tokens.stat().st_size
    if record is not None:
        if size != record["tokens"]["bytes"]:
            return None, f"{folder.name}/{TOKENS}: {size} bytes, {record['tokens']['bytes']} were written " \
                         "(truncated or overwritten)"
        raw = pages_path.read_bytes()
        if hashlib.sha256(raw).hexdigest() != record["pages_file"]["sha256"]:
            return None, f"{folder.name}/{PAGES}: its sha256 is not the one recorded (truncated or edited)"
    try:
        pages = json.loads(pages_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None, f"{folder.name}/{PAGES}: not valid JSON (truncated or overwritten)"
    end = 0
    for n, page in enumerate(pages):
        if not isinstance(page, dict) or page.get("offset") != end or not isinstance(page.get("length"), int):
            return None, f"{folder.name}/{PAGES}: page entry {n + 1} is not where the previous one ends"
        end += page["length"]
    if size != end * dim * 2:
        return None, f"{folder.name}/{TOKENS}: {size} bytes, but its {len(pages)} page(s) need {end * dim * 2}"
    if record is not None and (full or tokens.stat().st_mtime_ns != verified_mtime(record)):
        if file_sha256(tokens) != record["tokens"]["sha256"]:
            return None, f"{folder.name}/{TOKENS}: its sha256 is not the one recorded (bytes changed)"
    if full and not all_finite(tokens):
        return None, f"{folder.name}/{TOKENS}: holds NaN or infinite values"
    return pages, ""


def verified_mtime(record: dict[str, Any]) -> int:
    """The tokens file's mtime when it was last hashed and found intact (at writing, or by a later full check)."""
    return int(record.get("verified_mtime_ns", record["tokens"]["mtime_ns"]))


def all_finite(tokens: Path, chunk: int = 1 << 24) -> bool:
    """Whether every float16 value of a tokens file is finite (read in chunks of `chunk` values)."""
    data = np.memmap(tokens, dtype="<f2", mode="r") if tokens.stat().st_size else np.empty(0, "<f2")
    return all(np.isfinite(data[i:i + chunk]).all() for i in range(0, len(data), chunk))


def tokens_mtime(folder: Path) -> int:
    return os.stat(folder / TOKENS).st_mtime_ns
