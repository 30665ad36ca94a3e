"""Collectors without the internet: a local HTTP server plays Wikipedia and the web; a local JSON
dataset goes through the same `datasets.load_dataset(..., streaming=True)` path as a hub name."""

import gzip
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

pytest.importorskip("trafilatura")
pytest.importorskip("datasets")

from tinylm.cli import main  # noqa: E402
from tinylm.collect import USER_AGENT, collect, decode_page  # noqa: E402
from tinylm.config import CollectConfig  # noqa: E402

ARTICLE = "The red fox lives in forests and fields. It hunts small animals at night. " * 6
PAGE = f"""<html><head><title>Foxes</title></head><body>
<nav>Home | About | Contact | Login</nav>
<article><h1>Foxes</h1><p>{ARTICLE}</p><p>Foxes are clever and quick, and they can adapt to cities.</p></article>
<footer>Copyright 2026. All rights reserved. Cookie settings.</footer></body></html>"""


CAFE = "Café crème brûlée"
CAFE_PAGE = (f"<html><head><title>{CAFE}</title></head><body><article><h1>{CAFE}</h1>"
             + f"<p>{CAFE} is served at the café on the corner every morning, with a “fresh” croissant. </p>" * 6
             + "</article></body></html>")


class Site(BaseHTTPRequestHandler):
    hits: dict = {}
    agents: list = []

    def log_message(self, *args):
        pass

    def _send(self, status, body, kind="text/html"):
        data = body if isinstance(body, bytes) else body.encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urlsplit(self.path)
        Site.hits[url.path] = Site.hits.get(url.path, 0) + 1
        Site.agents.append(self.headers.get("User-Agent"))
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/w/api.php" and q.get("list") == "search":
            hits = [{"title": f"{q['srsearch'].title()} {i}"} for i in range(int(q["srlimit"]))]
            return self._send(200, json.dumps({"query": {"search": hits}}), "application/json")
        if url.path == "/w/api.php" and q.get("prop") == "extracts":
            page = {"pageid": 1, "title": q["titles"], "extract": f"{q['titles']} is a topic. " + ARTICLE}
            return self._send(200, json.dumps({"query": {"pages": {"1": page}}}), "application/json")
        if url.path == "/robots.txt":
            return self._send(200, "User-agent: *\nDisallow: /private/\n", "text/plain")
        if url.path == "/slow.html":
            time.sleep(1.5)
            return self._send(200, PAGE)
        if url.path == "/flaky.html" and Site.hits[url.path] == 1:
            return self._send(500, "oops")
        if url.path == "/cafe.html":  # the charset only in the page, bytes in windows-1252
            return self._send(200, CAFE_PAGE.replace("<head>", '<head><meta charset="windows-1252">').encode("cp1252"))
        if url.path == "/cafe-header.html":  # only the HTTP header says latin-1 (a browser reads windows-1252)
            return self._send(200, CAFE_PAGE.encode("cp1252"), "text/html; charset=ISO-8859-1")
        if url.path in ("/fox.html", "/flaky.html", "/private/secret.html"):
            return self._send(200, PAGE)
        return self._send(404, "not here")


@pytest.fixture(scope="module")
def site():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Site)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def records(folder, name):
    with gzip.open(folder / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


FAST = dict(timeout=0.5, retries=2, backoff=0.05, per_host_delay=0.0)


def test_wikipedia_by_topic(site, tmp_path):
    cfg = CollectConfig(wikipedia_topics=["red fox"], wikipedia_articles=3, wikipedia_api=f"{site}/w/api.php", **FAST)
    manifest = collect(cfg, tmp_path)
    (name,) = manifest["sources"]
    docs = records(tmp_path, name.removesuffix(".jsonl.gz"))
    assert [d["title"] for d in docs] == ["Red Fox 0", "Red Fox 1", "Red Fox 2"]
    assert docs[0]["url"] == f"{site}/wiki/Red_Fox_0" and docs[0]["license"] == "CC BY-SA 4.0"
    assert docs[0]["text"].startswith("Red Fox 0 is a topic.") and docs[0]["retrieved_at"]


def test_web_pages_robots_timeouts_and_retries(site, tmp_path):
    Site.hits.clear()
    urls = [f"{site}/fox.html", f"{site}/private/secret.html", f"{site}/slow.html", f"{site}/flaky.html", f"{site}/missing.html"]
    manifest = collect(CollectConfig(urls=urls, **FAST), tmp_path)
    (name,) = manifest["sources"]
    docs = records(tmp_path, name)
    assert [d["url"] for d in docs] == [f"{site}/fox.html", f"{site}/flaky.html"]
    assert "red fox lives in forests" in docs[0]["text"] and "Cookie settings" not in docs[0]["text"]
    assert "Home | About" not in docs[0]["text"] and docs[0]["title"] == "Foxes"
    reasons = {s["url"].rsplit("/", 1)[1]: s["reason"] for s in manifest["skipped_urls"]}
    assert reasons == {"secret.html": "robots.txt", "slow.html": "failed", "missing.html": "HTTP 404"}
    assert "/private/secret.html" not in Site.hits  # never fetched
    assert Site.hits["/slow.html"] == 3 and Site.hits["/flaky.html"] == 2  # retried; the 500 then succeeded
    assert set(Site.agents) == {USER_AGENT}


def test_a_page_is_decoded_by_its_own_charset_declaration(site, tmp_path):
    manifest = collect(CollectConfig(urls=[f"{site}/cafe.html", f"{site}/cafe-header.html"], **FAST), tmp_path)
    meta_page, header_page = records(tmp_path, next(iter(manifest["sources"])))
    for doc in (meta_page, header_page):
        assert CAFE in doc["text"] and "“fresh”" in doc["text"] and "\ufffd" not in doc["text"], doc["text"]
    assert meta_page["encoding"] == "page declaration: cp1252" and header_page["encoding"] == "http header: cp1252"


@pytest.mark.parametrize("content, content_type, decided", [
    # the header outranks the page; a byte-order mark outranks both
    (b'<meta charset="utf-8"><p>Caf\xe9</p>', "text/html; charset=windows-1252", "http header: cp1252"),
    (b'\xef\xbb\xbf<meta charset="windows-1252"><p>Caf\xc3\xa9</p>', "text/html; charset=windows-1252", "byte-order mark: utf-8"),
    (b'<meta http-equiv="Content-Type" content="text/html; charset=windows-1252"><p>Caf\xe9</p>', "text/html", "page declaration: cp1252"),
    (b'<?xml version="1.0" encoding="ISO-8859-1"?><p>Caf\xe9</p>', None, "page declaration: cp1252"),
    (b'<meta charset="utf-16"><p>Caf\xc3\xa9</p>', None, "page declaration: utf-8"),  # read as ASCII, so not UTF-16
    # a declaration the bytes contradict is passed over rather than turned into U+FFFD
    (b'<meta charset="utf-8"><p>Caf\xe9 cr\xe8me br\xfbl\xe9e, a dessert of custard under caramel</p>', None, "detected"),
])
def test_page_encoding_order(content, content_type, decided):
    text, where = decode_page(content, content_type)
    assert where.startswith(decided) and "Caf\u00e9" in text and "\ufffd" not in text and not text.startswith("\ufeff")


def test_interrupted_web_collection_resumes_without_refetching(site, tmp_path, monkeypatch):
    import trafilatura

    Site.hits.clear()
    extract = trafilatura.extract

    def interrupted_at_flaky(html, url=None, **kw):
        if "flaky" in url:
            raise KeyboardInterrupt
        return extract(html, url=url, **kw)

    cfg = CollectConfig(urls=[f"{site}/fox.html", f"{site}/flaky.html"], **FAST)
    monkeypatch.setattr(trafilatura, "extract", interrupted_at_flaky)
    with pytest.raises(KeyboardInterrupt):
        collect(cfg, tmp_path)
    assert not list(tmp_path.glob("*.jsonl.gz"))  # no half-written source file
    monkeypatch.setattr(trafilatura, "extract", extract)
    manifest = collect(cfg, tmp_path)
    docs = records(tmp_path, manifest["plan"][0])
    assert [d["url"] for d in docs] == [f"{site}/fox.html", f"{site}/flaky.html"]
    assert Site.hits["/fox.html"] == 1  # fetched once, before the interruption


def test_per_host_rate_limit(site, tmp_path):
    start = time.monotonic()
    collect(CollectConfig(urls=[f"{site}/fox.html", f"{site}/flaky.html?x=1"], **{**FAST, "per_host_delay": 0.4}), tmp_path)
    assert time.monotonic() - start >= 0.8  # robots.txt + two pages, 0.4 s apart


def test_huggingface_dataset_from_local_json(tmp_path):
    data = tmp_path / "stories.jsonl"
    data.write_text("".join(json.dumps({"story": f"Story number {i}."}) + "\n" for i in range(30)))
    cfg = CollectConfig(hf_datasets=[f"json?data_files={data}&text_field=story"], hf_max_rows=10)
    manifest = collect(cfg, tmp_path / "raw")
    (entry,) = manifest["sources"].values()
    docs = records(tmp_path / "raw", entry["file"].removesuffix(".jsonl.gz"))
    assert [d["text"] for d in docs] == [f"Story number {i}." for i in range(10)] and docs[0]["source"] == "hf:json"


def test_rerun_skips_collected_sources_and_files_keep_their_path(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello there\n")
    args = ["collect", "--out", str(tmp_path / "raw"), f"--collect.files={tmp_path / 'a.txt'}"]
    assert main(args) == 0
    assert main(args) == 0
    assert "already collected, skipped" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "raw" / "manifest.json").read_text())
    (doc,) = records(tmp_path / "raw", manifest["plan"][0])
    assert doc["path"].endswith("a.txt:1") and doc["text"] == "hello there"


def test_collected_folder_feeds_clean(tmp_path, capsys):
    from conftest import STORIES

    story = next(t.strip() for t in STORIES.read_text(encoding="utf-8").split("<|endoftext|>") if len(t.split()) > 200)
    words = story.split()
    copies = [" ".join(words[:i] + ["zebra"] + words[i + 1:]) for i in (20, 60, 100, 140)]
    (tmp_path / "s.txt").write_text("\n<|endoftext|>\n".join([story, *copies]))
    assert main(["collect", "--out", str(tmp_path / "raw"), f"--collect.files={tmp_path / 's.txt'}"]) == 0
    assert main(["clean", "--out", str(tmp_path / "clean"), f"--data.corpus={tmp_path / 'raw'}"]) == 0
    kept = (tmp_path / "clean" / "clean.jsonl").read_text().splitlines()
    report = json.loads((tmp_path / "clean" / "report.json").read_text())
    assert report["docs_in"] == 5 and len(kept) == 1 and report["dropped"]["near_duplicate"]["docs"] == 4


def test_run_collects_and_cleans_when_sources_are_configured(tmp_path, capsys):
    """The data stages of `tinylm run`: only the configured sources reach the corpus; reruns skip."""
    from tinylm.config import load_config
    from tinylm.prepare import prepare_data
    from conftest import STORIES

    stories = [t.strip() for t in STORIES.read_text(encoding="utf-8").split("<|endoftext|>") if len(t.split()) > 60]
    (tmp_path / "a.txt").write_text("\n<|endoftext|>\n".join(stories[:120] + stories[:5]))  # 5 exact copies
    (tmp_path / "b.txt").write_text("\n<|endoftext|>\n".join(stories[120:240]))
    run_dir = tmp_path / "run"
    cfg = load_config("tiny", {"collect.files": [str(tmp_path / "a.txt")], "tokenizer.vocab_size": 300})
    used = prepare_data(cfg, run_dir, progress=False)
    assert used.data.corpus == [str(run_dir / "clean" / "clean.jsonl")]
    report = json.loads((run_dir / "clean" / "report.json").read_text())
    assert report["docs_in"] == 125 and report["dropped"]["exact_duplicate"]["docs"] == 5
    assert json.loads((run_dir / "shards" / "meta.json").read_text())["splits"]["train"]["tokens"] > 0
    capsys.readouterr()

    prepare_data(cfg, run_dir, progress=False)
    out = capsys.readouterr().out
    assert "clean: up to date" in out and "tokenizer: up to date" in out and "shards: up to date" in out

    cfg_b = load_config("tiny", {"collect.files": [str(tmp_path / "b.txt")], "tokenizer.vocab_size": 300})
    prepare_data(cfg_b, run_dir, progress=False)
    cleaned = [json.loads(line)["text"] for line in (run_dir / "clean" / "clean.jsonl").open()]
    assert len(cleaned) == 120 and cleaned[0].split() == stories[120].split()  # a.txt's documents are not in the new corpus
