"""The CPU speedrun: held-out bits-per-byte on tinyshakespeare (last 10% held out) in 4 minutes.

    python benchmarks/speedrun.py [--text ../shared/data/tinyshakespeare.txt] [--train.optimizer=adamw ...]
    python benchmarks/speedrun.py --peer-nanogpt PATH/TO/nanoGPT      # and nanoGPT, same text, same wall time

Runs `tinylm run --config cpu-speedrun` in a fresh directory, as a user would, and prints the wall
time of the whole run (tokenizer, shards, training, final validation, samples) and the held-out
bits-per-byte. With `--peer-nanogpt`, it then trains nanoGPT's CPU quick-start model (README:
`config/train_shakespeare_char.py --device=cpu --compile=False ... --n_layer=4 --n_embd=128`) from a
nanoGPT checkout on the same text, for as many iterations as fit in the same wall time (timed on a
short calibration run first), and prints its held-out figure in the same unit. nanoGPT holds out the
last 10% of the characters too; its loss is nats per character, converted with the held-out text's
characters per byte. The checkout is only read: its files are copied to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
NANOGPT_CPU = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--log_interval=1",
               "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0"]


def run_tinylm(text: str, config: str, overrides: list[str]) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tinylm", "run", "--config", config, "--out", out,
                        f"--data.corpus={text}", *overrides], check=True)
        wall = time.perf_counter() - start
        records = [json.loads(line) for line in open(Path(out) / "pretrain" / "metrics.jsonl")]
    return wall, [r for r in records if "val_bpb" in r][-1]


def run_nanogpt(checkout: Path, text: Path, wall_s: float) -> dict:
    """nanoGPT's CPU quick-start model trained for about `wall_s` seconds in all; its last validation."""
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for name in ("train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py",
                     "data/shakespeare_char/prepare.py"):
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(checkout / name, work / name)
        shutil.copy(text, work / "data/shakespeare_char/input.txt")  # prepare.py downloads only when absent
        start = time.perf_counter()
        subprocess.run([sys.executable, "prepare.py"], cwd=work / "data/shakespeare_char", check=True,
                       stdout=subprocess.DEVNULL)

        def train(iters: int, eval_iters: int) -> str:
            args = [*NANOGPT_CPU, f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--eval_interval={iters}",
                    f"--eval_iters={eval_iters}"]
            return subprocess.run([sys.executable, "train.py", *args], cwd=work, check=True, capture_output=True,
                                  text=True).stdout

        calibration = time.perf_counter()
        log = train(40, 20)
        per_iter = statistics.median(float(t) for t in re.findall(r"iter (?:[1-9]\d*): loss [\d.]+, time ([\d.]+)ms", log)) / 1000
        spent = time.perf_counter() - start
        # the same wall time in all: what is left after preparing and calibrating, less two evaluations
        iters = max(100, int((wall_s - spent - (time.perf_counter() - calibration) * 0.5) / per_iter))
        t0 = time.perf_counter()
        log = train(iters, 200)
        wall = time.perf_counter() - start
        step, val = [(int(s), float(v)) for s, v in re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", log)][-1]
    held_out = text.read_text(encoding="utf-8")
    held_out = held_out[int(len(held_out) * 0.9):]
    chars_per_byte = len(held_out) / len(held_out.encode("utf-8"))
    return {"iters": step, "val_nats_per_char": val, "val_bpb": val * chars_per_byte / math.log(2),
            "wall_s": wall, "train_s": time.perf_counter() - t0, "s_per_iter": per_iter}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default=str(DEFAULT_TEXT))
    parser.add_argument("--config", default="cpu-speedrun")
    parser.add_argument("--peer-nanogpt", default=None, metavar="PATH", help="a nanoGPT checkout to train beside us")
    parser.epilog = "Any other --section.field=value setting is passed on to `tinylm run`."
    args, overrides = parser.parse_known_args()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} cores")
    wall, last = run_tinylm(args.text, args.config, overrides)
    print(f"speedrun ({args.config}): held-out {last['val_bpb']:.3f} bits/byte (val loss {last['val_loss']:.3f} nats/token) "
          f"after {last['step']} steps, {last['tokens']:,} tokens, {last['elapsed']:.0f} s of training; {wall:.0f} s wall in all")
    if args.peer_nanogpt:
        peer = run_nanogpt(Path(args.peer_nanogpt), Path(args.text), wall)
        print(f"nanoGPT CPU quick start, same text and wall time: held-out {peer['val_bpb']:.3f} bits/byte "
              f"(val loss {peer['val_nats_per_char']:.4f} nats/char) after {peer['iters']:,} iterations "
              f"({peer['s_per_iter'] * 1000:.0f} ms each); {peer['wall_s']:.0f} s wall in all")
        print(f"tinylm - nanoGPT: {last['val_bpb'] - peer['val_bpb']:+.3f} bits/byte")


if __name__ == "__main__":
    main()
