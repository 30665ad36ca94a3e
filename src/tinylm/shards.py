"""Corpus -> token shards on disk: flat arrays of uint16/uint32 ids, read back with np.memmap.

Documents stream in, are encoded by a pool of worker processes (at most a few batches in flight,
so memory does not grow with the corpus), and are appended to `train_NNNNN.bin` / `val_NNNNN.bin`.
Each document is written as <|bos|> text <|eos|>. The folder is built under a temporary name and
renamed when complete; `meta.json` records counts, dtype and the tokenizer fingerprint.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .config import DataConfig
from .corpus import Document
from .files import atomic_dir, read_json, write_json
from .tokenizer import Tokenizer

SPLITS = ("train", "val")
BATCH_CHARS = 1 << 18  # characters of text per worker task

_worker_tok: Tokenizer | None = None
PART = re.compile(r"#part-(\d+)$")  # the source of a piece of a document cut by data.max_doc_chars


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tok
    _worker_tok = Tokenizer.load(tokenizer_dir)


def _encode_batch(texts_and_splits: list[tuple[str, bool]]) -> dict:
    """Encode a batch of documents; returns token arrays and counts per split."""
    tok = _worker_tok
    assert tok is not None
    dtype = token_dtype(tok.vocab_size)
    out = {}
    for split, want_val in (("train", False), ("val", True)):
        texts = [t for t, v in texts_and_splits if v == want_val]
        ids = tok.encode_batch(texts) if texts else []
        flat = [i for doc in ids for i in (tok.bos_id, *doc, tok.eos_id)]
        out[split] = {"ids": np.asarray(flat, dtype=dtype), "docs": len(texts),
                      "bytes": sum(len(t.encode("utf-8")) for t in texts)}
    return out


def _batches(docs: Iterable[tuple[Document, bool]]) -> Iterator[list[tuple[str, bool]]]:
    batch, size = [], 0
    for doc, held_out in docs:
        batch.append((doc.text, held_out))
        size += len(doc.text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class ShardWriter:
    """Appends token arrays to numbered files of at most `shard_tokens` tokens."""

    def __init__(self, folder: Path, split: str, shard_tokens: int, dtype: np.dtype):
        self.folder, self.split, self.limit, self.dtype = folder, split, shard_tokens, dtype
        self.files: list[dict] = []
        self.docs = self.bytes = 0
        self._f = None
        self._n = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._f is None:
                name = f"{self.split}_{len(self.files):05d}.bin"
                self._f = open(self.folder / name, "wb")
                self.files.append({"name": name, "tokens": 0})
            room = self.limit - self._n
            chunk, ids = ids[:room], ids[room:]
            chunk.tofile(self._f)
            self._n += len(chunk)
            self.files[-1]["tokens"] = self._n
            if self._n >= self.limit:
                self.close()

    def close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f, self._n = None, 0

    def summary(self) -> dict:
        return {"files": self.files, "tokens": sum(f["tokens"] for f in self.files),
                "docs": self.docs, "bytes": self.bytes}


def run_in_pool(batches: Iterator, fn, initializer, initargs: tuple, workers: int) -> Iterator:
    """fn over batches in order, in `workers` processes, at most 2 * workers batches in flight.

    Bounded in-flight work keeps memory flat however long the input (Pool.imap would read ahead
    without limit). With one worker everything runs in this process.
    """
    if workers <= 1:
        initializer(*initargs)
        yield from map(fn, batches)
        return
    # the tokenizer's own thread pool must not be live in forked children
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(workers, initializer=initializer, initargs=initargs) as pool:
            pending: deque = deque()
            for batch in batches:
                pending.append(pool.apply_async(fn, (batch,)))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def build_shards(docs: Iterable[tuple[Document, bool]], tokenizer_dir: str | Path, out_dir: str | Path, cfg: DataConfig,
                 extra_meta: dict | None = None, progress: bool = True) -> dict:
    """Tokenize a stream of (document, is validation) pairs into train/val shards under out_dir; returns the meta."""
    tokenizer_dir = Path(tokenizer_dir)
    tok = Tokenizer.load(tokenizer_dir)
    dtype = token_dtype(tok.vocab_size)
    workers = cfg.workers or os.cpu_count() or 1
    with atomic_dir(out_dir, "shards", legacy=("meta.json",)) as tmp:
        writers = {s: ShardWriter(tmp, s, cfg.shard_tokens, dtype) for s in SPLITS}
        bar = tqdm(desc="shards", unit="tok", unit_scale=True, disable=not progress or None)
        cut = {"documents": 0, "pieces": 0, "max_doc_chars": cfg.max_doc_chars}

        def counted(docs):
            for doc, held_out in docs:
                part = PART.search(doc.source)
                if part:
                    cut["pieces"] += 1
                    cut["documents"] += part.group(1) == "1"
                yield doc, held_out

        batches = _batches(counted(docs))
        for result in run_in_pool(batches, _encode_batch, _init_worker, (str(tokenizer_dir),), workers):
            for split, part in result.items():
                writers[split].write(part["ids"])
                writers[split].docs += part["docs"]
                writers[split].bytes += part["bytes"]
                bar.update(len(part["ids"]))
        bar.close()
        for w in writers.values():
            w.close()
        meta = {
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "tokenizer_fingerprint": tok.fingerprint,
            "splits": {s: w.summary() for s, w in writers.items()},
            "cut_documents": cut,
            **(extra_meta or {}),
        }
        if meta["splits"]["train"]["tokens"] == 0:
            raise ValueError("the corpus produced no training tokens: is it empty?")
        write_json(tmp / "meta.json", meta)
    return meta


def load_split(shard_dir: str | Path, split: str) -> tuple[list[np.memmap], dict]:
    """Memory-map the shard files of one split; returns (arrays, split meta)."""
    shard_dir = Path(shard_dir)
    meta = read_json(shard_dir / "meta.json")
    info = meta["splits"][split]
    arrays = []
    for f in info["files"]:
        path = shard_dir / f["name"]
        expected = f["tokens"] * np.dtype(meta["dtype"]).itemsize
        if path.stat().st_size != expected:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, meta.json says {expected}: shard is damaged")
        if f["tokens"]:
            arrays.append(np.memmap(path, dtype=meta["dtype"], mode="r"))
    return arrays, {**info, "dtype": meta["dtype"], "vocab_size": meta["vocab_size"],
                    "tokenizer_fingerprint": meta["tokenizer_fingerprint"]}
