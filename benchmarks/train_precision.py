"""Training throughput of the real tinylm loop with bf16 autocast on and off, measured in one run.

    python benchmarks/train_precision.py --config cpu-demo --steps 40

Random tokens feed the loop (throughput does not depend on the text); warmup steps are excluded.
Prints the machine, tokens/s for each precision and their ratio.
"""

from __future__ import annotations

import argparse
import platform
import tempfile

import numpy as np
import torch

from tinylm.config import load_config
from tinylm.sizing import fixed_shape
from tinylm.data import PackedBatches
from tinylm.device import cpu_supports_bf16
from tinylm.train import setup_runtime, train


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.processor())
    return (f"{cpu}, {torch.get_num_threads()} threads, bf16 instructions: {cpu_supports_bf16()}, "
            f"torch {torch.__version__}, python {platform.python_version()}")


def tokens_per_second(preset: str, dtype: str, steps: int, warmup: int) -> float:
    cfg = load_config(preset, {"train.dtype": dtype, "train.max_time": 0, "train.max_epochs": 0,
                               "train.max_steps": warmup + steps, "train.eval_every": 0, "train.save_every": 0,
                               "train.log_every": 10**9, "train.resume": False})
    cfg.model = fixed_shape(cfg.model)
    cfg.model.vocab_size = cfg.tokenizer.vocab_size
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, size=(warmup + steps + 2) * cfg.train.batch_size
                          * cfg.train.grad_accum * (cfg.model.max_seq_len + 1), dtype=np.uint16)
    rt = setup_runtime(cfg.train)
    batches = PackedBatches([tokens], cfg.model.max_seq_len, cfg.train.batch_size, seed=0)
    with tempfile.TemporaryDirectory() as out:
        train(cfg, out, rt, batches, None, _dummy_tokenizer(out, cfg.model.vocab_size))
        import json
        records = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    timed = [r for r in records if r["step"] > warmup]
    return sum(r["tok_per_s"] ** -1 for r in timed) ** -1 * len(timed)  # harmonic mean = tokens / time


def _dummy_tokenizer(out: str, vocab_size: int) -> str:
    """Checkpoints copy tokenizer files; a byte-level BPE of the right size stands in."""
    from tinylm.config import TokenizerConfig
    from tinylm.tokenizer import train_tokenizer

    words = [f"w{i}" for i in range(vocab_size * 4)]
    tok = train_tokenizer(iter([" ".join(words)] * 3), TokenizerConfig(vocab_size=vocab_size, min_frequency=1))
    tok.save(f"{out}/tokenizer")
    return f"{out}/tokenizer"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cpu-demo")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    results = {dt: tokens_per_second(args.config, dt, args.steps, args.warmup) for dt in ("fp32", "bf16")}
    for dt, tps in results.items():
        print(f"{args.config} {dt}: {tps:,.0f} tokens/s")
    print(f"bf16 / fp32: {results['bf16'] / results['fp32']:.2f}x")


if __name__ == "__main__":
    main()
