"""search.py's settings, one class per command (index, query, export, info, remove, compact, verify, export_model)."""
from __future__ import annotations

from dataclasses import MISSING, dataclass

from colintern.errors import UserError
from colintern.cli import Options, option, with_default
from colintern.settings.common import CheckpointOptions, DeviceOptions, LogOptions, MAX_DPI, ModelOptions
from colintern.settings.train import OptimOptions, TrainDataOptions
from colintern.settings.mine import FirstStageOptions, MiningOptions
from colintern.settings.eval import PoolOptions


@dataclass(frozen=True, kw_only=True)
class RenderOptions(Options):
    """pages"""

    dpi: int | None = option(None, at_least=1, help=f"PDF rendering resolution, at most {MAX_DPI} (default: 150; "
                                                    "search.py index: the index's when extending one)")

    def check(self) -> None:
        if self.dpi is not None and self.dpi > MAX_DPI:
            raise UserError(f"--dpi {self.dpi} is over {MAX_DPI}; pages are resized to the model's tiles, so 150 is "
                            "plenty")


@dataclass(frozen=True, kw_only=True)
class IndexFolderOptions(Options):
    """index"""

    index: str = option(help="the index folder (search.py index: created, or extended)")


@dataclass(frozen=True, kw_only=True)
class QdrantOptions(Options):
    """Qdrant"""

    backend: str = option("embedded", choices=("embedded", "qdrant", "qdrant-edge"), help="embedded: the index folder "
                          "alone; qdrant: also a Qdrant collection (qdrant-client: --url a server, --path its "
                          "Python local mode), which answers the queries; qdrant-edge: also a shard of Qdrant's own "
                          "engine embedded in the process (qdrant-edge-py, --path DIR)")
    url: str | None = option(None, help="--backend qdrant: server or cluster URL, e.g. http://localhost:6333 (API key "
                                        "from $QDRANT_API_KEY)")
    path: str | None = option(None, help="--backend qdrant: folder of qdrant-client's local mode; qdrant-edge: folder of "
                                         "the engine's shards")
    collection: str | None = option(None, help="--backend qdrant or qdrant-edge: collection (shard) name (default: the one the index used "
                                               "before, else colintern_<index folder name>)")


@dataclass(frozen=True, kw_only=True)
class SearchSettings(QdrantOptions):
    """search"""

    k: int = with_default(MiningOptions, "k", 5)
    first_stage: str = option("auto", choices=("auto", "exact", "faiss"), help="embedded backend: exact MaxSim "
                              "against every page, or a FAISS token search whose candidates are re-ranked exactly; "
                              "auto: FAISS above 2,000,000 page tokens")
    candidates: int = with_default(FirstStageOptions, "candidates", 128)
    nprobe: int = with_default(FirstStageOptions, "nprobe", 32)
    token_k: int = with_default(FirstStageOptions, "token_k", 128)
    faiss_factory: str = option("auto", help="--first_stage faiss: FAISS index_factory string; auto: Flat up to "
                                             "200,000 page tokens, else IVF<about 4 sqrt(tokens), at most 4096>,PQ32")
    check_recall: bool = option(False, help="also search exactly and log the recall@k of the FAISS first stage or of "
                                            "Qdrant against it")
    exact_scan: bool = option(False, help="--backend qdrant with --url: score every point instead of Qdrant's HNSW "
                                          "graph (local mode always does)")


def _pairs_check(items: list[str], flag: str) -> None:
    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise UserError(f"{flag} {item!r}: expected KEY=VALUE")


@dataclass(frozen=True, kw_only=True)
class SearchOutputOptions(Options):
    """output"""

    json: bool = option(False, help="print JSON (query: one object per query; info: one object) instead of a table")
    out: str = option(help="where the output goes: a file or a folder (the command's description says what it "
                           "writes there, and when an existing one is replaced)")


@dataclass(frozen=True, kw_only=True)
class IndexConfig(CheckpointOptions, IndexFolderOptions, RenderOptions, PoolOptions, QdrantOptions, LogOptions):
    """search.py index: add PDFs and images to an index (only new pages are encoded)"""

    model_id: str | None = with_default(ModelOptions, "model_id", None)
    inputs: list[str] = option(help="what to read: PDF files, image files, or folders of them (make_dataset: PDFs "
                                    "only); plot_vidore_metrics.py: eval summary.json files (any name), folders "
                                    "holding one, or a folder of run folders, one run each, plotted in this order")
    batch_size: int = with_default(OptimOptions, "batch_size", 8)
    segment_pages: int = option(64, at_least=1, help="pages committed at once: the unit of resume")
    strict: bool = with_default(TrainDataOptions, "strict", False)
    meta: list[str] = option([], repeat=True, metavar="KEY=VALUE", help="metadata of every file of this run, for "
                             "query --where; repeat it for more (a sidecar FILE.meta.json, a JSON object, adds its own) "
                             "(default: none)")
    device: str = with_default(DeviceOptions, "device", "auto")

    def check(self) -> None:
        _pairs_check(self.meta, "--meta")


@dataclass(frozen=True, kw_only=True)
class QueryConfig(IndexFolderOptions, SearchSettings, LogOptions):
    """search.py query: the best pages for each query"""

    queries: list[str] = option([], positional=True, help="query texts")
    queries_file: str | None = option(None, help="more queries, one per line (UTF-8)")
    model_id: str | None = with_default(ModelOptions, "model_id", None)
    files: str | None = option(None, metavar="GLOB", help="only pages of files whose path or name matches this glob "
                                                        "(exact search over them)")
    where: list[str] = option([], repeat=True, metavar="KEY=VALUE", help="only pages of files whose metadata (index "
                              "--meta, or FILE.meta.json) has KEY=VALUE; repeat it for more (exact search over them)")
    json: bool = with_default(SearchOutputOptions, "json", False)
    explain: str | None = option(None, metavar="DIR", help="write a similarity map (PNG) per result here")
    device: str = with_default(DeviceOptions, "device", "auto")

    def check(self) -> None:
        _pairs_check(self.where, "--where")


@dataclass(frozen=True, kw_only=True)
class ExportConfig(IndexFolderOptions, LogOptions):
    """search.py export: every page's vectors and source as Parquet"""

    out: str = with_default(SearchOutputOptions, "out", MISSING)


@dataclass(frozen=True, kw_only=True)
class InfoConfig(IndexFolderOptions, LogOptions):
    """search.py info: what an index holds and was built with"""

    json: bool = with_default(SearchOutputOptions, "json", False)


@dataclass(frozen=True, kw_only=True)
class RemoveConfig(IndexFolderOptions, QdrantOptions, LogOptions):
    """search.py remove: take files out of an index (and its Qdrant collection)"""

    paths: list[str] = option(positional=True, help="indexed files, folders (every file under them) or globs")


@dataclass(frozen=True, kw_only=True)
class CompactConfig(IndexFolderOptions, LogOptions):
    """search.py compact: reclaim the space of removed and replaced pages"""


@dataclass(frozen=True, kw_only=True)
class VerifyConfig(IndexFolderOptions, LogOptions):
    """search.py verify: check every file of an index against its checksum"""

    repair: bool = option(False, help="drop the damaged segments (search.py index then encodes their pages again)")


@dataclass(frozen=True, kw_only=True)
class ExportModelConfig(LogOptions):
    """search.py export_model: a checkpoint as one publishable model folder (LoRA merged)"""

    ckpt: str = with_default(CheckpointOptions, "ckpt", MISSING)
    model_id: str | None = with_default(ModelOptions, "model_id", None)
    out: str = with_default(SearchOutputOptions, "out", MISSING)
    device: str = with_default(DeviceOptions, "device", "auto")
    repo_id: str | None = option(None, metavar="ORG/NAME", help="the Hub repository the model card and the upload "
                                                               "command name (default: colintern-<--out folder name>)")
    license: str = option("other", help="the license in the model card's metadata (the base model's terms apply too)")
    eval_summary: list[str] = option([], repeat=True, metavar="FILE", help="an eval.py summary.json (or its run "
                                     "folder) whose table goes into the model card; repeat it for more (default: none)")


@dataclass(frozen=True, kw_only=True)
class ServeConfig(IndexFolderOptions, SearchSettings, LogOptions):
    """search.py serve: answer queries over HTTP (a JSON API and a web page), the model and the index loaded once"""

    host: str = option("127.0.0.1", help="address to listen on; any other than 127.0.0.1 or localhost makes the index "
                                         "searchable from other machines, with no authentication")
    port: int = option(8765, at_least=0, help="TCP port (0: any free one, named in the log)")
    model_id: str | None = with_default(ModelOptions, "model_id", None)
    device: str = with_default(DeviceOptions, "device", "auto")
    resident_gb: float = option(8.0, at_least=0, help="keep the index's pages in memory as float32 when that takes at "
                                                      "most this many GB, so that exact search only computes; 0: never")
    max_k: int = option(100, at_least=1, help="the largest k a request may ask for")


SEARCH_COMMANDS: dict[str, type[Options]] = {
    "index": IndexConfig, "query": QueryConfig, "export": ExportConfig, "info": InfoConfig, "remove": RemoveConfig,
    "compact": CompactConfig, "verify": VerifyConfig, "export_model": ExportModelConfig, "serve": ServeConfig}
