"""Near-duplicate removal at scale: tinylm's MinHash-LSH vs the second seed's all-pairs Jaccard.

    python benchmarks/dedup.py --sizes 100000 1000000

Two synthetic corpora, each with 10% planted near-duplicates:
- "zipf": documents of 80 words from a Zipf-distributed vocabulary; a copy of an earlier document
  with 1 word of 80 replaced (5-gram Jaccard ~0.88, above the 0.8 threshold);
- "template": sites of 500 pages that share a 136-word template and have 40 words of their own
  (Jaccard ~0.6 between two pages of a site, so each page shares an LSH band with ~60 kept pages);
  a copy of an earlier page of the same site with 1 of its own words replaced (Jaccard ~0.94).
Each size runs `clean_corpus` (filters off, exact + near dedup on) in its own process and reports
documents/s, recall and precision on the planted duplicates and peak memory; then the growth from the
smallest to the largest size. The all-pairs method is timed on a small sample and extrapolated as n^2.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

WORDS = 80
PLANTED = 0.10
SITE_PAGES, TEMPLATE_WORDS, OWN_WORDS = 500, 136, 40


def is_planted(i: int) -> bool:
    return i > 0 and np.random.default_rng((8, i)).random() < PLANTED


def original_words(j: int, vocab: np.ndarray) -> np.ndarray:
    """Document j's words, regenerated from its own seed: the generator holds no corpus in memory."""
    return vocab[np.minimum(np.random.default_rng((7, j)).zipf(1.3, WORDS), len(vocab)) - 1]


def documents(n: int):
    """(text, source) pairs; sources of planted copies are 'dup-<i>-of-<j>'."""
    from tinylm.corpus import Document

    rng = np.random.default_rng(0)
    vocab = np.array([f"w{i}" for i in range(50_000)])
    for i in range(n):
        if is_planted(i):
            j = int(rng.integers(i))
            while is_planted(j):
                j -= 1
            words = original_words(j, vocab).copy()
            where = rng.choice(WORDS, 1, replace=False)  # one word in 80: 5-gram Jaccard ~0.88 > 0.8
            words[where] = vocab[rng.integers(len(vocab), size=len(where))]
            yield Document(" ".join(words), f"dup-{i}-of-{j}")
        else:
            yield Document(" ".join(original_words(i, vocab)), f"doc-{i}")


def template_documents(n: int):
    """Pages of sites built on templates; sources of planted copies are 'dup-<i>-of-<j>'."""
    from tinylm.corpus import Document

    rng = np.random.default_rng(1)
    vocab = np.array([f"w{i}" for i in range(50_000)])
    template = None
    for i in range(n):
        site, first = divmod(i, SITE_PAGES)[0], i - i % SITE_PAGES
        if i == first:
            template = " ".join(vocab[np.random.default_rng((9, site)).integers(len(vocab), size=TEMPLATE_WORDS)])

        def own(j: int) -> np.ndarray:
            return vocab[np.random.default_rng((7, j)).integers(len(vocab), size=OWN_WORDS)]

        if i > first and is_planted(i):
            j = int(rng.integers(first, i))
            while is_planted(j) and j > first:
                j -= 1
            words = own(j).copy()
            words[rng.integers(OWN_WORDS)] = vocab[rng.integers(len(vocab))]
            yield Document(template + " " + " ".join(words), f"dup-{i}-of-{j}")
        else:
            yield Document(template + " " + " ".join(own(i)), f"doc-{i}")


CORPORA = {"zipf": documents, "template": template_documents}


def run_one(n: int, corpus: str = "zipf") -> dict:
    from tinylm.clean import clean_corpus
    from tinylm.config import CleanConfig

    off = dict(min_chars=0, max_chars=10**9, min_words=0, min_sentence_words=0, max_sentence_words=10**9,
               min_unique_chars=0, max_symbol_ratio=1.0, max_digit_ratio=1.0, max_dup_line_ratio=1.0,
               max_top_ngram_ratio=1.0, examples_per_rule=0)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        report = clean_corpus(CORPORA[corpus](n), out, CleanConfig(**off), progress=False)
        seconds = time.perf_counter() - start
        own_peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024  # before bookkeeping
        workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        kept = {json.loads(line)["source"] for line in open(f"{out}/clean.jsonl")}
    planted = caught = originals_dropped = 0
    for doc in CORPORA[corpus](n):  # regenerated (seeded): the ground truth
        if doc.source.startswith("dup-"):
            planted += 1
            caught += doc.source not in kept
        else:
            originals_dropped += doc.source not in kept
    return {"corpus": corpus, "docs": n, "seconds": round(seconds, 1), "docs_per_s": round(n / seconds), "planted": planted,
            "recall": round(caught / max(1, planted), 4), "precision": round(caught / max(1, caught + originals_dropped), 4),
            "kept": report["docs_out"], "peak_rss_mb": round(max(own_peak, workers_peak) / 2**20)}


def all_pairs_seconds(n: int) -> float:
    """The second seed's method: Jaccard similarity of 3-word shingle sets for every pair."""
    docs = [d.text.split() for d in documents(n)]
    shingles = [{tuple(w[i:i + 3]) for i in range(len(w) - 2)} for w in docs]
    start = time.perf_counter()
    for a in range(n):
        for b in range(a + 1, n):
            inter = len(shingles[a] & shingles[b])
            _ = inter / (len(shingles[a]) + len(shingles[b]) - inter)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--corpora", nargs="+", choices=sorted(CORPORA), default=["zipf", "template"])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a single measurement, in this process
    parser.add_argument("--pairs-sample", type=int, default=2000)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.corpora[0])))
        return
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"machine: {cpu}, {os.cpu_count()} cores")
    for corpus in args.corpora:
        results = []
        for n in args.sizes:
            out = subprocess.run([sys.executable, __file__, "--one", str(n), "--corpora", corpus],
                                 capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"MinHash-LSH  {corpus:<8} {n:>9,} docs: {r['seconds']:>7.1f} s  {r['docs_per_s']:>7,} docs/s  "
                  f"recall {r['recall']:.3f}  precision {r['precision']:.3f}  peak {r['peak_rss_mb']} MB")
        if len(results) > 1:
            a, b = results[0], results[-1]
            print(f"growth {corpus} {a['docs']:,} -> {b['docs']:,} docs ({b['docs'] / a['docs']:.0f}x): "
                  f"time {b['seconds'] / a['seconds']:.1f}x, memory {b['peak_rss_mb'] / a['peak_rss_mb']:.1f}x")
    t = all_pairs_seconds(args.pairs_sample)
    for n in args.sizes:
        estimate = t * (n / args.pairs_sample) ** 2
        print(f"all-pairs    {args.pairs_sample:,} docs: {t:.1f} s -> {n:,} docs: ~{estimate:,.0f} s = {estimate / 3600:,.1f} h (n^2)")


if __name__ == "__main__":
    main()
