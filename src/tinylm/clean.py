"""Cleaning a corpus: normalise, filter, drop exact and near duplicates, report what each rule dropped.

    documents -> normalise -> quality filters -> exact dedup -> near dedup (MinHash + LSH) -> clean.jsonl

Per-document work (normalising, filtering, MinHash signatures) runs in a pool of worker processes
with a bounded number of batches in flight; the two dedup indexes live in the main process and see
documents in corpus order, so the first copy of a document is the one kept. Near-duplicates are
found with MinHash LSH (`datasketch` signatures and banding, the compact index of dedup.py): each
document is compared with the few that share a band of its signature, never with every other
document (the second seed's all-pairs loop is O(n^2)). Memory per kept document: ~350 bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .config import CleanConfig
from .corpus import Document
from .dedup import KeyIndex, MinHashIndex, text_key
from .files import atomic_dir, write_json, write_text
from .shards import run_in_pool

RULES = ("too_short", "too_long", "too_few_words", "short_sentences", "long_sentences", "few_unique_chars",
         "symbols", "digits", "repeated_lines", "repeated_ngrams", "language", "exact_duplicate", "near_duplicate")
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


# --- words and sentences in every script ------------------------------------------------------------
def _char_class(ranges: list[tuple[int, int]], keep=lambda c: True) -> str:
    """A regex character class body (no brackets) of the characters in the ranges that `keep` accepts."""
    out, start, prev = [], None, None
    for code in (c for a, b in ranges for c in range(a, b + 1) if keep(chr(c))):
        if start is not None and code == prev + 1:
            prev = code
            continue
        if start is not None:
            out.append(re.escape(chr(start)) + (f"-{re.escape(chr(prev))}" if prev > start else ""))
        start = prev = code
    if start is not None:
        out.append(re.escape(chr(start)) + (f"-{re.escape(chr(prev))}" if prev > start else ""))
    return "".join(out)


# Scripts written without spaces between words (scriptio continua): Thai, Lao, Myanmar, Khmer,
# Hiragana, Katakana and Han. In them every letter counts as one word, the convention of the word
# counts of Microsoft Word and Google Docs for Chinese and Japanese (a Chinese word is 1-2 characters).
# A Thai, Lao, Khmer or Myanmar word is several letters, so there the same count overstates words:
# min_words is lenient, min_sentence_words lets menus through and max_sentence_words is strict
# (a segmenter with a dictionary, such as PyThaiNLP's, would count them right).
UNSPACED = [(0x0E00, 0x0EFF), (0x1000, 0x109F), (0x1780, 0x17FF), (0x3040, 0x30FF), (0x31F0, 0x31FF),
            (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0xFF66, 0xFF9F), (0x20000, 0x323AF)]
_UNSPACED = "".join(f"{chr(a)}-{chr(b)}" for a, b in UNSPACED)  # none of them is special in a class
_MARKS = _char_class([(0x0300, 0x036F), *UNSPACED[:5]], lambda c: unicodedata.category(c).startswith("M"))
# a letter of an unspaced script with its combining marks (Thai vowel and tone marks), or a run of
# word characters of any other script
WORD = re.compile(rf"[^\W{_UNSPACED}]+|(?=\w)[{_UNSPACED}][{_MARKS}]*")
# .!? before a space or the end; the full-stop marks of CJK (。！？), Devanagari (।॥), Arabic (؟۔),
# Armenian, Ethiopic, Myanmar and Khmer; and in Thai and Lao, which end sentences with a space and
# no mark, a space between two of their letters
_STOPS = "。！？｡\u0964\u0965\u061f\u06d4\u0589\u1362\u104b\u17d4\u17d5"
_THAI_LAO = "\u0e01-\u0eff"
SENTENCE_END = re.compile(rf"[.!?{_STOPS}{_THAI_LAO}]"  # one class first, so the scan skips to candidates fast
                          rf"(?:(?<=[.!?])[.!?]*(?:\s|$)"  # .!? before a space or the end
                          rf"|(?<=[{_STOPS}])[{_STOPS}]*"  # another script's full stop, anywhere
                          rf"|(?<=[{_THAI_LAO}])\s+(?=[{_THAI_LAO}]))")  # a Thai or Lao letter and the spaces after it
# Allowed besides letters, digits and spaces: punctuation and combining marks of every script in the
# Basic Multilingual Plane (Unicode categories P* and M*, so 。，「」 and Thai vowel marks are no symbols)
_PUNCTUATION = _char_class([(0x0000, 0xFFFF)], lambda c: unicodedata.category(c)[0] in "PM")
SYMBOL = re.compile(rf"[^\w\s{_PUNCTUATION}]|_")  # not a letter, digit, space, punctuation or mark
DIGIT = re.compile(r"\d")
MINHASH_SCHEME = "affine32"  # datasketch >= 2 asks for it when signatures travel between processes


# --- normalisation ---------------------------------------------------------------------------------
def normalise(text: str, cfg: CleanConfig) -> str:
    """NFC (or NFKC), no control characters, unified newlines, trimmed lines, at most one blank line."""
    text = unicodedata.normalize("NFKC" if cfg.nfkc else "NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = CONTROL.sub("", text)
    lines = [re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in text.split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    if cfg.rejoin_wrapped:
        text = "\n\n".join(" ".join(p.split("\n")) for p in text.split("\n\n"))
    return text


# --- quality filters -------------------------------------------------------------------------------
def failed_rule(text: str, cfg: CleanConfig) -> str | None:
    """The first quality rule the text breaks, or None."""
    n = len(text)
    if n < cfg.min_chars:
        return "too_short"
    if n > cfg.max_chars:
        return "too_long"
    words = WORD.findall(text)
    if len(words) < cfg.min_words:
        return "too_few_words"
    sentences = max(1, len(SENTENCE_END.findall(text)))
    mean_sentence = len(words) / sentences
    if mean_sentence < cfg.min_sentence_words:
        return "short_sentences"
    if mean_sentence > cfg.max_sentence_words:
        return "long_sentences"
    if len(set(text)) < cfg.min_unique_chars:
        return "few_unique_chars"
    if len(SYMBOL.findall(text)) / n > cfg.max_symbol_ratio:
        return "symbols"
    if len(DIGIT.findall(text)) / n > cfg.max_digit_ratio:
        return "digits"
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if len(lines) > 1 and 1 - len(set(lines)) / len(lines) > cfg.max_dup_line_ratio:
        return "repeated_lines"
    lowered = [w.lower() for w in words]
    trigrams = Counter(zip(lowered, lowered[1:], lowered[2:]))
    if trigrams and len(words) >= 30:
        gram, count = trigrams.most_common(1)[0]
        if count > 1 and count * 3 / len(words) > cfg.max_top_ngram_ratio:
            return "repeated_ngrams"
    if cfg.languages:
        language, probability = identify_language(text)
        if language not in cfg.languages or probability < cfg.min_language_score:
            return "language"
    return None


_identifier = None


def identify_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) from py3langid's bundled model (97 languages, no network)."""
    global _identifier
    if _identifier is None:
        from py3langid.langid import MODEL_DIR, MODEL_FILE, LanguageIdentifier

        _identifier = LanguageIdentifier.from_modelpath(MODEL_DIR / MODEL_FILE, norm_probs=True)
    language, probability = _identifier.classify(text[:4000])  # a few thousand characters decide it
    return language, float(probability)


# --- duplicate keys --------------------------------------------------------------------------------
def exact_key(words: list[str]) -> bytes:
    """Of the lowercased words: case, punctuation and spacing do not make two documents different."""
    return hashlib.blake2b(" ".join(words).encode(), digest_size=8).digest()


_word_hashes: dict[str, int] = {}  # a cache: most words of a corpus repeat


def shingle_hashes(words: list[str], k: int) -> np.ndarray:
    """32-bit hashes of the document's word k-grams (its shingle set), computed with numpy.

    Each word is hashed once (CRC-32); a k-gram's hash is a polynomial of its words' hashes.
    """
    words = words or [""]
    if len(_word_hashes) > 2_000_000:
        _word_hashes.clear()
    word_hashes = np.fromiter((_word_hashes.get(w) or _word_hashes.setdefault(w, zlib.crc32(w.encode())) for w in words),
                              np.uint64, len(words))
    n = max(1, len(words) - k + 1)
    h = np.zeros(n, np.uint64)
    for j in range(min(k, len(words))):
        h = h * np.uint64(0x100000001B3) + word_hashes[j:j + n]  # wraps mod 2^64
    return np.unique((h >> np.uint64(32)).astype(np.uint32))


_permutations: dict[int, object] = {}


def signature(words: list[str], cfg: CleanConfig) -> np.ndarray:
    """MinHash signature (datasketch) of the shingles of the document's lowercased words."""
    from datasketch import MinHash

    if cfg.minhash_perm not in _permutations:  # drawn once per process: the same seed gives the same ones
        _permutations[cfg.minhash_perm] = MinHash(cfg.minhash_perm, seed=1, scheme=MINHASH_SCHEME).permutations
    m = MinHash(cfg.minhash_perm, seed=1, hashfunc=int, permutations=_permutations[cfg.minhash_perm], scheme=MINHASH_SCHEME)
    m.update_batch(shingle_hashes(words, cfg.shingle_words).tolist())
    return m.hashvalues


_cfg: CleanConfig | None = None


def _init_worker(cfg: CleanConfig) -> None:
    global _cfg
    _cfg = cfg


def _process(batch: list[tuple[str, str]]) -> list[tuple[str, str, str | None, bytes | None, np.ndarray | None]]:
    """(text, source) -> (normalised text, source, failed rule, exact key, signature)."""
    cfg = _cfg
    out = []
    for text, source in batch:
        text = normalise(text, cfg)
        rule = failed_rule(text, cfg)
        if rule:
            out.append((text, source, rule, None, None))
            continue
        words = WORD.findall(text.lower())
        sig = signature(words, cfg) if cfg.near_dup_threshold > 0 else None
        out.append((text, source, None, exact_key(words) if cfg.exact_dedup else None, sig))
    return out


def _batches(docs: Iterable[Document], size: int = 256) -> Iterator[list[tuple[str, str]]]:
    batch = []
    for doc in docs:
        batch.append((doc.text, doc.source))
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class Report:
    """Counts, bytes and examples per rule, and the duplicate clusters."""

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        self.docs_in = self.docs_out = self.bytes_in = self.bytes_out = 0
        self.dropped = {rule: {"docs": 0, "bytes": 0, "examples": []} for rule in RULES}
        self.clusters: dict[str, list] = {}  # kept source -> [number dropped as its duplicates, the first few]

    def drop(self, rule: str, text: str, source: str, duplicate_of: str | None = None) -> None:
        entry = self.dropped[rule]
        entry["docs"] += 1
        entry["bytes"] += len(text.encode("utf-8"))
        if len(entry["examples"]) < self.cfg.examples_per_rule:
            entry["examples"].append({"source": source, "text": text[:300], **({"duplicate_of": duplicate_of} if duplicate_of else {})})
        if duplicate_of:
            cluster = self.clusters.setdefault(duplicate_of, [0, []])
            cluster[0] += 1
            if len(cluster[1]) < 10:
                cluster[1].append(source)

    def as_dict(self) -> dict:
        biggest = sorted(self.clusters.items(), key=lambda kv: -kv[1][0])[:20]
        return {"docs_in": self.docs_in, "docs_out": self.docs_out, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "dropped": self.dropped, "duplicate_clusters": len(self.clusters),
                "largest_clusters": [{"kept": k, "dropped": dropped, "size": n + 1} for k, (n, dropped) in biggest]}

    def markdown(self) -> str:
        rows = [f"| {rule} | {d['docs']:,} | {d['bytes']:,} |" for rule, d in self.dropped.items() if d["docs"]]
        lines = ["# Cleaning report\n", f"{self.docs_in:,} documents in ({self.bytes_in:,} bytes), "
                 f"{self.docs_out:,} kept ({self.bytes_out:,} bytes).\n",
                 "| rule | documents dropped | bytes dropped |", "|---|---|---|", *rows, ""]
        for rule, d in self.dropped.items():
            for ex in d["examples"]:
                lines.append(f"- **{rule}** `{ex['source']}`: {ex['text'][:120]!r}")
        return "\n".join(lines) + "\n"


def clean_corpus(docs: Iterable[Document], out_dir: str | Path, cfg: CleanConfig, workers: int = 0,
                 progress: bool = True) -> dict:
    """Write out_dir/clean.jsonl, report.json and report.md; returns the report."""
    report = Report(cfg)
    kept_sources: list[str] = []  # both indexes map keys to positions in this list
    exact = KeyIndex() if cfg.exact_dedup else None
    workers = workers or os.cpu_count() or 1
    with atomic_dir(out_dir, "clean", legacy=("clean.jsonl",)) as tmp, open(tmp / "clean.jsonl", "w", encoding="utf-8") as out:
        near = (MinHashIndex(cfg.near_dup_threshold, cfg.minhash_perm, tmp / "signatures.tmp")
                if cfg.near_dup_threshold > 0 else None)
        bar = tqdm(desc="clean", unit="doc", disable=not progress or None)
        for results in run_in_pool(_batches(docs), _process, _init_worker, (cfg,), workers):
            for text, source, rule, key, sig in results:
                report.docs_in += 1
                report.bytes_in += len(text.encode("utf-8"))
                bar.update(1)
                if rule:
                    report.drop(rule, text, source)
                    continue
                if exact is not None and len(same := exact.get(text_key(key))):
                    report.drop("exact_duplicate", text, source, kept_sources[same[0]])
                    continue
                if near is not None:
                    similar = near.find(sig)
                    if similar is not None:
                        report.drop("near_duplicate", text, source, kept_sources[similar])
                        continue
                    near.add(sig)
                if exact is not None:
                    exact.add(text_key(key), len(kept_sources))
                kept_sources.append(source)
                out.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
                report.docs_out += 1
                report.bytes_out += len(text.encode("utf-8"))
        if near is not None:
            near.close()
            (tmp / "signatures.tmp").unlink()
        bar.close()
        out.flush()
        result = report.as_dict()
        write_json(tmp / "report.json", result)
        write_text(tmp / "report.md", report.markdown())
    return result


# --- contamination: validation or benchmark text inside the training set -------------------------
PROBE_FIELDS = ["text", "content", "ctx", "sentence_good", "question", "prompt"]


def _ngrams(text: str, n: int) -> set[int]:
    words = WORD.findall(text.lower())
    return {hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1)}


def contamination_report(train_texts: Iterable[str], probes: dict[str, list[str]], n: int = 13) -> dict:
    """For each probe set, the documents sharing at least one word n-gram with the training text.

    The probe n-grams are indexed (they are few); the training text is streamed past them once.
    Probe documents shorter than n words cannot be checked and are counted as such.
    """
    index: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for name, texts in probes.items():
        for i, text in enumerate(texts):
            for gram in _ngrams(text, n):
                index[gram].append((name, i))
    hits: dict[str, set[int]] = {name: set() for name in probes}
    for text in train_texts:
        for gram in _ngrams(text, n) & index.keys():
            for name, i in index[gram]:
                hits[name].add(i)
    return {name: {"docs": len(texts), "too_short_to_check": sum(len(WORD.findall(t)) < n for t in texts),
                   "contaminated": len(hits[name]), "share": round(len(hits[name]) / max(1, len(texts)), 4),
                   "examples": [texts[i][:200] for i in sorted(hits[name])[:3]]}
            for name, texts in probes.items()}


def check_contamination(clean_file: Path, cfg: CleanConfig, val_fraction: float) -> dict:
    """Held-out documents of the cleaned corpus and the configured benchmark files vs its training documents."""
    from .config import DataConfig
    from .corpus import is_validation, read_documents

    def cleaned():
        with open(clean_file, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]

    probes = {"validation": [t for t in cleaned() if is_validation(t, val_fraction)]}
    for path in cfg.contamination:
        probes[Path(path).name] = [d.text for d in read_documents(DataConfig(corpus=[path], text_fields=PROBE_FIELDS))]
    train = (t for t in cleaned() if not is_validation(t, val_fraction))
    return contamination_report(train, probes, cfg.contamination_ngram)
