"""Measure the scaling table behind `model.size = "auto"` and fit the law it predicts with.

    python benchmarks/scaling.py --shards runs/default/shards --set train.optimizer=adamw train.lr=1e-3 \\
        --grid xs:120 s:120 m:120 l:120 s:400 l:400 s:600 m:600 --work /tmp/scaling --write src/tinylm/scaling.json

measured the shipped table (AdamW at lr 1e-3 was `cpu-demo`'s pretraining then; it is Muon at 2e-3 now).
Each grid entry `SIZE:SECONDS[:BATCH]` pretrains ladder size SIZE (sizing.LADDER) on the shards for
SECONDS with `cpu-demo`'s training settings (and --set's; no epoch limit, one validation at the end
over 40 batches) at BATCH sequences a step (cpu-demo's 16 if not given), one run after the other;
then L(N, D, b) = E + A / N**alpha + B / D'**beta (sizing.py's docstring: D' counts repeats and, when
the points hold two batches or more, the batch b) is fitted to the final held-out losses
(sizing.fit_law) and written with the points and the machine it was measured on. Entries such as
`s:120:8 s:120:4 xs:120:4` add the batch term; docs/performance.md has the grids tried and why the
shipped law has none.
`--fit-only` refits from the run folders already in --work. Run it alone on the machine: each point
is a wall-clock race.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from tinylm.checkpoint import checkpoint_config, latest_checkpoint
from tinylm.compiling import device_name
from tinylm.files import read_json, write_json
from tinylm.model import Transformer
from tinylm.sizing import LADDER, fit_law

import torch


def run_point(size: str, seconds: float, batch: int | None, shards: Path, out: Path, settings: list[str]) -> None:
    cmd = [sys.executable, "-m", "tinylm", "pretrain", "--shards", str(shards), "--out", str(out), "--config", "cpu-demo",
           f"--model.size={size}", f"--train.max_time={seconds}", "--train.max_epochs=0", "--train.eval_every=0",
           "--train.eval_batches=40", "--train.save_every=0", *settings]
    if batch:
        cmd.append(f"--train.batch_size={batch}")
    t0 = time.time()
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    print(f"{size} {seconds:g} s: done in {time.time() - t0:.0f} s", flush=True)


def read_point(run: Path, unique_tokens: int) -> dict:
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"val_loss"' in line][-1]
    saved = checkpoint_config(latest_checkpoint(run))
    cfg, tc = saved.model, saved.train
    params = Transformer(cfg).num_params(embeddings=False)
    return {"run": run.name, "dim": cfg.dim, "n_layers": cfg.n_layers, "params": params, "tokens": last["tokens"],
            "unique_tokens": unique_tokens, "batch_size": tc.batch_size,
            "tokens_per_step": tc.batch_size * tc.grad_accum * cfg.max_seq_len, "optimizer": tc.optimizer, "lr": tc.lr,
            "seconds": last["elapsed"], "loss": last["val_loss"], "bpb": last.get("val_bpb")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=Path, required=True, help="token shards (e.g. runs/default/shards)")
    ap.add_argument("--grid", nargs="*", default=[], help="SIZE:SECONDS[:BATCH] entries to train (batch: cpu-demo's if not given)")
    ap.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE",
                    help="settings for every run beside cpu-demo's (e.g. train.optimizer=adamw train.lr=1e-3)")
    ap.add_argument("--no-fit", action="store_true", help="train the grid only")
    ap.add_argument("--work", type=Path, default=Path("/tmp/scaling"))
    ap.add_argument("--fit-only", action="store_true", help="refit from the runs already in --work")
    ap.add_argument("--write", type=Path, help="write the law and its points here (src/tinylm/scaling.json)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.fit_only:
        for entry in args.grid:
            size, seconds, *batch = entry.split(":")
            if size not in LADDER or len(batch) > 1:
                ap.error(f"{entry}: not SIZE:SECONDS[:BATCH] with SIZE one of {', '.join(LADDER)}")
            name = f"{size}-{seconds}" + (f"-b{batch[0]}" if batch else "")
            run_point(size, float(seconds), int(batch[0]) if batch else None, args.shards, args.work / name,
                      [f"--{s}" for s in args.set])
    if args.no_fit:
        return
    unique = read_json(args.shards / "meta.json")["splits"]["train"]["tokens"]
    runs = sorted(p for p in args.work.iterdir() if p.is_dir() and (p / "metrics.jsonl").is_file())
    points = [read_point(r, unique) for r in runs]
    law, rms = fit_law([(p["params"], p["tokens"], p["unique_tokens"], p["tokens_per_step"], p["loss"]) for p in points])
    for p in points:
        p["predicted"] = round(law.loss(p["params"], p["tokens"], p["unique_tokens"], p["tokens_per_step"]), 4)
        print(f"{p['run']:>12}: {p['params'] / 1e6:5.2f}M parameters, {p['tokens'] / 1e6:5.1f}M tokens in steps of "
              f"{p['tokens_per_step']:,} in {p['seconds']:.0f} s -> loss {p['loss']:.4f} ({p['bpb']} bpb), "
              f"law {p['predicted']:.4f}")
    print(f"law: E={law.E:.3f} A={law.A:.3f} B={law.B:.3f} alpha={law.alpha} beta={law.beta} "
          f"B_noise={law.noise_scale:g} tokens; RMS error {rms:.4f} nats")
    if args.write:
        write_json(args.write, {"law": law.__dict__, "rms_error": round(rms, 5), "points": points,
                                "machine": f"{device_name(torch.device('cpu'))}, {torch.get_num_threads()} threads",
                                "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                                "command": "python benchmarks/scaling.py " + " ".join(sys.argv[1:])})
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
