"""Measure the scaling table behind `model.size = "auto"` and fit the laws it predicts with.

    python benchmarks/scaling.py --shards runs/default/shards --grid s:600 xs:600 m:600 s:300 xs:300 m:300 \\
        --points benchmarks/data/muon-points-epyc-2026-12-01.json --work /tmp/scaling --write src/tinylm/scaling.json

measured the shipped Muon law (`cpu-demo`'s pretraining: Muon at lr 2e-3, batch 16), and

    python benchmarks/scaling.py --shards runs/default/shards --set train.optimizer=adamw train.lr=1e-3 \\
        --grid xs:120 s:120 m:120 l:120 s:400 l:400 s:600 m:600 --work /tmp/scaling --write src/tinylm/scaling.json

the AdamW one. Each grid entry `SIZE:SECONDS[:BATCH]` pretrains ladder size SIZE (sizing.LADDER) on
the shards for SECONDS with `cpu-demo`'s training settings (and --set's; no epoch limit, one
validation at the end over 40 batches) at BATCH sequences a step (cpu-demo's 16 if not given), one
run after the other; then L(N, D, b) = E + A / N**alpha + B / D'**beta (sizing.py's docstring: D'
counts repeats and, when the points hold two batches or more, the batch b) is fitted to the final
held-out losses (sizing.fit_law) of the runs in --work and the --points records (earlier runs whose
folders are gone), leaving out runs of fewer than --min-steps optimizer steps (mostly warm-up: the
law's form does not describe them). The law is written into the --write file under the points'
optimizer (one law per optimizer; the file's other laws are kept), with its points and the machine
each was measured on. Entries such as `s:120:8 s:120:4 xs:120:4` add the batch term;
docs/performance.md has the grids tried and why the shipped laws have none.
`--fit-only` refits from the run folders already in --work. Run it alone on the machine: each point
is a wall-clock race.

The context term (sizing.py's docstring) comes from one trained checkpoint:

    python benchmarks/scaling.py --shards runs/default/shards --positions runs/default/pretrain --write src/tinylm/scaling.json

measures its mean held-out loss at each position of a window (evaluate.position_losses), fits
l_inf + c * t**-gamma (sizing.fit_positions), records it in the --write file and gives c and gamma
to every law there (the law fitted in the same command included).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from tinylm.checkpoint import checkpoint_config, latest_checkpoint, load_checkpoint
from tinylm.compiling import device_name
from tinylm.files import read_json, write_json
from tinylm.model import Transformer
from tinylm.evaluate import position_losses
from tinylm.sizing import LADDER, ScalingLaw, fit_law, fit_positions

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
            "tokens_per_step": tc.batch_size * tc.grad_accum * cfg.max_seq_len, "max_seq_len": cfg.max_seq_len,
            "optimizer": tc.optimizer, "lr": tc.lr,
            "seconds": last["elapsed"], "loss": last["val_loss"], "bpb": last.get("val_bpb")}


def points_context(points: list[dict]) -> int:
    """The one context the points trained at (older records: their tokens a step over their batch)."""
    contexts = {p.get("max_seq_len") or p["tokens_per_step"] // p["batch_size"] for p in points}
    if len(contexts) != 1:
        raise SystemExit(f"the points trained at contexts {sorted(contexts)}: the law's context term needs one")
    return contexts.pop()


def context_term(checkpoint: Path, shards: Path, context: int) -> dict:
    """Fit the context term to `checkpoint`'s held-out loss at each position of a window; `context`:
    the one the laws' points trained at (what the term is relative to)."""
    model, *_ = load_checkpoint(checkpoint)
    model.eval()
    losses = position_losses(model, shards)
    c, gamma, l_inf, rms = fit_positions(losses)
    law = ScalingLaw(0, 0, 0, 0, 0, context=context, position_scale=c, position_exponent=gamma)
    for t in (1, 4, 16, 64, 256, 1024):
        seen = f"measured {losses[t - 1]:.3f}, " if t <= len(losses) else ""
        print(f"position {t:>5}: {seen}fit {l_inf + c * t ** -gamma:.3f} nats")
    for window in (context // 4, context // 2, context, 2 * context):
        print(f"context {window:>5}: {law.context_loss(window):+.4f} nats against {context}")
    return {"checkpoint": str(checkpoint), "context_measured": model.cfg.max_seq_len, "c": round(c, 5), "gamma": gamma,
            "l_inf": round(l_inf, 4), "rms_error": round(rms, 4), "losses": [round(x, 4) for x in losses]}


def write_laws(path: Path, laws: dict[str, dict], positions: dict | None) -> None:
    """Write `path` (scaling.json): its laws with `laws` (optimizer: record) put in and the others
    kept, and the context term (`positions`, or the file's own) applied to every law."""
    data = read_json(path) if path.is_file() else {"laws": {}}
    data["laws"].update(laws)
    if positions:
        data["positions"] = positions
    if "positions" in data:
        for record in data["laws"].values():
            record["law"].update(context=points_context(record["points"]), position_scale=data["positions"]["c"],
                                 position_exponent=data["positions"]["gamma"])
    write_json(path, data)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=Path, required=True, help="token shards (e.g. runs/default/shards)")
    ap.add_argument("--grid", nargs="*", default=[], help="SIZE:SECONDS[:BATCH] entries to train (batch: cpu-demo's if not given)")
    ap.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE",
                    help="settings for every run beside cpu-demo's (e.g. train.optimizer=adamw train.lr=1e-3)")
    ap.add_argument("--no-fit", action="store_true", help="train the grid only")
    ap.add_argument("--work", type=Path, default=Path("/tmp/scaling"))
    ap.add_argument("--fit-only", action="store_true", help="refit from the runs already in --work")
    ap.add_argument("--min-steps", type=int, default=300,
                    help="fit only points of this many optimizer steps or more (shorter runs are mostly warm-up)")
    ap.add_argument("--points", nargs="*", type=Path, default=[], metavar="JSON",
                    help="more points for the fit: JSON lists of records as the --write file's (runs whose folders are gone)")
    ap.add_argument("--positions", type=Path, metavar="CHECKPOINT",
                    help="fit the context term to this checkpoint's held-out loss at each position of --shards' windows")
    ap.add_argument("--write", type=Path, help="write the law and its points here (src/tinylm/scaling.json)")
    args = ap.parse_args()
    command = "python benchmarks/scaling.py " + " ".join(sys.argv[1:])
    stamp = {"command": command, "date": time.strftime("%Y-%m-%d")}
    if args.positions and not (args.grid or args.fit_only):  # the context term alone, for the laws already written
        if not args.write or not args.write.is_file():
            ap.error("--positions without --grid or --fit-only adds the context term to an existing --write file")
        contexts = {points_context(r["points"]) for r in read_json(args.write)["laws"].values()}
        if len(contexts) != 1:
            raise SystemExit(f"the laws' points trained at contexts {sorted(contexts)}: one context term cannot serve them")
        write_laws(args.write, {}, {**context_term(args.positions, args.shards, contexts.pop()), **stamp})
        return
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
    machine = f"{device_name(torch.device('cpu'))}, {torch.get_num_threads()} threads"
    points = [{**read_point(r, unique), "machine": machine} for r in runs]
    for extra in args.points:
        points += read_json(extra)
    short = [p for p in points if p["tokens"] / p["tokens_per_step"] < args.min_steps]
    for p in short:
        print(f"{p['run']:>12}: {p['tokens'] / p['tokens_per_step']:.0f} steps, fewer than --min-steps: left out of the fit")
    points = [p for p in points if p not in short]
    optimizers = {p["optimizer"] for p in points}
    if len(optimizers) != 1:
        raise SystemExit(f"the points trained with {sorted(optimizers)}: a law describes one optimizer's runs")
    optimizer = optimizers.pop()
    law, rms = fit_law([(p["params"], p["tokens"], p["unique_tokens"], p["tokens_per_step"], p["loss"]) for p in points])
    for p in points:
        p["predicted"] = round(law.loss(p["params"], p["tokens"], p["unique_tokens"], p["tokens_per_step"]), 4)
        print(f"{p['run']:>12}: {p['params'] / 1e6:5.2f}M parameters, {p['tokens'] / 1e6:5.1f}M tokens in steps of "
              f"{p['tokens_per_step']:,} in {p['seconds']:.0f} s -> loss {p['loss']:.4f} ({p['bpb']} bpb), "
              f"law {p['predicted']:.4f}")
    print(f"law ({optimizer}): E={law.E:.3f} A={law.A:.3f} B={law.B:.3f} "
          f"alpha={law.alpha} beta={law.beta} B_noise={law.noise_scale:g} tokens; RMS error {rms:.4f} nats")
    positions = {**context_term(args.positions, args.shards, points_context(points)), **stamp} if args.positions else None
    if args.write:
        write_laws(args.write, {optimizer: {"law": law.__dict__, "rms_error": round(rms, 5), "points": points,
                                              "left_out": short, "torch": torch.__version__, **stamp}}, positions)


if __name__ == "__main__":
    main()
