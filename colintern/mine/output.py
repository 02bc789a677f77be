"""Mining's output: the resumable partial file (whole lines only, so a kill loses at most a line), the paths of a
sharded run's files, and the merge of the shards into the single-run file (the last shard to finish does it)."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any


from colintern.errors import UserError
from colintern.files import (atomic_write_json, byte_offset_of_line, count_complete_lines, file_lock, make_output_dir)


log = logging.getLogger("colintern.mine")


def sorted_histogram(histogram: dict[str, int]) -> dict[str, int]:
    """{number of negatives (as a JSON key): lines} in increasing number."""
    return {k: histogram[k] for k in sorted(histogram, key=int)}


def format_histogram(histogram: dict[str, int]) -> str:
    """'0: 25 lines, 3: 4 lines, 8: 134 lines'."""
    return ", ".join(f"{n}: {lines} line{'s' if lines != 1 else ''}" for n, lines in histogram.items()) or "-"


def output_paths(out: str, shard_id: int, num_shards: int) -> dict[str, Path]:
    """Where this process writes: the final file (shard file when sharded), its partial, state and meta."""
    stem = out[:-len(".jsonl")] if out.endswith(".jsonl") else out
    final = Path(out) if num_shards == 1 else Path(f"{stem}.shard-{shard_id:05d}-of-{num_shards:05d}.jsonl")
    fstem = str(final)[:-len(".jsonl")] if str(final).endswith(".jsonl") else str(final)
    return {"final": final, "partial": Path(f"{final}.partial"), "state": Path(f"{final}.partial.json"),
            "meta": Path(f"{fstem}.meta.json"), "merged": Path(out), "merged_meta": Path(f"{stem}.meta.json"),
            "emb_dir": Path(f"{stem}.pages"), "merge_lock": Path(f"{stem}.merge.lock")}


def shard_files(out: str, num_shards: int) -> list[dict[str, Path]]:
    return [output_paths(out, i, num_shards) for i in range(num_shards)]


def _merged_recall(metas: list[dict[str, Any]]) -> dict[str, Any] | None:
    recalls = [m["candidate_recall"] for m in metas if m.get("candidate_recall")]
    if not recalls:
        return None
    merged = {key: sum(r[key] for r in recalls) for key in
              ("queries", "queries_with_negatives", "exact_negatives", "candidate_hits", "negatives_hits")}
    total = merged["exact_negatives"]
    return {**merged, "k": recalls[0]["k"],
            "candidate_recall": round(merged["candidate_hits"] / total, 6) if total else None,
            "negatives_overlap": round(merged["negatives_hits"] / total, 6) if total else None}


def merge_shards(out: str, num_shards: int, keep_pages: bool) -> dict[str, Any]:
    """Join the shard files into `out` (shard order = dataset order), merge their meta, remove the parts."""
    parts = shard_files(out, num_shards)
    missing = [str(p["final"]) for p in parts if not p["final"].is_file() or not p["meta"].is_file()]
    if missing:
        raise UserError(f"cannot merge {out}: {len(missing)} of {num_shards} shards are not finished "
                        f"(first missing: {missing[0]})")
    metas = [json.loads(p["meta"].read_text()) for p in parts]
    merged = Path(out)
    tmp = Path(f"{out}.partial")
    with open(tmp, "wb") as f:
        for p in parts:
            with open(p["final"], "rb") as src:
                shutil.copyfileobj(src, f)
        f.flush()
        os.fsync(f.fileno())
    meta = dict(metas[0])
    counts = {}
    for key, value in metas[0]["counts"].items():
        if key in ("queries", "lines", "fn_filtered", "short_lines"):
            counts[key] = sum(m["counts"][key] for m in metas)
        else:
            counts[key] = value  # corpus-wide numbers are the same in every shard
    histograms = [m["counts"].get("negatives_per_line", {}) for m in metas]
    counts["negatives_per_line"] = sorted_histogram(
        {n: sum(h.get(n, 0) for h in histograms) for h in histograms for n in h})
    meta["counts"] = counts
    if meta.get("faiss"):
        meta["faiss"] = dict(meta["faiss"], deepened_queries=sum(m["faiss"]["deepened_queries"] for m in metas))
    meta["seconds"] = {key: round(max(m["seconds"][key] for m in metas), 3) for key in metas[0]["seconds"]}
    meta["shard"] = {"num_shards": num_shards, "merged": [str(p["final"]) for p in parts]}
    recall = _merged_recall(metas)
    if recall:
        meta["candidate_recall"] = recall
    meta["out_jsonl"] = str(merged)
    atomic_write_json(output_paths(out, 0, 1)["meta"], meta)
    os.replace(tmp, merged)
    for p in parts:
        for key in ("final", "meta"):
            p[key].unlink(missing_ok=True)
    store = meta.get("page_store")
    if store and not keep_pages and Path(store).is_dir():
        remove_store(Path(store))
    log.info("merged %d shards (%d lines) into %s", num_shards, counts["lines"], merged)
    return meta


def try_merge(out: str, num_shards: int, keep_pages: bool, paths: dict[str, Path]) -> dict[str, Any] | None:
    """The last shard to finish merges all of them (under a lock, so only one does); returns the merged meta."""
    meta = None
    with file_lock(paths["merge_lock"]):
        parts = shard_files(out, num_shards)
        if all(p["final"].is_file() and p["meta"].is_file() for p in parts):
            meta = merge_shards(out, num_shards, keep_pages)
    if paths["merged"].is_file():
        paths["merge_lock"].unlink(missing_ok=True)
    return meta


def remove_store(store_dir: Path) -> None:
    shutil.rmtree(store_dir, ignore_errors=True)
    try:
        store_dir.parent.rmdir()  # the --emb_dir folder, when nothing else is left in it
    except OSError:
        pass


class PartialOutput:
    """`<final>.partial` plus its state file `<final>.partial.json`: lines are appended batch by batch and fsynced,
    then the state records how many lines (and counters) are done. A resumed run checks the settings, truncates a
    half-written batch and continues; `finish` writes the meta and renames the partial to the final name."""

    def __init__(self, paths: dict[str, Path], settings: dict[str, Any], resume: bool, n_total: int):
        self.paths = paths
        self.state: dict[str, Any] = {"settings": settings, "lines": 0, "fn_filtered": 0, "short_lines": 0,
                                      "deepened": 0, "search_seconds": 0.0}
        self.resumed = False
        partial, state_file = paths["partial"], paths["state"]
        if resume and partial.is_file() and state_file.is_file():
            saved = json.loads(state_file.read_text())
            if saved.get("settings") != settings:
                diff = sorted(k for k in set(settings) | set(saved.get("settings", {}))
                              if settings.get(k) != saved.get("settings", {}).get(k))
                raise UserError(f"cannot resume {partial}: it was written with other settings "
                                f"({', '.join(diff)} differ); rerun without --resume to start over")
            n_lines, _ = count_complete_lines(partial)
            if n_lines < saved["lines"]:
                raise UserError(f"cannot resume {partial}: it has {n_lines} lines but its state says "
                                f"{saved['lines']}; rerun without --resume to start over")
            self.state = saved
            self.resumed = True
            log.info("resuming %s after %d of %d lines", partial, saved["lines"], n_total)
        elif resume:
            log.info("nothing to resume at %s: starting a new run", partial)
        make_output_dir(partial.parent, "--out_jsonl")
        keep_bytes = byte_offset_of_line(partial, self.state["lines"]) if self.resumed else 0
        with open(partial, "ab" if self.resumed else "wb") as f:
            f.truncate(keep_bytes)  # drop lines written after the last recorded batch (a crash mid-batch)
        atomic_write_json(state_file, self.state)

    @property
    def lines(self) -> int:
        return self.state["lines"]

    def append(self, out, lines: list[str], first: int, seconds: float) -> None:
        """Write lines first..first+len(lines)-1 durably, then record them in the state."""
        out.write("".join(lines).encode("utf-8"))
        out.flush()
        os.fsync(out.fileno())
        self.state["lines"] = first + len(lines)
        self.state["search_seconds"] += seconds
        atomic_write_json(self.paths["state"], self.state)

    def finish(self, meta: dict[str, Any]) -> None:
        atomic_write_json(self.paths["meta"], meta)
        os.replace(self.paths["partial"], self.paths["final"])
        self.paths["state"].unlink(missing_ok=True)
