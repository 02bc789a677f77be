#!/usr/bin/env python
"""Search your PDFs and images with a trained ColIntern retriever (docs/CONTRACT.md §10).

    python search.py index --ckpt outputs/train/colintern_heads_epoch2.pt --inputs manuals/ report.pdf \\
        --index outputs/index
    python search.py query --index outputs/index --k 5 "where is the warranty period?" "installation steps"
    python search.py query --index outputs/index --json --explain outputs/maps "warranty period"
    python search.py export --index outputs/index --out outputs/index.parquet
    python search.py index ... --backend qdrant --url http://localhost:6333     # also into a Qdrant server
    python search.py query --index outputs/index --backend qdrant --url http://localhost:6333 "warranty period"

index: PDFs are rendered with pypdfium2 (--dpi), images decoded; every page is encoded once with the checkpoint's
head, LoRA and formatting and stored (float16, memory-mapped) with its source file and page. Running index again
with more files encodes only the new pages; an interrupted run continues where it stopped; bad files (encrypted or
corrupt PDFs, non-images) are reported and skipped (--strict stops at the first).
query: the top --k pages of each query by exact MaxSim (the dot product for single-vector checkpoints), as a table
or --json lines {"query", "results": [{"rank", "score", "file", "page"}]}; --explain DIR draws, per result, where on
the page the query matched (docs/DESIGN.md "Similarity maps"). Large indexes: --first_stage faiss (auto above
2 M page tokens) finds candidates with FAISS and re-ranks them exactly; --check_recall says what that lost.
--backend qdrant: the pages are also kept in a Qdrant collection (--url a server or cluster, --path its embedded
local mode) and queries are answered by Qdrant's native MaxSim; the index folder stays the record.
export: every page's vectors and source as a Parquet table (file, file_bytes, page, sha256, vectors as float16;
the model, dim and pool factor in the table's metadata); a damaged index is refused.
verify: every file of the index checked against its checksum (exit 1 naming each damaged file, 0 when intact);
--repair drops damaged segments so that the next `index` encodes their pages again (`index` does so by itself).

Exit status: 0 done; 1 (index) some files or pages were skipped, each named in a warning; 1 (verify) damage found;
2 an error, or nothing could be indexed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from colintern.cli import run_cli, setup_logging  # noqa: E402
from colintern.errors import UserError  # noqa: E402
from colintern.files import display, make_output_dir  # noqa: E402

log = logging.getLogger("colintern.search")
OUT_FLAG = "--index"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ix = sub.add_parser("index", help="add PDFs and images to an index (only new pages are encoded)")
    ix.add_argument("--ckpt", default=None, help="ColIntern checkpoint (default: the base model with an untrained "
                    "head, a warning says so)")
    ix.add_argument("--model_id", default=None, help="base model (default: the checkpoint's)")
    ix.add_argument("--inputs", nargs="+", required=True, help="PDF files, image files, or folders of them")
    ix.add_argument("--index", required=True, help="index folder (created, or extended)")
    ix.add_argument("--dpi", type=int, default=None, help="PDF rendering resolution, at most 1200 (default: 150, "
                    "or the index's when extending one)")
    ix.add_argument("--pool_factor", type=int, default=None, help="hierarchical token pooling: about K times fewer "
                    "vectors per page (docs/BENCHMARKS.md measures what it keeps; no similarity maps) (default: 1, "
                    "or the index's when extending one)")
    ix.add_argument("--batch_size", type=int, default=8, help="pages per encoder batch (default: 8)")
    ix.add_argument("--segment_pages", type=int, default=64, help="pages committed at once: the unit of resume "
                    "(default: 64)")
    ix.add_argument("--strict", action="store_true", help="stop at the first bad file or page")
    ix.add_argument("--meta", action="append", default=None, metavar="KEY=VALUE", help="metadata of every file "
                    "of this run, for query --where; repeat it for more (a sidecar FILE.meta.json, a JSON object, "
                    "adds its own)")
    q = sub.add_parser("query", help="the best pages for each query")
    q.add_argument("--index", required=True, help="index folder")
    q.add_argument("--model_id", default=None, help="base model (default: the one the index records; pass it "
                   "when the index moved to a machine where that path does not exist)")
    q.add_argument("queries", nargs="*", help="query texts")
    q.add_argument("--queries_file", default=None, help="more queries, one per line (UTF-8)")
    q.add_argument("--k", type=int, default=5, help="results per query (default: 5)")
    q.add_argument("--files", default=None, metavar="GLOB", help="only pages of files whose path or name matches "
                   "this glob (exact search over them)")
    q.add_argument("--where", action="append", default=None, metavar="KEY=VALUE", help="only pages of files whose "
                   "metadata (index --meta, or FILE.meta.json) has KEY=VALUE; repeat it for more (exact search over "
                   "them)")
    q.add_argument("--json", action="store_true", help="one JSON object per query instead of a table")
    q.add_argument("--explain", default=None, metavar="DIR", help="write a similarity map (PNG) per result here")
    ex = sub.add_parser("export", help="every page's vectors and source as Parquet")
    ex.add_argument("--index", required=True, help="index folder")
    ex.add_argument("--out", required=True, help="the .parquet file to write")
    inf = sub.add_parser("info", help="what an index holds and was built with")
    inf.add_argument("--index", required=True, help="index folder")
    inf.add_argument("--json", action="store_true", help="one JSON object")
    rm = sub.add_parser("remove", help="take files out of an index (and its Qdrant collection)")
    rm.add_argument("--index", required=True, help="index folder")
    rm.add_argument("paths", nargs="+", help="indexed files, folders (every file under them) or globs")
    cp = sub.add_parser("compact", help="reclaim the space of removed and replaced pages")
    cp.add_argument("--index", required=True, help="index folder")
    ve = sub.add_parser("verify", help="check every file of an index against its checksum")
    ve.add_argument("--index", required=True, help="index folder")
    ve.add_argument("--repair", action="store_true", help="drop the damaged segments (search.py index then encodes "
                    "their pages again)")
    em = sub.add_parser("export_model", help="a checkpoint as one publishable model folder (LoRA merged)")
    em.add_argument("--ckpt", required=True, help="ColIntern checkpoint")
    em.add_argument("--model_id", default=None, help="base model (default: the checkpoint's)")
    em.add_argument("--out", required=True, help="the folder to write (new or empty); then --model_id FOLDER, or "
                    "ColIntern.from_pretrained(FOLDER), loads it")
    q.add_argument("--first_stage", choices=["auto", "exact", "faiss"], default="auto",
                   help="embedded backend: exact MaxSim against every page, or a FAISS token search whose candidates "
                   "are re-ranked exactly; auto: FAISS above 2,000,000 page tokens (default: auto)")
    q.add_argument("--candidates", type=int, default=128, help="--first_stage faiss: pages re-ranked exactly per "
                   "query (default: 128; docs/BENCHMARKS.md, Search latency, measures the trade-off)")
    q.add_argument("--nprobe", type=int, default=32, help="--first_stage faiss on a large (IVF) index: centroids per "
                   "query token whose pages are scored (default: 32)")
    q.add_argument("--token_k", type=int, default=128, help="--first_stage faiss on a small (Flat) index: nearest "
                   "page tokens per query token (default: 128)")
    q.add_argument("--faiss_factory", default="auto", help="--first_stage faiss: FAISS index_factory string; auto: "
                   "Flat up to 200,000 page tokens, else IVF<about 4 sqrt(tokens), at most 4096>,PQ32 (default: auto)")
    q.add_argument("--check_recall", action="store_true", help="also search exactly and log the recall@k of the "
                   "FAISS first stage or of Qdrant against it")
    q.add_argument("--exact_scan", action="store_true", help="--backend qdrant with --url: score every point "
                   "instead of Qdrant's HNSW graph (local mode always does)")
    for sp in (ix, q, rm):
        sp.add_argument("--backend", choices=["embedded", "qdrant"], default="embedded",
                        help="embedded: the index folder alone; qdrant: also a Qdrant collection, which answers the "
                        "queries (default: embedded)")
        sp.add_argument("--url", default=None, help="--backend qdrant: server or cluster URL, e.g. "
                        "http://localhost:6333 (API key from $QDRANT_API_KEY)")
        sp.add_argument("--path", default=None, help="--backend qdrant: folder of Qdrant's embedded local mode")
        sp.add_argument("--collection", default=None, help="--backend qdrant: collection name (default: the one "
                        "the index used before, else colintern_<index folder name>)")
    for sp in (ix, q, ex, em):
        sp.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    for sp in (ix, q, ex, ve, em, inf, rm, cp):
        sp.add_argument("-v", "--verbose", action="store_true", help="log details")
    args = p.parse_args(argv)
    for name in ("batch_size", "segment_pages", "k", "pool_factor", "candidates", "token_k", "nprobe"):
        value = getattr(args, name, 1)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    if getattr(args, "dpi", None) is not None:
        from colintern.page_index import check_dpi

        check_dpi(args.dpi)
    return args


def check_ready(args: argparse.Namespace) -> None:
    """What can be checked before a model loads (10-30 s): the checkpoint is a retrieval one, the inputs exist and
    are PDFs or images, --index is new, empty or an index, the queries are UTF-8 text."""
    from colintern.checkpoint import load_checkpoint

    if getattr(args, "ckpt", None):
        load_checkpoint(args.ckpt)  # one line for a missing, foreign or image-text checkpoint
    if args.command == "index":
        from colintern.page_index import check_new_index_folder

        check_new_index_folder(Path(args.index))
    if args.command == "query":
        args.query_texts = read_queries(args)


def index_command(args: argparse.Namespace) -> int:
    from colintern.data import SkipReport
    from colintern.device import resolve_device
    from colintern.page_index import PageIndex, find_inputs, index_pages, writer_lock
    from colintern.search_index import load_model

    files = find_inputs(args.inputs)
    check_ready(args)
    with writer_lock(args.index):
        model_id, model = load_model(args.model_id, args.ckpt, resolve_device(args.device))
        index = PageIndex.create_or_open(args.index, model_id, args.ckpt, model.config.to_dict(), args.dpi,
                                         args.pool_factor)
        for name in index.redo_files:  # files of damaged segments dropped on open: encoded again
            if not Path(name).is_file():
                log.warning("%s: its pages were in a damaged segment and the file is gone; they are no longer in "
                            "the index", display(name))
            elif Path(name) not in files:
                files.append(Path(name))
        record_file_meta(index, files, parse_pairs(args.meta, "--meta"))
        report = SkipReport(strict=args.strict, logger=log)
        todo = index.plan(files, report)
        added = index_pages(index, model, todo, report, args.batch_size, args.segment_pages,
                            show_progress=sys.stderr.isatty())
        index.done_redoing()
        index.mark_verified()
        indexed_files = {p["file"] for p in index.pages}
        if report.count and not any(str(f) in indexed_files for f in files):
            raise UserError(f"no page indexed: every input was bad ({report.summary()}); see the warnings above")
        print(f"indexed {added} new page(s) from {len(files)} file(s); {len(index.pages)} page(s) in {args.index}"
              + (f"; {report.summary()}" if report.count else ""))
        if args.backend == "qdrant":
            sync_qdrant(index, args)
    return 1 if report.count else 0


def record_file_meta(index, files: list[Path], given: dict[str, str]) -> None:
    """Each file's metadata for query --where: --meta's pairs, then its sidecar FILE.meta.json (a JSON object)
    on top; saved now when anything changed."""
    table = index.meta.setdefault("file_meta", {})
    before = json.dumps(table, sort_keys=True)
    for path in files:
        values = dict(given)
        sidecar = Path(f"{path}.meta.json")
        if sidecar.is_file():
            try:
                extra = json.loads(sidecar.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as err:
                raise UserError(f"{display(sidecar)}: not a readable JSON object ({err})") from None
            if not isinstance(extra, dict):
                raise UserError(f"{display(sidecar)}: expected a JSON object of KEY: VALUE")
            values.update({str(k): str(v) for k, v in extra.items()})
        if values:
            table[str(path)] = {**table.get(str(path), {}), **values}
    if json.dumps(table, sort_keys=True) != before:
        index.save_meta()


def sync_qdrant(index, args: argparse.Namespace) -> None:
    from colintern.qdrant_store import QdrantPages

    store = QdrantPages(index, args.url, args.path, args.collection)
    try:
        sent = store.sync(show_progress=sys.stderr.isatty())
    finally:
        store.close()
    print(f"Qdrant collection {store.collection} at {store.where}: {sent} page(s) sent, {len(index.pages)} in all")


def read_queries(args: argparse.Namespace) -> list[str]:
    queries = list(args.queries)
    if args.queries_file:
        try:
            text = Path(args.queries_file).read_bytes().decode("utf-8")
        except OSError as err:
            raise UserError(f"--queries_file {args.queries_file}: {err.strerror}") from None
        except UnicodeDecodeError as err:
            line = Path(args.queries_file).read_bytes()[:err.start].count(b"\n") + 1
            raise UserError(f"{args.queries_file} line {line}: not valid UTF-8") from None
        queries += [line.strip() for line in text.splitlines() if line.strip()]
    if not queries:
        raise UserError("no query: give query texts or --queries_file")
    for n, query in enumerate(queries, start=1):
        try:
            query.encode("utf-8")
        except UnicodeEncodeError:  # bytes the locale could not decode reach argv as surrogates
            raise UserError(f"query {n} is not valid UTF-8 text; pass UTF-8 (or use --queries_file)") from None
        if not query.strip():
            raise UserError(f"query {n} is empty; give some text")
    return queries


def query_command(args: argparse.Namespace) -> None:
    from colintern.search_index import Index, SearchSettings

    check_ready(args)
    index = Index.open(args.index, model_id=args.model_id, device=args.device)
    if args.explain:
        make_output_dir(args.explain, "--explain")
    settings = SearchSettings(**{f: getattr(args, f) for f in SearchSettings.__dataclass_fields__})
    lines, view, qs, ids = index.ranked(args.query_texts, settings, args.files, parse_pairs(args.where, "--where"))
    for qi, line in enumerate(lines):
        if args.explain:
            for r, i in zip(line["results"], ids[qi].tolist()):
                path = Path(args.explain) / f"q{qi + 1:03d}_r{r['rank']:02d}.png"
                if explain(view, index.model, int(i), qs[qi], line["query"], r["rank"], path):
                    r["map"] = str(path)
        if args.json:
            print(json_line(line))
        else:
            print(f"\n{display(line['query'])}")
            for r in line["results"]:
                print(f"  {r['rank']:>2}  {r['score']:9.4f}  {display(r['file'])} page {r['page']}"
                      + (f"  (map: {r['map']})" if "map" in r else ""))


def parse_pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    """KEY=VALUE items of a flag as a dict; one line for an item without '='."""
    pairs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{flag} {item!r}: expected KEY=VALUE")
        pairs[key] = value
    return pairs


def info_command(args: argparse.Namespace) -> None:
    from colintern.search_index import Index

    info = Index.open(args.index).info()
    if args.json:
        print(json_line(info))
        return
    for key, value in info.items():
        print(f"{key:>18}: {value}")


def remove_command(args: argparse.Namespace) -> int:
    from colintern.search_index import Index

    index = Index.open(args.index)
    files, pages = index.remove(args.paths)
    print(f"removed {pages} page(s) of {len(files)} file(s) from {args.index}; {len(index.pages.pages)} page(s) "
          "left (search.py compact reclaims their space)")
    if args.backend == "qdrant":
        sync_qdrant(index.pages, args)
    return 0


def compact_command(args: argparse.Namespace) -> None:
    from colintern.search_index import compact

    segments, freed = compact(args.index)
    print(f"compacted {segments} segment(s) of {args.index}: {freed} bytes freed" if segments else
          f"nothing to compact in {args.index}")


def json_line(obj: object) -> str:
    """One JSON line that is valid UTF-8 whatever the file names: a byte that is not UTF-8 (held as a lone
    surrogate, as Python keeps such names) is written as its \\udcXX escape, which json.loads and os.fsencode turn
    back into the original name."""
    text = json.dumps(obj, ensure_ascii=False)
    return re.sub(r"[\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", text)


def explain(index, model, i: int, query_vectors, query: str, rank: int, path: Path) -> bool:
    """One similarity map: the page re-rendered, its image tokens' boxes, the query's best similarity per box;
    whether it was written (a warning says why not)."""
    from colintern.files import file_sha256
    from colintern.page_index import render_page
    from colintern.simmap import paint, save_map, token_maps

    page = index.pages[i]
    where = f"{display(page['file'])} page {page['page']}"
    if not Path(page["file"]).is_file():
        log.warning("%s: the file is gone; no similarity map", where)
        return False
    if file_sha256(page["file"]) != page["sha256"]:
        log.warning("%s: the file changed since it was indexed; no similarity map (search.py index updates it)", where)
        return False
    if not page["image_tokens"]:
        log.warning("%s: no token map (a single-vector checkpoint, or a pooled index); --explain skipped", where)
        return False
    image = render_page(index.source(i), index.meta["dpi"])
    vectors = index.vectors(i)[page["image_start"]:page["image_start"] + page["image_tokens"]]
    boxes = model.processor.image_token_boxes(image)
    _, best = token_maps(query_vectors, vectors)
    heat = paint(best, boxes, min(image.width, 1024), int(min(image.width, 1024) * image.height / image.width))
    save_map(image, heat, f"#{rank}: {Path(page['file']).name} page {page['page']} — {query}"[:120], path)
    return True


def export_command(args: argparse.Namespace) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from colintern.files import atomic_write
    from colintern.page_index import PageIndex

    index = PageIndex.open(args.index, full_check=True, warn=False)
    if index.damaged:
        raise UserError(f"--index {args.index} is damaged ({'; '.join(index.damaged.values())}); nothing exported: "
                        "run search.py index to encode those pages again, or search.py verify --repair")
    dim = int(index.meta["config"]["dim"])
    vectors = [np.asarray(index.page_rows(i), dtype=np.float16) for i in range(len(index.pages))]  # (L, dim) each
    lengths = np.asarray([len(v) for v in vectors], dtype=np.int32)
    flat = pa.array(np.concatenate(vectors).reshape(-1) if vectors else np.empty(0, np.float16))
    rows = pa.FixedSizeListArray.from_arrays(flat, dim)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    table = pa.table({
        "file": [display(p["file"]) for p in index.pages],
        "file_bytes": pa.array([os.fsencode(p["file"]) for p in index.pages], pa.binary()),
        "page": [p["page"] for p in index.pages], "sha256": [p["sha256"] for p in index.pages],
        "vectors": pa.ListArray.from_arrays(offsets, rows),
    }).replace_schema_metadata({"colintern": json.dumps({
        "model_id": index.meta["model_id"], "ckpt": index.meta["ckpt"], "ckpt_sha256": index.meta["ckpt_sha256"],
        "dim": dim, "pool_factor": index.meta.get("pool_factor", 1), "dtype": "float16",
        "embedding": index.meta["config"].get("embedding", "multi"), "config": index.meta["config"]})})
    atomic_write(args.out, lambda f: pq.write_table(table, f))
    print(f"exported {len(index.pages)} page(s) to {args.out}")


def verify_command(args: argparse.Namespace) -> int:
    """Every file of the index against its checksum: one line per damaged file, exit 1 when any; --repair drops
    the damaged segments (under the writer lock)."""
    from colintern.page_index import PageIndex, writer_lock

    if not args.repair:
        index = PageIndex.open(args.index, full_check=True, warn=False)
        for name, why in index.damaged.items():
            print(f"damaged: {Path(args.index) / name}: {why}")
        if index.damaged:
            print(f"{len(index.damaged)} damaged segment(s) of {len(index.meta['segments'])}; search.py index "
                  f"--index {args.index} --inputs ... encodes their pages again (or verify --repair drops them)")
            return 1
        print(f"ok: {len(index.meta['segments'])} segment(s), {len(index.pages)} page(s) in {args.index} match "
              "their checksums")
        return 0
    with writer_lock(args.index):
        index = PageIndex.open(args.index, writer=True)
        index.mark_verified()
        if index.redo_files:
            print(f"dropped the damaged segment(s); {len(index.pages)} page(s) left. To encode the pages of "
                  f"{len(index.redo_files)} file(s) again: search.py index --index {args.index} --ckpt "
                  f"{index.meta['ckpt']} --inputs <the same files>")
        else:
            print(f"ok: nothing to repair; {len(index.pages)} page(s) in {args.index}")
    return 0


def export_model_command(args: argparse.Namespace) -> None:
    from colintern.device import resolve_device
    from colintern.export import export_model
    from colintern.search_index import load_model

    model_id, model = load_model(args.model_id, args.ckpt, resolve_device(args.device))
    out = export_model(model, args.out, model_id)
    print(f"exported {args.ckpt} on {model_id} to {out}: load it with --model_id {out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    commands = {"index": index_command, "query": query_command, "export": export_command, "verify": verify_command,
                "export_model": export_model_command, "info": info_command, "remove": remove_command,
                "compact": compact_command}
    return commands[args.command](args) or 0


def console() -> None:
    """The command line: one-line errors, the exit status (`python search.py`, `colintern-search`)."""
    sys.exit(run_cli(main, out_flag=OUT_FLAG))


if __name__ == "__main__":
    console()
