"""search.py serve: a real server process answered by a real HTTP client. /search equals `query --json`, maps are
PNGs of the result's page, bad requests are 4xx with a message and never stop the server, concurrent requests get
the answers sequential ones get, and the web page shows the result thumbnails in headless Chromium."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import FIXTURES, REPO, search_run as run

pytestmark = pytest.mark.usefixtures("one_thread")
QUERIES = ["a red page with the word alpha", "blue gamma", "the DER encoding of a structure", "tag class and number"]


def start_server(index: Path, *extra: str, timeout: float = 180) -> tuple[subprocess.Popen, str, list[str]]:
    """search.py serve in its own process on a free port: (process, base URL, its log lines so far)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "colintern.scripts.search", "serve", "--index", str(index),
                             "--port", "0", "--device", "cpu", *extra], stderr=subprocess.PIPE, text=True, env=env,
                            cwd=REPO)
    lines: list[str] = []
    found: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip())
            match = re.search(r"on (http://127\.0\.0\.1:\d+/)", line)
            if match:
                found.append(match.group(1))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the server did not start:\n" + "\n".join(lines))
        time.sleep(0.1)
    return proc, found[0], lines


def get(url: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET, 4xx and 5xx included."""
    try:
        with urllib.request.urlopen(url, timeout=120) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


def search_url(base: str, query: str, k: int = 5, **extra: str) -> str:
    from urllib.parse import urlencode

    return base + "search?" + urlencode({"q": query, "k": k, **extra})


@pytest.fixture(scope="module")
def served(tiny_model_dir, search_ckpt, search_docs, tmp_path_factory):
    """An index of the search documents and six real PDF pages, served by its own process."""
    from colintern import Index

    folder = tmp_path_factory.mktemp("served")
    docs = folder / "docs"
    shutil.copytree(search_docs, docs)
    shutil.copy(FIXTURES / "real_pages.pdf", docs / "real_pages.pdf")
    (docs / "real_pages.pdf.meta.json").write_text('{"kind": "manual"}')
    Index.create(folder / "index", [docs], ckpt=search_ckpt, model_id=tiny_model_dir, device="cpu", dpi=72)
    proc, base, lines = start_server(folder / "index")
    yield {"base": base, "index": folder / "index", "docs": docs, "proc": proc, "log": lines}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert any("stopped" in line for line in lines)


def test_search_returns_what_query_json_prints(served, capsys):
    for query in QUERIES:
        status, kind, body = get(search_url(served["base"], query, k=7))
        assert status == 200 and kind == "application/json"
        got = json.loads(body)
        code, out, _ = run(capsys, "query", "--index", served["index"], "--k", 7, "--json", "--device", "cpu", query)
        assert code == 0
        want = json.loads(out)
        assert got["query"] == want["query"] == query
        assert [(r["rank"], r["file"], r["page"]) for r in got["results"]] == \
               [(r["rank"], r["file"], r["page"]) for r in want["results"]]
        assert np.allclose([r["score"] for r in got["results"]], [r["score"] for r in want["results"]], atol=1e-5)
    assert any("pages resident in memory as float32" in line for line in served["log"])


def test_filters_and_info(served):
    status, _, body = get(search_url(served["base"], QUERIES[2], k=20, where="kind=manual"))
    assert status == 200
    results = json.loads(body)["results"]
    assert len(results) == 6 and {Path(r["file"]).name for r in results} == {"real_pages.pdf"}
    status, _, body = get(search_url(served["base"], QUERIES[0], k=20, files="*.png"))
    assert [Path(r["file"]).name for r in json.loads(body)["results"]] == ["c.png"]
    status, _, body = get(served["base"] + "info")
    info = json.loads(body)
    assert status == 200 and info["pages"] == 12 and info["files"] == 4


def test_a_results_map_is_a_png_of_its_page(served):
    from urllib.parse import urlencode

    top = json.loads(get(search_url(served["base"], QUERIES[2], k=1))[2])["results"][0]
    status, kind, body = get(served["base"] + "map?" + urlencode({"q": QUERIES[2], "file": top["file"],
                                                                  "page": top["page"], "size": 300}))
    assert status == 200 and kind == "image/png" and body[:8] == b"\x89PNG\r\n\x1a\n"
    image = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    assert image.shape[0] > 200 and image.shape[1] > 200
    assert image.std() > 10  # the page and its map, not a blank picture


@pytest.mark.parametrize("path,status,message", [
    ("search", 400, "missing q="),
    ("search?q=", 400, "missing q="),
    ("search?q=%FF%FE", 400, "not UTF-8"),
    ("search?q=x&k=abc", 400, "k='abc' is not a whole number"),
    ("search?q=x&k=0", 400, "k=0 is out of range: 1 to 100"),
    ("search?q=x&k=101", 400, "k=101 is out of range"),
    ("search?q=x&k=1&k=2", 400, "k= given 2 times"),
    ("search?q=x&where=nokey", 400, "expected KEY=VALUE"),
    ("search?q=x&where=kind=nothing", 400, "holds no page that passes the filters"),
    ("search?q=" + "x" * 2001, 400, "over 2000"),
    ("map?q=x&file=nope.pdf&page=1", 404, "holds no page 1 of nope.pdf"),
    ("map?q=x&file=nope.pdf", 400, "missing page="),
    ("map?q=x", 400, "missing file="),
    ("nope", 404, "no such route: /nope"),
])
def test_bad_requests_are_4xx_with_a_message_and_the_server_goes_on(served, path, status, message):
    got, kind, body = get(served["base"] + path)
    assert got == status and kind == "application/json"
    assert message in json.loads(body)["error"]
    assert get(search_url(served["base"], "still here", k=1))[0] == 200


def test_a_post_is_refused_and_a_map_of_a_changed_file_is_a_conflict(served):
    request = urllib.request.Request(served["base"] + "search", data=b"q=x", method="POST")
    try:
        urllib.request.urlopen(request, timeout=60)
        raise AssertionError("POST was accepted")
    except urllib.error.HTTPError as err:
        assert err.code == 405 and "use GET" in json.loads(err.read())["error"]
    image = served["docs"] / "c.png"
    original = image.read_bytes()
    try:
        image.write_bytes(original + b"changed")
        status, _, body = get(served["base"] + f"map?q=x&file={image}&page=1")
        assert status == 409 and "changed since it was indexed" in json.loads(body)["error"]
    finally:
        image.write_bytes(original)


def test_concurrent_requests_get_the_sequential_answers(served):
    urls = [search_url(served["base"], q, k=4) for q in QUERIES] * 3
    sequential = [get(url)[2] for url in urls[:len(QUERIES)]] * 3
    with ThreadPoolExecutor(6) as pool:
        parallel = list(pool.map(lambda u: get(u)[2], urls))
    assert parallel == sequential


def test_a_port_in_use_is_one_line(served, tmp_path):
    port = served["base"].rsplit(":", 1)[1].strip("/")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "colintern.scripts.search", "serve", "--index", str(served["index"]),
                           "--port", port], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: cannot listen on 127.0.0.1:{port}: Address already in use; "
                                                "pass another --port (0: any free one)"]


def test_the_server_follows_files_removed_and_added_while_it_runs(served, tiny_model_dir, capsys):
    real = served["docs"] / "real_pages.pdf"
    url = search_url(served["base"], QUERIES[2], k=20)
    assert str(real) in {r["file"] for r in json.loads(get(url)[2])["results"]}
    assert run(capsys, "remove", "--index", served["index"], real)[0] == 0
    results = json.loads(get(url)[2])["results"]
    assert len(results) == 6 and str(real) not in {r["file"] for r in results}
    assert get(served["base"] + f"map?q=x&file={real}&page=1")[0] == 404
    assert json.loads(get(served["base"] + "info")[2])["pages"] == 6
    code, _, err = run(capsys, "index", "--index", served["index"], "--inputs", real, "--device", "cpu")
    assert code == 0, err
    results = json.loads(get(url)[2])["results"]
    assert len(results) == 12 and sum(r["file"] == str(real) for r in results) == 6
    assert any("changed: loading its pages again" in line for line in served["log"])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (make browser)")
def test_the_web_page_shows_the_result_thumbnails_in_headless_chromium(served, tmp_path):
    from urllib.parse import urlencode

    url = served["base"] + "?" + urlencode({"q": QUERIES[2], "k": 3})
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", "--window-size=1200,800", "--virtual-time-budget=60000"]
    dom = subprocess.run(["chromium", *flags, f"--user-data-dir={tmp_path / 'profile1'}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=240).stdout
    assert dom.count('class="hit"') == 3
    assert len(re.findall(r'<img [^>]*data-loaded="1"', dom)) == 3, dom  # every thumbnail loaded as an image
    shot = tmp_path / "page.png"
    subprocess.run(["chromium", *flags, f"--user-data-dir={tmp_path / 'profile2'}", f"--screenshot={shot}", url],
                   capture_output=True, timeout=240)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)  # (800, 1200, 3)
    assert pixels.shape == (800, 1200, 3)
    # the thumbnails are pages with the map's inferno colours drawn over them: strongly coloured pixels, which the
    # rest of the page (grey, black and white) has none of
    colourful = (pixels.max(axis=2) - pixels.min(axis=2)) > 80  # (800, 1200)
    columns = np.flatnonzero(colourful.sum(axis=0) > 20)
    assert colourful.sum() > 20_000
    assert columns.size and (np.diff(columns) > 15).sum() >= 2  # three separate thumbnails side by side
