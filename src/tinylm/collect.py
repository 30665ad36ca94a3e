"""Collecting text: local files, Hugging Face datasets, Wikipedia by topic, web pages by URL.

Every source becomes one `raw/<kind>-<name>.jsonl.gz` file of records
    {"text", "source", "url" or "path", "title", "license", "retrieved_at"}
written under a temporary name and renamed when the source is complete, and listed in
`raw/manifest.json`. Rerunning skips the sources whose file is already there.

The web is fetched politely: a real User-Agent, timeouts, retries with exponential backoff on
timeouts and 5xx answers, robots.txt respected, and at most one request per `per_host_delay`
seconds to any host. Main text is extracted with trafilatura, a maintained extractor that drops
navigation, footers and boilerplate (BeautifulSoup's get_text, the second seed's choice, keeps them).
A page is decoded from its bytes as the HTML standard says (a byte-order mark, the HTTP header, the
page's own declaration), then by charset-normalizer's detection; each record says which decided.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import os
import re
import time
import urllib.robotparser
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from urllib.parse import quote, urlsplit

from .config import CollectConfig, DataConfig
from .corpus import builtin_documents, parse_hf_spec, read_documents
from .files import read_json, write_json

USER_AGENT = "tinylm/0.1 (small language model trainer; +https://pypi.org/project/tinylm/)"
WIKIPEDIA_LICENSE = "CC BY-SA 4.0"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "source"


# --- HTTP: polite fetching -----------------------------------------------------------------------
class Fetcher:
    def __init__(self, cfg: CollectConfig):
        import httpx

        self.cfg = cfg
        self.client = httpx.Client(timeout=cfg.timeout, follow_redirects=True, headers={"User-Agent": USER_AGENT})
        self._last: dict[str, float] = {}
        self._robots: dict[str, urllib.robotparser.RobotFileParser | None] = {}
        self.log: list[dict] = []

    def _wait_turn(self, host: str) -> None:
        wait = self._last.get(host, 0.0) + self.cfg.per_host_delay - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._last[host] = time.monotonic()

    def get(self, url: str, params: dict | None = None):
        """GET with retries and backoff; returns the response or None (logged) after the last failure."""
        import httpx

        host = urlsplit(url).netloc
        delay = self.cfg.backoff
        for attempt in range(self.cfg.retries + 1):
            self._wait_turn(host)
            try:
                response = self.client.get(url, params=params)
                if response.status_code < 500:
                    return response
                problem = f"HTTP {response.status_code}"
            except httpx.HTTPError as e:
                problem = type(e).__name__
            self.log.append({"url": url, "attempt": attempt + 1, "problem": problem})
            if attempt < self.cfg.retries:
                time.sleep(delay)
                delay *= 2
        return None

    def allowed(self, url: str) -> bool:
        parts = urlsplit(url)
        root = f"{parts.scheme}://{parts.netloc}"
        if root not in self._robots:
            response = self.get(f"{root}/robots.txt")
            parser = None
            if response is not None and response.status_code == 200:
                parser = urllib.robotparser.RobotFileParser()
                parser.parse(response.text.splitlines())
            self._robots[root] = parser
        parser = self._robots[root]
        return parser is None or parser.can_fetch(USER_AGENT, url)


# --- decoding a page ------------------------------------------------------------------------------
# The WHATWG Encoding Standard maps these labels to windows-1252: browsers decode them so, and pages
# labelled latin-1 routinely hold 0x80-0x9f bytes (curly quotes, euro sign) that only cp1252 defines.
WINDOWS_1252_LABELS = {"iso-8859-1", "iso8859-1", "latin1", "latin-1", "l1", "ascii", "us-ascii", "cp819", "ibm819"}
META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9._:-]+)""", re.IGNORECASE)
XML_ENCODING = re.compile(rb"""^\s*<\?xml[^>]+encoding\s*=\s*["']([A-Za-z0-9._:-]+)""", re.IGNORECASE)
BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def _codec(label: str | None) -> str | None:
    """A Python codec name for an encoding label, or None when the label names no encoding we know."""
    if not label:
        return None
    label = label.strip().strip("\"'").lower()
    if label in WINDOWS_1252_LABELS:
        return "cp1252"
    try:
        return codecs.lookup(label).name
    except LookupError:
        return None


def page_encodings(content: bytes, content_type: str | None) -> Iterator[tuple[str, str]]:
    """(where it came from, codec) in the order the HTML standard trusts them: a byte-order mark, the
    HTTP header's charset, the page's own <meta charset> or XML declaration (within its first 4 KB),
    then charset-normalizer's guess from the bytes (run only when the others did not decode)."""
    found = []
    header = re.search(r"charset\s*=\s*[\"']?([^\s;\"']+)", content_type or "", re.IGNORECASE)
    if header and (codec := _codec(header.group(1))):
        found.append(("http header", codec))
    for bom, codec in BOMS:
        if content.startswith(bom):
            found.insert(0, ("byte-order mark", codec))  # the standard puts a BOM even before the header
            break
    head = content[:4096]
    declared = XML_ENCODING.search(head) or META_CHARSET.search(head)
    if declared and (codec := _codec(declared.group(1).decode("ascii", "replace"))):
        found.append(("page declaration", "utf-8" if codec.startswith(("utf-16", "utf-32")) else codec))  # read as ASCII: not UTF-16
    yield from found
    from charset_normalizer import from_bytes

    best = from_bytes(content).best()
    if best is not None and (codec := _codec(best.encoding)):
        yield "detected", codec


def decode_page(content: bytes, content_type: str | None = None) -> tuple[str, str]:
    """(text, where its encoding came from). The first encoding (see page_encodings) that decodes
    every byte wins, so no U+FFFD appears that the page did not hold; only when none does is the
    first one applied with replacement characters ("... with replacements")."""
    first = None
    for where, codec in page_encodings(content, content_type):
        first = first or (where, codec)
        try:
            text = content.decode(codec)
        except (UnicodeDecodeError, LookupError):
            continue
        return text.removeprefix("\ufeff"), f"{where}: {codec}"
    where, codec = first or ("default", "utf-8")
    return content.decode(codec, "replace").removeprefix("\ufeff"), f"{where}: {codec} with replacements"


# --- sources ---------------------------------------------------------------------------------------
def from_files(paths: list[str]) -> Iterator[dict]:
    cfg = DataConfig(corpus=paths)
    for doc in read_documents(cfg):
        yield {"text": doc.text, "source": "file", "path": doc.source, "title": None, "license": None, "retrieved_at": _now()}


def from_builtin() -> Iterator[dict]:
    for doc in builtin_documents():
        licence = "MIT" if doc.source.startswith("chitchat") else "BSD-3-Clause"
        yield {"text": doc.text, "source": "builtin", "path": doc.source, "title": None, "license": licence,
               "retrieved_at": _now()}


def from_hf_dataset(spec: str, max_rows: int) -> Iterator[dict]:
    """Stream rows of a Hugging Face dataset: a hub name, or a local builder such as json with data_files."""
    from datasets import load_dataset

    name, config, options = parse_hf_spec(spec)
    split, text_field = options.pop("split", "train"), options.pop("text_field", "text")
    rows = load_dataset(name, config, split=split, streaming=True, **options)
    for n, row in enumerate(rows):
        if n >= max_rows:
            return
        text = row.get(text_field)
        if not isinstance(text, str):
            raise ValueError(f"{spec}: row {n} has no string field {text_field!r} (fields: {', '.join(row)})")
        yield {"text": text, "source": f"hf:{name}", "url": f"https://huggingface.co/datasets/{name}", "path": f"{split}#{n}",
               "title": None, "license": options.get("license"), "retrieved_at": _now()}


def from_wikipedia(topic: str, cfg: CollectConfig, fetcher: Fetcher) -> Iterator[dict]:
    """Search the topic, then fetch each article's plain-text extract through the MediaWiki API."""
    api = cfg.wikipedia_api or f"https://{cfg.wikipedia_lang}.wikipedia.org/w/api.php"
    base = api.rsplit("/w/api.php", 1)[0]
    found = fetcher.get(api, {"action": "query", "list": "search", "srsearch": topic, "srlimit": cfg.wikipedia_articles,
                              "format": "json"})
    if found is None or found.status_code != 200:
        raise ConnectionError(f"wikipedia: search for {topic!r} failed at {api}")
    for hit in found.json().get("query", {}).get("search", []):
        title = hit["title"]
        page = fetcher.get(api, {"action": "query", "prop": "extracts", "explaintext": 1, "titles": title,
                                 "format": "json", "redirects": 1})
        if page is None or page.status_code != 200:
            continue
        for info in page.json().get("query", {}).get("pages", {}).values():
            text = info.get("extract") or ""
            if text.strip():
                yield {"text": text, "source": f"wikipedia:{cfg.wikipedia_lang}",
                       "url": f"{base}/wiki/{quote(info.get('title', title).replace(' ', '_'))}",
                       "title": info.get("title", title), "license": WIKIPEDIA_LICENSE, "retrieved_at": _now()}


def from_urls(urls: list[str], fetcher: Fetcher, skipped: list[dict], cache_dir: Path) -> Iterator[dict]:
    """Fetched pages are also kept one file per URL in cache_dir: an interrupted run refetches nothing."""
    import trafilatura

    cache_dir.mkdir(parents=True, exist_ok=True)
    for url in urls:
        cached = cache_dir / f"{hashlib.sha1(url.encode()).hexdigest()}.json"
        if cached.is_file():
            yield read_json(cached)
            continue
        if not fetcher.allowed(url):
            skipped.append({"url": url, "reason": "robots.txt"})
            continue
        response = fetcher.get(url)
        if response is None or response.status_code != 200:
            skipped.append({"url": url, "reason": "failed" if response is None else f"HTTP {response.status_code}"})
            continue
        html, encoding = decode_page(response.content, response.headers.get("content-type"))
        text = trafilatura.extract(html, url=url, include_comments=False, include_tables=False)
        if not text:
            skipped.append({"url": url, "reason": "no main text"})
            continue
        meta = trafilatura.extract_metadata(html)
        record = {"text": text, "source": "web", "url": url, "title": getattr(meta, "title", None),
                  "license": getattr(meta, "license", None), "encoding": encoding, "retrieved_at": _now()}
        write_json(cached, record)
        yield record


# --- writing ---------------------------------------------------------------------------------------
def _write_source(out_dir: Path, name: str, records: Iterable[dict]) -> dict:
    """One source into <name>.jsonl.gz, atomically; returns its manifest entry."""
    final = out_dir / f"{name}.jsonl.gz"
    tmp = out_dir / f".{name}.jsonl.gz.tmp"
    count = chars = 0
    # level 1: ~70 MB/s and 2.5x smaller; gzip's default 9 runs at 1-8 MB/s and would bound the whole stage
    with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
            chars += len(record["text"])
    os.replace(tmp, final)
    return {"file": final.name, "documents": count, "chars": chars, "finished_at": _now()}


def collect(cfg: CollectConfig, out_dir: str | Path) -> dict:
    """Collect every configured source into out_dir; sources already there are skipped."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.json"
    manifest = read_json(manifest_path) if manifest_path.is_file() else {"sources": {}}
    fetcher = Fetcher(cfg) if (cfg.wikipedia_topics or cfg.urls) else None
    skipped: list[dict] = []
    plan: list[tuple[str, Callable[[], Iterator[dict]]]] = []
    if cfg.builtin:
        plan.append(("builtin", from_builtin))
    if cfg.files:
        file_list_id = hashlib.sha1("\n".join(cfg.files).encode()).hexdigest()[:12]
        plan.append((f"files-{file_list_id}", lambda: from_files(cfg.files)))
    for spec in cfg.hf_datasets:
        plan.append((f"hf-{_slug(spec)}", lambda spec=spec: from_hf_dataset(spec, cfg.hf_max_rows)))
    for topic in cfg.wikipedia_topics:
        plan.append((f"wikipedia-{cfg.wikipedia_lang}-{_slug(topic)}", lambda topic=topic: from_wikipedia(topic, cfg, fetcher)))
    if cfg.urls:
        url_list_id = hashlib.sha1("\n".join(cfg.urls).encode()).hexdigest()[:12]  # stable across runs
        plan.append((f"web-{url_list_id}", lambda: from_urls(cfg.urls, fetcher, skipped, out_dir / ".web-pages")))
    for name, source in plan:
        if name in manifest["sources"] and (out_dir / manifest["sources"][name]["file"]).is_file():
            print(f"collect: {name} already collected, skipped")
            continue
        entry = _write_source(out_dir, name, source())
        manifest["sources"][name] = entry
        print(f"collect: {name}: {entry['documents']:,} documents, {entry['chars']:,} characters")
        write_json(manifest_path, {**manifest, "config": asdict(cfg)})
    manifest["plan"] = [name for name, _ in plan]  # the sources this configuration asks for
    if fetcher is not None:
        manifest["http_problems"] = fetcher.log
        manifest["skipped_urls"] = skipped
    write_json(manifest_path, {**manifest, "config": asdict(cfg)})
    return manifest
