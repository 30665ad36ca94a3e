"""Compile time and step time: the whole model compiled (tinylm's) against each block compiled apart.

    python benchmarks/compile.py [--preset cpu-speedrun] [--size xs] [--steps 200]

"Regional compilation" (a PyTorch recipe) compiles each transformer block on its own: the blocks run
the same code, so one block's graph is built and the others reuse it, and a cold compile is shorter.
Whether it pays depends on what it costs each step (the blocks no longer fuse with each other, and
each region call has its own guards and wrappers). This measures both with tinylm's training step
(`train.Stepper`; the preset's batch, dtype and attention kernel; random tokens):
  - compile time: each way in a process of its own with empty Inductor and tinylm caches, as on a
    machine that has compiled nothing yet, then once more on the caches that run filled (warm);
    compile s = the first two steps less two median steps;
  - step time: both ways in one process, timed in alternating rounds of 20 steps, since on a shared
    2-core VM the pace drifts by 20% between processes minutes apart.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark train.py: its random batches
from train import RandomBatches  # noqa: E402

WAYS = ("whole", "blocks")


def stepper(way: str, preset: str, size: str):
    """tinylm's training step for the preset at `size`, compiled `way`, and a batch of random tokens."""
    import torch

    from tinylm.config import load_config
    from tinylm.model import Transformer
    from tinylm.sizing import fixed_shape
    from tinylm.train import Stepper, attention_kernel, build_optimizer, setup_runtime

    cfg = load_config(preset, {"train.grad_accum": 1, "model.size": size})
    cfg.model = fixed_shape(cfg.model)
    cfg.model.vocab_size = cfg.tokenizer.vocab_size
    rt = setup_runtime(cfg.train)
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(rt.device)
    model.attention = attention_kernel(cfg.train, rt.device, True)
    if cfg.train.guided_heads:  # as training sets them: the guidance is part of the step
        model.set_guidance(cfg.train.guided_heads, cfg.train.guided_weight, cfg.train.guided_mass)
    if way == "blocks":
        for block in model.layers:
            block.compile()  # in place: the embedding, the final norm and the head stay eager
    wrapped = torch.compile(model) if way == "whole" else model
    batches = RandomBatches(cfg.model.vocab_size, cfg.train.batch_size, cfg.model.max_seq_len)
    step = Stepper(wrapped, model, build_optimizer(model, cfg.train, rt.device),
                   torch.amp.GradScaler(rt.device.type, enabled=False), rt, cfg.train)
    about = (f"{preset}, {size} (dim {cfg.model.dim} x {cfg.model.n_layers} layers), batch {cfg.train.batch_size} x "
             f"{cfg.model.max_seq_len}, {str(rt.dtype).replace('torch.', '')}, torch {torch.__version__}")
    return lambda: step(batches), about


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compile_seconds(way: str, preset: str, size: str, steps: int) -> dict:
    """In this process: the extra time of the first two steps over two settled ones."""
    step, about = stepper(way, preset, size)
    times = [timed(step) for _ in range(steps)]
    settled = statistics.median(times[10:])
    return {"compile_s": max(0.0, times[0] + times[1] - 2 * settled), "about": about}


def in_fresh_process(way: str, args, cache: str) -> dict:
    env = {**os.environ, "XDG_CACHE_HOME": os.path.join(cache, "xdg"), "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, "inductor")}
    out = subprocess.run([sys.executable, __file__, "--one", way, "--preset", args.preset, "--size", args.size,
                          "--steps", str(args.steps)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu-speedrun")
    ap.add_argument("--size", default="xs", help="a size of the ladder (sizing.LADDER)")
    ap.add_argument("--steps", type=int, default=60, help="steps of each compile-time run")
    ap.add_argument("--rounds", type=int, default=12, help="alternating rounds of 20 steps for the step time")
    ap.add_argument("--one", choices=WAYS, help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(compile_seconds(args.one, args.preset, args.size, args.steps)))
        return
    compile_s = {}
    with tempfile.TemporaryDirectory() as root:
        for way in WAYS:
            cache = os.path.join(root, way)
            fresh = in_fresh_process(way, args, cache)
            compile_s[way] = (fresh["compile_s"], in_fresh_process(way, args, cache)["compile_s"])
            about = fresh["about"]
        # one process holds one Inductor cache: the whole model's is warm here, the blocks compile anew
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(root, "whole", "inductor")
        steps = {way: stepper(way, args.preset, args.size)[0] for way in WAYS}
        times = {way: [] for way in WAYS}
        for way in WAYS:
            for _ in range(5):
                steps[way]()
        for _ in range(args.rounds):
            for way in WAYS:
                times[way] += [timed(steps[way]) for _ in range(20)]
    step_s = {way: statistics.median(times[way]) for way in WAYS}
    print(about)
    for way in WAYS:
        fresh, warm = compile_s[way]
        print(f"{way:>6}: compile {fresh:5.1f} s fresh, {warm:4.1f} s warm; step {step_s[way] * 1000:6.1f} ms")
    print(f"blocks / whole: compile {compile_s['blocks'][0] / compile_s['whole'][0]:.2f}x fresh, "
          f"{compile_s['blocks'][1] / max(compile_s['whole'][1], 1e-9):.2f}x warm; step {step_s['blocks'] / step_s['whole']:.2f}x")


if __name__ == "__main__":
    main()
