"""The CPU speedrun: held-out bits-per-byte on tinyshakespeare (last 10% held out) in 4 minutes.

    python benchmarks/speedrun.py [--text ../shared/data/tinyshakespeare.txt] [--train.compile=true ...]

Runs `tinylm run --config cpu-speedrun` in a fresh directory, as a user would, and prints the wall
time of the whole run (tokenizer, shards, training, final validation, samples) and the held-out
bits-per-byte. For reference, nanoGPT's CPU quick start reaches 1.88 nats/char (~2.7 bits/byte)
in about the same time on a similar CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default=str(DEFAULT_TEXT))
    parser.add_argument("--config", default="cpu-speedrun")
    parser.epilog = "Any other --section.field=value setting is passed on to `tinylm run`."
    args, overrides = parser.parse_known_args()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tinylm", "run", "--config", args.config, "--out", out,
                        f"--data.corpus={args.text}", *overrides], check=True)
        wall = time.perf_counter() - start
        records = [json.loads(line) for line in open(Path(out) / "pretrain" / "metrics.jsonl")]
    last = [r for r in records if "val_bpb" in r][-1]
    print(f"speedrun ({args.config}): held-out {last['val_bpb']:.3f} bits/byte (val loss {last['val_loss']:.3f} nats/token) "
          f"after {last['step']} steps, {last['tokens']:,} tokens, {last['elapsed']:.0f} s of training; {wall:.0f} s wall in all")
    print(f"nanoGPT's documented CPU figure for comparison: 1.88 nats/char = {1.88 / math.log(2):.2f} bits/byte")


if __name__ == "__main__":
    main()
