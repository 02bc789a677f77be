#!/usr/bin/env python
"""Search your PDFs and images with a trained ColIntern retriever (docs/CONTRACT.md §10).

    python search.py index --ckpt outputs/train/colintern_heads_epoch2.pt --inputs manuals/ report.pdf \\
        --index outputs/index
    python search.py query --index outputs/index --k 5 "where is the warranty period?" "installation steps"
    python search.py query --index outputs/index --json --explain outputs/maps "warranty period"
    python search.py export --index outputs/index --out outputs/index.parquet
    python search.py index ... --backend qdrant --url http://localhost:6333     # also into a Qdrant server
    python search.py query --index outputs/index --backend qdrant --url http://localhost:6333 "warranty period"
    python search.py serve --index outputs/index --port 8765     # http://127.0.0.1:8765/ : a web page and /search

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
serve: the model and index loaded once, queries answered over HTTP on 127.0.0.1 (GET /search?q=TEXT&k=N gives one
query --json line; / is a web page with the results' similarity maps; colintern/index/serve.py lists the routes).
verify: every file of the index checked against its checksum (exit 1 naming each damaged file, 0 when intact);
--repair drops damaged segments so that the next `index` encodes their pages again (`index` does so by itself).

Exit status: 0 done; 1 (index) some files or pages were skipped, each named in a warning; 1 (verify) damage found;
2 an error, or nothing could be indexed.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from colintern.cli import Options, parse_command, run_cli, save_config, setup_logging  # noqa: E402
from colintern.errors import UserError  # noqa: E402
from colintern.files import display, json_line, make_output_dir  # noqa: E402
from colintern.index.api import parse_pairs  # noqa: E402
from colintern.settings import (SEARCH_COMMANDS, CompactConfig, ExportConfig, ExportModelConfig, IndexConfig,  # noqa: E402
                                InfoConfig, QdrantOptions, QueryConfig, RemoveConfig, ServeConfig,
                                VerifyConfig)

log = logging.getLogger("colintern.search")
OUT_FLAG = "--index"


def parse_args(argv: list[str] | None) -> tuple[str, Options]:
    """(command, its settings): search.py COMMAND --flags (and --config FILE)."""
    return parse_command(SEARCH_COMMANDS, argv, __doc__, prog="search.py")


def index_command(config: IndexConfig) -> int:
    from colintern.index.api import add_files

    added = add_files(config, show_progress=True)  # a bar on a terminal, else a log line every few seconds
    save_config(config, Path(config.index) / "index_config.yaml", "search.py index")  # this run's resolved settings
    report = added.report
    print(f"indexed {added.pages} new page(s) from {added.files} file(s); {added.total} page(s) in {config.index}"
          + (f"; {report.summary()}" if report.count else ""))
    if config.backend != "embedded":
        sync_qdrant(added.index, config)
    return 1 if report.count else 0


def sync_qdrant(index, config: QdrantOptions) -> None:
    from colintern.index.api import open_store

    store = open_store(index, config)
    try:
        sent = store.sync(show_progress=sys.stderr.isatty())
    finally:
        store.close()
    print(f"Qdrant collection {store.collection} at {store.where}: {sent} page(s) sent, {len(index.pages)} in all")


def read_queries(config: QueryConfig) -> list[str]:
    queries = list(config.queries)
    if config.queries_file:
        try:
            text = Path(config.queries_file).read_bytes().decode("utf-8")
        except OSError as err:
            raise UserError(f"--queries_file {config.queries_file}: {err.strerror}") from None
        except UnicodeDecodeError as err:
            line = Path(config.queries_file).read_bytes()[:err.start].count(b"\n") + 1
            raise UserError(f"{config.queries_file} line {line}: not valid UTF-8") from None
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


def query_command(config: QueryConfig) -> None:
    from colintern.index.api import Index
    from colintern.index.maps import similarity_map

    texts = read_queries(config)
    index = Index.open(config.index, model_id=config.model_id, device=config.device)
    if config.explain:
        make_output_dir(config.explain, "--explain")
    lines, view, qs, ids = index.ranked(texts, config, config.files, parse_pairs(config.where, "--where"))
    for qi, line in enumerate(lines):
        if config.explain:
            for r, i in zip(line["results"], ids[qi].tolist()):
                path = Path(config.explain) / f"q{qi + 1:03d}_r{r['rank']:02d}.png"
                title = f"#{r['rank']}: {Path(r['file']).name} page {r['page']} — {line['query']}"
                why_not = similarity_map(view, index.model, int(i), qs[qi], title, path)
                if why_not:
                    log.warning("%s page %s: %s", display(r["file"]), r["page"], why_not)
                else:
                    r["map"] = str(path)
        if config.json:
            print(json_line(line))
        else:
            print(f"\n{display(line['query'])}")
            for r in line["results"]:
                print(f"  {r['rank']:>2}  {r['score']:9.4f}  {display(r['file'])} page {r['page']}"
                      + (f"  (map: {r['map']})" if "map" in r else ""))


def info_command(config: InfoConfig) -> None:
    from colintern.index.api import Index

    info = Index.open(config.index).info()
    if config.json:
        print(json_line(info))
        return
    for key, value in info.items():
        print(f"{key:>18}: {value}")


def remove_command(config: RemoveConfig) -> int:
    from colintern.index.api import Index

    index = Index.open(config.index)
    files, pages = index.remove(config.paths)
    print(f"removed {pages} page(s) of {len(files)} file(s) from {config.index}; {len(index.pages.pages)} page(s) "
          "left (search.py compact reclaims their space)")
    if config.backend != "embedded":
        sync_qdrant(index.pages, config)
    return 0


def compact_command(config: CompactConfig) -> None:
    from colintern.index.api import compact

    segments, freed = compact(config.index)
    print(f"compacted {segments} segment(s) of {config.index}: {freed} bytes freed" if segments else
          f"nothing to compact in {config.index}")


def export_command(config: ExportConfig) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from colintern.files import atomic_write
    from colintern.index.page_index import PageIndex

    index = PageIndex.open(config.index, full_check=True, warn=False)
    if index.damaged:
        raise UserError(f"--index {config.index} is damaged ({'; '.join(index.damaged.values())}); nothing exported: "
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
    atomic_write(config.out, lambda f: pq.write_table(table, f))
    print(f"exported {len(index.pages)} page(s) to {config.out}")


def verify_command(config: VerifyConfig) -> int:
    """Every file of the index against its checksum: one line per damaged file, exit 1 when any; --repair drops
    the damaged segments (under the writer lock)."""
    from colintern.index.page_index import PageIndex, writer_lock

    if not config.repair:
        index = PageIndex.open(config.index, full_check=True, warn=False)
        for name, why in index.damaged.items():
            print(f"damaged: {Path(config.index) / name}: {why}")
        if index.damaged:
            print(f"{len(index.damaged)} damaged segment(s) of {len(index.meta['segments'])}; search.py index "
                  f"--index {config.index} --inputs ... encodes their pages again (or verify --repair drops them)")
            return 1
        print(f"ok: {len(index.meta['segments'])} segment(s), {len(index.pages)} page(s) in {config.index} match "
              "their checksums")
        return 0
    with writer_lock(config.index):
        index = PageIndex.open(config.index, writer=True)
        index.mark_verified()
        if index.redo_files:
            print(f"dropped the damaged segment(s); {len(index.pages)} page(s) left. To encode the pages of "
                  f"{len(index.redo_files)} file(s) again: search.py index --index {config.index} --ckpt "
                  f"{index.meta['ckpt']} --inputs <the same files>")
        else:
            print(f"ok: nothing to repair; {len(index.pages)} page(s) in {config.index}")
    return 0


def export_model_command(config: ExportModelConfig) -> None:
    from colintern.device import resolve_device
    from colintern.index.api import load_model
    from colintern.retriever.checkpoint import load_checkpoint
    from colintern.retriever.export import export_model
    from colintern.retriever.model_card import model_card, read_summary

    summaries = [(path, read_summary(path)) for path in config.eval_summary]  # checked before the model loads
    payload = load_checkpoint(config.ckpt)
    repo_id = config.repo_id or f"colintern-{Path(config.out).name}"
    model_id, model = load_model(config.model_id, config.ckpt, resolve_device(config.device))
    from colintern.retriever.st_layout import page_token_mask

    st_extra_tokens = page_token_mask(model.processor)[1] if model.config.embedding == "multi" else []
    card = model_card(payload, model_id, config.out, repo_id, config.license, summaries, st_extra_tokens)
    datasets = (payload.get("training") or {}).get("datasets")
    out = export_model(model, config.out, model_id, card, datasets=datasets)
    write_mteb_reference(model, out, repo_id, config.license, model_id)
    print(f"exported {config.ckpt} on {model_id} to {out}: load it with --model_id {out}; its model card is "
          f"{out}/README.md; publish it with: hf upload {repo_id} {out} .")


def write_mteb_reference(model, out: Path, repo_id: str, license: str, base_model: str) -> None:
    """OUT/mteb_model_meta.py: the ModelMeta eval.py's encoder declares for the exported folder, as mteb's
    reference-implementation file (colintern.eval.mteb_model.reference_file)."""
    from datetime import date

    from colintern.eval.mteb_model import ColInternMTEB, reference_file
    from colintern.files import atomic_write_text

    meta = ColInternMTEB(str(out), model=model, show_progress=False).mteb_model_meta
    assert meta is not None  # ColInternMTEB always declares one
    atomic_write_text(out / "mteb_model_meta.py", reference_file(meta, repo_id, license, date.today().isoformat(),
                                                                     base_model))


def serve_command(config: ServeConfig) -> None:
    from colintern.index.serve import serve

    serve(config)


def main(argv: list[str] | None = None) -> int:
    command, config = parse_args(argv)
    setup_logging(getattr(config, "verbose", False))
    commands: dict[str, Callable[[Any], int | None]] = {
        "index": index_command, "query": query_command, "export": export_command, "verify": verify_command,
        "export_model": export_model_command, "info": info_command, "remove": remove_command,
        "compact": compact_command, "serve": serve_command}
    return commands[command](config) or 0


def console() -> None:
    """The command line: one-line errors, the exit status (`python search.py`, `colintern-search`)."""
    sys.exit(run_cli(main, out_flag=OUT_FLAG))


if __name__ == "__main__":
    console()
