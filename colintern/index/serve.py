"""search.py serve: one process holds the model and the index and answers over HTTP (on 127.0.0.1 unless told).

    GET /search?q=TEXT&k=N[&files=GLOB][&where=KEY=VALUE]...   one line of `query --json`: {"query", "results":
                                                                [{"rank", "score", "file", "page"}]}
    GET /map?q=TEXT&file=PATH&page=N[&size=PX]                  that result's similarity map (PNG)
    GET /info                                                   what `search.py info --json` prints
    GET /?q=TEXT&k=N                                            the web page: a search box, the results as page
                                                                thumbnails with the map drawn over them

A bad request gets a 4xx and {"error": "..."} (the web page shows the message), never a crash; an unexpected
failure is a 500 with its message (the traceback is logged) and the server goes on. Requests are read and answered
in threads, but the model, the index and the page renderer serve one request at a time (a lock): torch's own
threads already use every core for one query. Warm, the pages stay in memory as float32 (--resident_gb), so exact
search only computes (docs/BENCHMARKS.md, "search.py serve"); when index.json changes (search.py index, remove or
compact ran), the next request loads the pages again.
"""
from __future__ import annotations

import html
import io
import logging
import signal
import string
import threading
from collections import OrderedDict
from dataclasses import replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from colintern.errors import UserError
from colintern.files import display, json_line
from colintern.settings import ServeConfig

log = logging.getLogger("colintern.search")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_QUERY_CHARS = 2000
PAGE_TEMPLATE = string.Template((Path(__file__).with_name("search_page.html")).read_text(encoding="utf-8"))


class RequestError(Exception):
    """A request the server refuses: its HTTP status and a message for the client."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class SearchService:
    """The index, its model and the search settings, loaded once; each method serves one request under the lock."""

    def __init__(self, config: ServeConfig):
        from colintern.index.api import Index

        self.config = config
        self.index = Index.open(config.index, model_id=config.model_id, device=config.device)
        self.index.model  # noqa: B018 - load (and check) the model now, not on the first request
        self.lock = threading.Lock()
        self.query_vectors: OrderedDict[str, Any] = OrderedDict()  # the latest queries' vectors, for their maps
        self.state: tuple[int, int, int] | None = None
        self.follow_index()

    def follow_index(self) -> None:
        """(Re)load the index's pages when index.json changed (search.py index, remove or compact ran meanwhile):
        the server answers from the index as it is now, without a restart. Called under the lock."""
        from colintern.index.page_index import PageIndex

        stat = (Path(self.config.index) / "index.json").stat()
        state = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if state == self.state:
            return
        if self.state is not None:
            log.info("%s changed: loading its pages again", self.config.index)
            self.index.pages, self.index.resident = PageIndex.open(self.config.index), None
        if self.config.backend == "embedded" and self.config.resident_gb > 0:
            self.index.keep_resident(int(self.config.resident_gb * 1e9))
        self.positions = {(p["file"], p["page"]): i for i, p in enumerate(self.index.pages.pages)}
        self.state = state

    def search(self, query: str, k: int, files: str | None, where: dict[str, str]) -> dict[str, Any]:
        with self.lock:
            self.follow_index()
            lines, _, qs, _ = self.index.ranked([query], replace(self.config, k=k), files, where or None)
            self.remember(query, qs[0])
        return lines[0]

    def info(self) -> dict[str, Any]:
        with self.lock:
            self.follow_index()
            return self.index.info()

    def remember(self, query: str, vectors: Any) -> None:
        self.query_vectors[query] = vectors
        self.query_vectors.move_to_end(query)
        while len(self.query_vectors) > 64:
            self.query_vectors.popitem(last=False)

    def map_png(self, query: str, file: str, page: int, size: int) -> bytes:
        from colintern.index.maps import similarity_map

        with self.lock:
            self.follow_index()
            i = self.positions.get((file, page))
            if i is None:
                raise RequestError(HTTPStatus.NOT_FOUND, f"the index holds no page {page} of {display(file)}")
            if query not in self.query_vectors:
                self.remember(query, self.index.model.encode_queries([query], show_progress=False)[0])
            out = io.BytesIO()
            title = f"{Path(file).name} page {page} — {query}"
            why_not = similarity_map(self.index.pages, self.index.model, i, self.query_vectors[query], title, out,
                                     max_side=size)
        if why_not:
            raise RequestError(HTTPStatus.CONFLICT, f"{display(file)} page {page}: {why_not}")
        return out.getvalue()


class Handler(BaseHTTPRequestHandler):
    """The routes of the module docstring; the service is the server's (`server.service`)."""

    server_version = "ColIntern"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        url = urlsplit(self.path)
        routes = {"/search": self.search, "/map": self.map, "/info": self.info, "/": self.page}
        try:
            try:
                params = parse_qs(url.query, keep_blank_values=True, errors="strict")
            except UnicodeDecodeError:
                raise RequestError(HTTPStatus.BAD_REQUEST, "the query string is not UTF-8") from None
            if url.path not in routes:
                raise RequestError(HTTPStatus.NOT_FOUND, f"no such route: {url.path} (try /, /search, /map, /info)")
            routes[url.path](params)
        except RequestError as err:
            self.reply_error(err.status, str(err), url.path)
        except UserError as err:
            self.reply_error(HTTPStatus.BAD_REQUEST, str(err), url.path)
        except Exception as err:  # noqa: BLE001 - one failed request must not stop the server
            log.exception("%s failed", self.path)
            self.reply_error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(err).__name__}: {err}",
                             url.path)

    def refuse(self) -> None:
        self.reply_error(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not supported: use GET", "")

    do_POST = do_PUT = do_DELETE = do_PATCH = refuse  # noqa: N815

    # -- routes ----------------------------------------------------------------------------------------------------
    def search(self, params: dict[str, list[str]]) -> None:
        query, k = self.query_text(params), self.number(params, "k", 5, 1, self.service.config.max_k)
        files = self.one(params, "files")
        where = parse_where(params.get("where", []))
        self.reply(HTTPStatus.OK, "application/json", json_line(self.service.search(query, k, files, where)).encode())

    def map(self, params: dict[str, list[str]]) -> None:
        query, file = self.query_text(params), self.one(params, "file")
        if not file:
            raise RequestError(HTTPStatus.BAD_REQUEST, "missing file= (a result's file)")
        page = self.number(params, "page", None, 1, 1 << 31)
        size = self.number(params, "size", 1024, 64, 2048)
        self.reply(HTTPStatus.OK, "image/png", self.service.map_png(query, file, page, size))

    def info(self, params: dict[str, list[str]]) -> None:
        self.reply(HTTPStatus.OK, "application/json", json_line(self.service.info()).encode())

    def page(self, params: dict[str, list[str]]) -> None:
        query = (self.one(params, "q") or "").strip()
        k = self.number(params, "k", 5, 1, self.service.config.max_k)
        body = ""
        if query:
            found = self.service.search(self.query_text(params), k, None, {})
            body = results_html(found)
        self.reply(HTTPStatus.OK, "text/html; charset=utf-8", self.page_html(query, k, body).encode())

    # -- parameters and replies ------------------------------------------------------------------------------------
    @property
    def service(self) -> SearchService:
        return self.server.service  # type: ignore[attr-defined]

    def one(self, params: dict[str, list[str]], name: str) -> str | None:
        values = params.get(name, [])
        if len(values) > 1:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"{name}= given {len(values)} times; give it once")
        return values[0] if values else None

    def query_text(self, params: dict[str, list[str]]) -> str:
        query = (self.one(params, "q") or "").strip()
        if not query:
            raise RequestError(HTTPStatus.BAD_REQUEST, "missing q= (the query text)")
        if len(query) > MAX_QUERY_CHARS:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"q= is {len(query)} characters, over {MAX_QUERY_CHARS}")
        return query

    def number(self, params: dict[str, list[str]], name: str, default: int | None, low: int, high: int) -> int:
        text = self.one(params, name)
        if text is None or text == "":
            if default is None:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"missing {name}=")
            return default
        try:
            value = int(text)
        except ValueError:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"{name}={text!r} is not a whole number") from None
        if not low <= value <= high:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"{name}={value} is out of range: {low} to {high}")
        return value

    def page_html(self, query: str, k: int, body: str) -> str:
        pages = len(self.service.index.pages.pages)
        return PAGE_TEMPLATE.substitute(
            title=html.escape(f"{query} — ColIntern search" if query else "ColIntern search"),
            query=html.escape(query), k=k, max_k=self.service.config.max_k, body=body,
            about=html.escape(f"{pages:,} pages in {self.service.config.index}"))

    def reply_error(self, status: HTTPStatus, message: str, path: str) -> None:
        if path == "/":
            body = self.page_html("", 5, f'<p class="error">{html.escape(message)}</p>').encode()
            self.reply(status, "text/html; charset=utf-8", body)
        else:
            self.reply(status, "application/json", json_line({"error": message}).encode())

    def reply(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("%s %s", self.address_string(), format % args)


def parse_where(items: list[str]) -> dict[str, str]:
    from colintern.index.api import parse_pairs

    return parse_pairs(items, "where=")


def results_html(found: dict[str, Any]) -> str:
    """The result cards of the web page: the similarity map as the thumbnail, rank, score, file and page."""
    if not found["results"]:
        return "<p>No page matched.</p>"
    cards = []
    for r in found["results"]:
        link = "/map?" + urlencode({"q": found["query"], "file": r["file"], "page": r["page"]})
        name = html.escape(display(r["file"]))
        cards.append(
            f'<figure class="hit"><a href="{html.escape(link)}" target="_blank">'
            f'<img src="{html.escape(link)}&amp;size=480" alt="{name} page {r["page"]}" '
            f'onload="this.dataset.loaded=1" onerror="this.dataset.loaded=0"></a>'
            f'<figcaption><b>#{r["rank"]}</b> <span class="score">{r["score"]:.4f}</span><br>'
            f'{name} — page {r["page"]}</figcaption></figure>')
    return f'<div class="hits">{"".join(cards)}</div>'


def serve(config: ServeConfig) -> None:
    """Listen (before loading anything, so that a port in use is one line at once), load the index and the model,
    then answer until SIGINT or SIGTERM."""
    if config.host not in LOCAL_HOSTS:
        log.warning("listening on %s: anyone who can reach this machine can search the index (no authentication)",
                    config.host)
    try:
        server = ThreadingHTTPServer((config.host, config.port), Handler)
    except OSError as err:
        raise UserError(f"cannot listen on {config.host}:{config.port}: {err.strerror}; pass another --port "
                        "(0: any free one)") from None
    server.daemon_threads = True
    try:
        server.service = SearchService(config)  # type: ignore[attr-defined]
        host, port = server.server_address[:2]
        log.info("serving %d pages of %s on http://%s:%d/ (Ctrl-C stops)", len(server.service.index.pages.pages),  # type: ignore[attr-defined]
                 config.index, host, port)

        def stop(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            log.info("stopped")
    finally:
        server.server_close()
