"""Reading documents: text files, JSON Lines, JSON lists and the built-in corpus, all streamed.

Every document keeps where it came from (`source` = file:line or package name). Errors name the
file, the line and the field.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from urllib.parse import parse_qsl

from .config import DataConfig

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet",)
KNOWN_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
BUILTIN = "builtin"
SIDECARS = ("manifest.json", "meta.json", "report.json")  # stage metadata, not text, when a folder is expanded
BUILTIN_PACKAGES = ("chitchat-dataset", "chatterbot-corpus")


class CorpusError(ValueError):
    """Input that cannot be read; the message names file, line and field."""


@dataclass
class Document:
    text: str
    source: str


def split_key(text: str) -> int:
    """A document's identity for the train/validation split, the same in every stage: a 64-bit hash
    of its NFC text with runs of whitespace made one space. So a conversation (its messages joined
    by newlines, see `conversation_text`) and the pretraining document holding the same text have
    one key, even after `clean` has normalised the document."""
    canonical = " ".join(unicodedata.normalize("NFC", text).split())
    return int.from_bytes(hashlib.blake2b(canonical.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def is_validation(text: str, fraction: float) -> bool:
    """Stable train/validation split by document: a hash of the text (`split_key`), not its position."""
    return fraction > 0 and split_key(text) / 2**64 < fraction


def conversation_text(messages: list[dict]) -> str:
    """A conversation as a pretraining document: its messages' contents, one a line."""
    return "\n".join(m["content"] for m in messages)


def split_documents(cfg: DataConfig) -> Iterator[tuple[Document, bool]]:
    """Every document of the corpus with its split (True = validation), decided before any training.

    "hash" keeps a document's split whatever else changes in the corpus; "tail" holds out the
    documents that start in the last val_fraction of the text (two passes: one counts characters).
    """
    if cfg.val_split == "hash":
        for doc in read_documents(cfg):
            yield doc, is_validation(doc.text, cfg.val_fraction)
    elif cfg.val_split == "tail":
        cut = (1 - cfg.val_fraction) * sum(len(doc.text) for doc in read_documents(cfg))
        seen = 0
        for doc in read_documents(cfg):
            yield doc, cfg.val_fraction > 0 and seen >= cut
            seen += len(doc.text)
    else:
        raise CorpusError(f"data.val_split must be 'hash' or 'tail', not {cfg.val_split!r}")


SPLIT_KEYS = "split_keys.npz"  # beside the shards: the split_key of every training and validation document


def record_split(pairs: Iterable[tuple[Document, bool]], keys: dict[str, list[int]]) -> Iterator[tuple[Document, bool]]:
    """Pass (document, held out) pairs through, appending each document's split_key to keys["val"] or keys["train"]."""
    for doc, held_out in pairs:
        keys["val" if held_out else "train"].append(split_key(doc.text))
        yield doc, held_out


def save_split_keys(folder: str | Path, keys: dict[str, list[int]]) -> Path:
    """Write folder/split_keys.npz (uint64 arrays "train" and "val") atomically."""
    import numpy as np

    path = Path(folder) / SPLIT_KEYS
    tmp = path.with_name(f".{SPLIT_KEYS}.tmp.npz")
    np.savez(tmp, **{split: np.asarray(sorted(set(k)), dtype=np.uint64) for split, k in keys.items()})
    os.replace(tmp, path)
    return path


def load_split_keys(folder: str | Path) -> dict[str, set[int]] | None:
    """The split keys saved beside a shard folder, or None when it has none (made before they were kept)."""
    import numpy as np

    path = Path(folder) / SPLIT_KEYS
    if not path.is_file():
        return None
    with np.load(path) as data:
        return {split: set(data[split].tolist()) for split in ("train", "val")}


def _suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


PIECE_BYTES = 1 << 20  # a line is read in pieces of at most this many bytes: one huge line never sits in memory whole
MAX_RECORD_BYTES = 64 << 20  # a JSON Lines record must be parsed whole: longer lines are refused


def _pieces(path: Path, limit: int | None = None) -> Iterator[tuple[int, str, bool]]:
    """(line number, text, whole) of a UTF-8 file (optionally .gz), each line in pieces of at most
    `limit` bytes: `whole` is True for a line read in one piece. A byte-order mark at the start is not
    text (Windows editors write one), so the first line starts at the character after it."""
    limit = limit or PIECE_BYTES
    decoder = codecs.getincrementaldecoder("utf-8")()
    with _open_binary(path) as f:
        lineno, continued, offset = 1, False, 0
        while raw := f.readline(limit):
            ends = raw.endswith(b"\n") or len(raw) < limit  # a short read is the end of the file
            if lineno == 1 and not continued and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                text = decoder.decode(raw, final=ends)
            except UnicodeDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: not valid UTF-8 (byte {offset + e.start})") from None
            yield lineno, text, ends and not continued
            offset = 0 if ends else offset + len(raw)
            lineno, continued = (lineno + 1, False) if ends else (lineno, True)


def _lines(path: Path, limit: int | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line, each read whole; CorpusError for a line over `limit` bytes."""
    limit = limit or MAX_RECORD_BYTES
    for lineno, text, whole in _pieces(path, limit):
        if not whole:
            raise CorpusError(f"{path}:{lineno}: a line of more than {limit >> 20} MiB; a JSON record is read whole, "
                              "so split it into several records (or give the text as a .txt file, read in pieces)")
        yield lineno, text


LONE_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _lone_surrogate(value, where: str) -> str | None:
    """The field path of the first string holding a lone surrogate (a JSON escape such as \\ud800
    that is half of a UTF-16 pair: no character, and no UTF-8 encoding), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"{where} (character {e.start}: \\u{ord(value[e.start]):04x})"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate(item, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def read_text_file(path: Path, cfg: DataConfig) -> Iterator[Document]:
    """Documents end at separator lines; without them, at the blank line after `txt_chunk_chars`.

    Memory stays bounded whatever the lines: a document that grows past `data.max_doc_chars` leaves in
    pieces as it is read (cut as `cut_document` cuts), never held whole.
    """
    buf: list[str] = []
    size, start = 0, 1
    cutter: Cutter | None = None

    def document() -> Iterator[Document]:
        text = "".join(buf).rstrip("\n")
        if cutter is not None:
            yield from cutter.feed(text)
            yield from cutter.finish()
        elif text.strip("\n").strip():
            yield Document(text.lstrip("\n"), f"{path}:{start}")

    for lineno, line, whole in _pieces(path):
        stripped = line.strip() if whole else None
        if whole and (stripped == cfg.doc_separator or (not stripped and size >= cfg.txt_chunk_chars)):
            yield from document()
            buf, size, start, cutter = [], 0, lineno + 1, None
            continue
        buf.append(line)
        size += len(line)
        if cfg.max_doc_chars and size > cfg.max_doc_chars:  # a long document: out in pieces as it comes
            text = "".join(buf)
            cutter = cutter or Cutter(f"{path}:{start}", cfg.max_doc_chars)
            yield from cutter.feed(text.lstrip("\n") if cutter.fresh else text)
            buf, size = [], 0
    yield from document()


def _text_of(record, fields: list[str], where: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected an object with a {' or '.join(map(repr, fields))} field, got {type(record).__name__}")
    for name in fields:
        if name in record:
            value = record[name]
            if not isinstance(value, str):
                raise CorpusError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
            return value
    raise CorpusError(f"{where}: no field {' or '.join(map(repr, fields))} (fields present: {', '.join(map(str, record)) or 'none'})")


def jsonl_records(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed record) of every non-blank line of a JSON Lines file (optionally .gz): the
    one JSON Lines reader. Raises CorpusError naming the file and line for bad UTF-8, bad JSON or a
    lone surrogate escape (naming the field too). A UTF-8 byte-order mark at the start is skipped."""
    for lineno, line in _lines(Path(path)):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise CorpusError(f"{path}:{lineno}: JSON nested too deeply to read (thousands of levels)") from None
        if LONE_SURROGATE_ESCAPE.search(line) and (field := _lone_surrogate(record, "")):
            raise CorpusError(f"{path}:{lineno}: field {field} holds a lone surrogate escape, which is no "
                              "character and has no UTF-8 form: write the whole pair (e.g. \\ud83d\\ude00) or the character")
        yield lineno, record


def parse_hf_spec(spec: str) -> tuple[str, str | None, dict]:
    """A Hugging Face dataset named as `owner/name[/config]?key=value&...`: (name, config, options)."""
    name, _, query = spec.partition("?")
    options = dict(parse_qsl(query))
    config = None
    if name.count("/") == 2:  # owner/dataset/config
        name, config = name.rsplit("/", 1)
    return name, config, options


def read_jsonl_file(path: Path, cfg: DataConfig) -> Iterator[Document]:
    for lineno, record in jsonl_records(path):
        text = _text_of(record, cfg.text_fields, f"{path}:{lineno}")
        if text.strip():
            yield Document(text, f"{path}:{lineno}")


def read_json_file(path: Path, cfg: DataConfig) -> Iterator[Document]:
    """A JSON list of records (the second seed's `[{"content": ..., "source": ...}]`), streamed with ijson."""
    import ijson

    with _open_binary(path) as f:
        if f.read(len(codecs.BOM_UTF8)) != codecs.BOM_UTF8:
            f.seek(0)
        try:
            for n, record in enumerate(ijson.items(f, "item", use_float=True)):
                text = _text_of(record, cfg.text_fields, f"{path}: item {n}")
                if _lone_surrogate(text, ""):
                    raise CorpusError(f"{path}: item {n}: its text holds a lone surrogate escape (no character, no UTF-8 form)")
                if text.strip():
                    source = record.get("source") if isinstance(record, dict) else None
                    yield Document(text, f"{path}#{n}" + (f" ({source})" if isinstance(source, str) else ""))
        except ijson.JSONError as e:
            raise CorpusError(f"{path}: invalid JSON list ({e})") from None


def read_parquet_file(path: Path, cfg: DataConfig) -> Iterator[Document]:
    """Parquet, streamed in row batches; the first of `text_fields` that is a column holds the text."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    table = pq.ParquetFile(path)
    columns = table.schema_arrow.names
    field = next((f for f in cfg.text_fields if f in columns), None)
    if field is None:
        raise CorpusError(f"{path}: no column {' or '.join(map(repr, cfg.text_fields))} (columns: {', '.join(columns)})")
    row = 0
    for batch in table.iter_batches(batch_size=1024, columns=[field]):
        for value in batch.column(0).to_pylist():
            if isinstance(value, str) and value.strip():
                yield Document(value, f"{path}#{row}")
            row += 1


READERS = {**{s: read_text_file for s in TEXT_SUFFIXES}, **{s: read_jsonl_file for s in JSONL_SUFFIXES},
           **{s: read_json_file for s in JSON_SUFFIXES}, **{s: read_parquet_file for s in PARQUET_SUFFIXES}}


def corpus_files(paths: Iterable[str]) -> list[Path]:
    """Expand folders (sorted, recursive) into the readable files they hold."""
    files: list[Path] = []
    for p in paths:
        if p == BUILTIN:
            continue
        path = Path(p)
        if path.is_dir():
            files += sorted(f for f in path.rglob("*") if f.is_file() and _suffix(f) in KNOWN_SUFFIXES
                            and f.name not in SIDECARS and not any(part.startswith(".") for part in f.relative_to(path).parts))
        elif path.is_file():
            if _suffix(path) not in KNOWN_SUFFIXES:
                raise CorpusError(f"{path}: unsupported file type (known: {', '.join(KNOWN_SUFFIXES)}, optionally .gz)")
            files.append(path)
        elif path.exists():
            raise CorpusError(f"{path}: not a regular file or folder (a pipe, socket or device): "
                              "tinylm reads each input twice, so save it to a file first")
        else:
            raise CorpusError(f"{path}: no such file or folder")
    return files


def read_documents(cfg: DataConfig) -> Iterator[Document]:
    """Every document of the configured corpus, in a fixed order; none longer than data.max_doc_chars."""
    files = corpus_files(cfg.corpus)
    for p in cfg.corpus:
        if p == BUILTIN:
            yield from builtin_documents()
    for path in files:
        for doc in READERS[_suffix(path)](path, cfg):
            if cfg.max_doc_chars and len(doc.text) > cfg.max_doc_chars:
                yield from cut_document(doc, cfg.max_doc_chars)
            else:
                yield doc


def cut_document(doc: Document, limit: int) -> Iterator[Document]:
    """Pieces of at most `limit` characters, cut after the last whitespace before the limit (or at
    the limit when there is none), so that one huge line cannot make one huge tokenizer call."""
    cutter = Cutter(doc.source, limit)
    yield from cutter.feed(doc.text)
    yield from cutter.finish(always_parts=True)


class Cutter:
    """Cuts a text that arrives in pieces into documents of at most `limit` characters, each ending
    after the last space or newline before the limit (or at the limit when there is none), holding at
    most `limit` characters plus one piece. Pieces are named `SOURCE#part-N`."""

    def __init__(self, source: str, limit: int):
        self.source, self.limit, self.held, self.part = source, limit, "", 0

    @property
    def fresh(self) -> bool:
        return not self.part and not self.held

    def feed(self, text: str) -> Iterator[Document]:
        self.held += text
        while len(self.held) > self.limit:
            end = self.limit
            space = max(self.held.rfind(" ", 0, end), self.held.rfind("\n", 0, end))
            end = space + 1 if space > 0 else end
            yield self._piece(self.held[:end])
            self.held = self.held[end:]

    def finish(self, always_parts: bool = False) -> Iterator[Document]:
        if self.held and (self.part or always_parts):
            yield self._piece(self.held)
        elif self.held.strip():
            yield Document(self.held, self.source)
        self.held = ""

    def _piece(self, text: str) -> Document:
        self.part += 1
        return Document(text, f"{self.source}#part-{self.part}")


def files_fingerprint(paths: list[str]) -> list[dict]:
    """What identifies input files: sizes and modification times; package versions for `builtin`."""
    items: list[dict] = []
    for p in paths:
        if p == BUILTIN:
            items.append({p: {pkg: metadata.version(pkg) for pkg in BUILTIN_PACKAGES}})
    for f in corpus_files(paths):
        st = os.stat(f)
        items.append({"path": str(f.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return items


def corpus_fingerprint(cfg: DataConfig) -> dict:
    return {"inputs": files_fingerprint(cfg.corpus), "text_fields": cfg.text_fields, "doc_separator": cfg.doc_separator,
            "txt_chunk_chars": cfg.txt_chunk_chars, "max_doc_chars": cfg.max_doc_chars, "val_fraction": cfg.val_fraction, "val_split": cfg.val_split}


# --- the built-in corpus: real English conversations from two PyPI packages -------------------
def builtin_conversations() -> Iterator[tuple[str, list[dict]]]:
    """(source, messages) pairs: chitchat-dataset dialogues, then chatterbot-corpus Q/A pairs.

    Speakers alternate; the first speaker is "user", the second "assistant".
    """
    import yaml

    chitchat = resources.files("chitchat_dataset") / "dataset.json"
    with chitchat.open("r", encoding="utf-8") as f:
        dialogues = json.load(f)  # 39 MB of JSON with timestamps; ~13 MB of text
    for key, dialogue in dialogues.items():
        messages = []
        for n, turn in enumerate(dialogue["messages"]):
            text = " ".join(m["text"].strip() for m in turn if m.get("text", "").strip())
            if text:
                messages.append({"role": "user" if n % 2 == 0 else "assistant", "content": text})
        if messages:
            yield f"chitchat-dataset:{key}", messages
    del dialogues
    english = resources.files("chatterbot_corpus") / "data" / "english"
    for entry in sorted(english.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yml"):
            continue
        data = yaml.safe_load(entry.read_text(encoding="utf-8"))
        for n, conv in enumerate(data.get("conversations") or []):
            turns = [str(t).strip() for t in conv if str(t).strip()]
            if len(turns) >= 2:
                messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
                yield f"chatterbot-corpus:{entry.name}#{n}", messages


def builtin_documents() -> Iterator[Document]:
    """The built-in pretraining corpus: each conversation as plain text, one turn per line.

    One document per conversation, short Q/A pairs too: the built-in SFT corpus holds the same
    conversations, and a document must be one conversation for both stages to hold it out alike."""
    for source, messages in builtin_conversations():
        yield Document(conversation_text(messages), source)
