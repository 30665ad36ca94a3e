"""The data stages on a 1 GB generated corpus: collect -> clean -> tokenizer -> shards, peak memory of each.

    python benchmarks/corpus.py --gb 1

Generates JSONL files of documents (Zipf-distributed words in sentences, 1.5-5 KB each) with 5%
planted exact copies (case and spacing changed) and 5% planted near copies (two words changed),
then runs each stage as its own `tinylm` process, as a user would, and samples the resident memory
of the process and all its children (the worker pool) every 0.5 s. Prints per stage: wall time,
input MB/s, peak RSS of the whole process tree and of the main process; and the planted duplicates
the clean stage caught. The target of the data issue: every stage under 1.5 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

VOCAB = 30_000
PLANTED = 0.05  # each of exact and near copies


def letters(k: int) -> str:
    """A made-up word for vocabulary entry k: k written in base 26 with letters (no digits to trip the filters)."""
    word = ""
    while True:
        k, rest = divmod(k, 26)
        word = chr(97 + rest) + word
        if k == 0:
            return word + "o"


def words_of(i: int, vocab: np.ndarray) -> list[str]:
    """Document i's text as sentences of 5-20 words; regenerated from its seed, so nothing is kept in memory."""
    rng = np.random.default_rng((11, i))
    n = int(rng.integers(250, 800))
    words = vocab[np.minimum(rng.zipf(1.25, n), VOCAB) - 1].tolist()
    ends = np.cumsum(rng.integers(5, 21, size=n // 5 + 1))
    for e in ends[ends < n]:
        words[e - 1] += "."
    words[0] = words[0].capitalize()
    words[-1] += "."
    return words


def kind_of(i: int) -> tuple[str, int]:
    """("original", i), ("exact", j) or ("near", j) for document i; j < i is an original."""
    rng = np.random.default_rng((12, i))
    r = rng.random()
    if i == 0 or r >= 2 * PLANTED:
        return "original", i
    j = int(rng.integers(i))
    while kind_of(j)[0] != "original":
        j -= 1
    return ("exact" if r < PLANTED else "near"), j


def generate(out_dir: Path, target_bytes: int, files: int = 8) -> dict:
    rng = np.random.default_rng(0)
    vocab = np.array([letters(k) for k in range(VOCAB)])
    written = docs = 0
    counts = {"original": 0, "exact": 0, "near": 0}
    handles = [open(out_dir / f"part-{k:02d}.jsonl", "w", encoding="utf-8") for k in range(files)]
    while written < target_bytes:
        kind, j = kind_of(docs)
        words = words_of(j, vocab)
        if kind == "exact":
            text = "  ".join(words).upper()
        else:
            if kind == "near":
                for w in rng.choice(len(words) - 1, 2, replace=False):
                    words[w] = "changed"
            text = " ".join(words)
        line = json.dumps({"text": text, "id": f"doc-{docs}", "kind": kind, "of": j}) + "\n"
        handles[docs % files].write(line)
        written += len(line)
        counts[kind] += 1
        docs += 1
    for h in handles:
        h.close()
    return {"documents": docs, "bytes": written, **counts}


def run_stage(name: str, argv: list[str], input_bytes: int) -> dict:
    """Run one `tinylm` verb; sample the RSS of its process tree every 0.5 s."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tinylm", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak_tree = peak_main = 0
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            main = parent.memory_info().rss
            tree = main + sum(c.memory_info().rss for c in parent.children(recursive=True))
        except psutil.Error:
            continue
        peak_main, peak_tree = max(peak_main, main), max(peak_tree, tree)
        time.sleep(0.5)  # psutil walks /proc: faster sampling costs the stage measurable CPU
    output = proc.stdout.read().decode(errors="replace")
    if proc.returncode:
        sys.exit(f"{name} failed:\n{output}")
    seconds = time.perf_counter() - start
    return {"stage": name, "seconds": round(seconds, 1), "mb_per_s": round(input_bytes / 2**20 / seconds, 1),
            "peak_tree_mb": round(peak_tree / 2**20), "peak_main_mb": round(peak_main / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of the generated corpus")
    parser.add_argument("--workdir", help="keep the files here (default: a temporary directory)")
    args = parser.parse_args()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"machine: {cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GB RAM")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        (work / "input").mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        made = generate(work / "input", int(args.gb * 2**30))
        print(f"generated {made['documents']:,} documents, {made['bytes'] / 2**30:.2f} GB "
              f"({made['exact']:,} exact and {made['near']:,} near copies planted) in {time.perf_counter() - start:.0f} s")
        size = made["bytes"]
        raw, clean = work / "raw", work / "clean"
        stages = [
            ("collect", ["collect", f"--collect.files={work / 'input'}", "--out", str(raw)]),
            ("clean", ["clean", f"--data.corpus={raw}", "--out", str(clean)]),
            ("tokenizer", ["tokenizer", f"--data.corpus={clean / 'clean.jsonl'}", "--out", str(work / "tokenizer")]),
            ("shards", ["shards", f"--data.corpus={clean / 'clean.jsonl'}", "--tokenizer", str(work / "tokenizer"),
                        "--out", str(work / "shards")]),
        ]
        results = []
        for name, argv in stages:
            results.append(run_stage(name, argv, size))
            r = results[-1]
            print(f"{name:<10} {r['seconds']:>7.1f} s  {r['mb_per_s']:>6.1f} MB/s  peak RSS: {r['peak_tree_mb']:>5,} MB "
                  f"all processes, {r['peak_main_mb']:>5,} MB main process", flush=True)
        report = json.loads((clean / "report.json").read_text())
        dropped = report["dropped"]
        caught_exact = dropped["exact_duplicate"]["docs"]
        caught_near = dropped["near_duplicate"]["docs"]
        print(f"clean: kept {report['docs_out']:,} of {report['docs_in']:,}; exact duplicates dropped {caught_exact:,} "
              f"(planted {made['exact']:,}), near duplicates dropped {caught_near:,} (planted {made['near']:,})")
        shards = json.loads((work / "shards" / "meta.json").read_text())
        splits = shards["splits"]
        print(f"shards: {splits['train']['tokens']:,} training tokens, {splits['val']['tokens']:,} validation tokens")
        worst = max(r["peak_tree_mb"] for r in results)
        print(f"largest peak: {worst:,} MB ({'under' if worst < 1536 else 'OVER'} the 1.5 GB target)")


if __name__ == "__main__":
    main()
