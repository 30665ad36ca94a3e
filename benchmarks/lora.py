"""LoRA vs full fine-tuning: trainable parameters, gradient and AdamW state memory, step time.

    python benchmarks/lora.py --presets cpu-demo gpu-26m --rank 8

For each preset's model (vocab from its [tokenizer], random weights), one real optimizer step of
the training loop (`train.Stepper`, fp32, the preset's micro-batch with 128-token rows) with every
weight trained, then with `lora.rank` adapters on every projection of every block (lora.py). Memory is
counted from the tensors themselves: the AdamW state (`optimizer.state`, two moments per trained
parameter) and the gradients, after the step; step time is the median of 3 steps after one warm-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time

import torch

from tinylm.config import LoRAConfig, load_config
from tinylm.sizing import fixed_shape
from tinylm.lora import add_adapters, trainable_parameters
from tinylm.model import Transformer
from tinylm.train import Runtime, Stepper, build_optimizer


class RandomBatches:
    def __init__(self, vocab: int, rows: int, seq: int):
        self.vocab, self.rows, self.seq = vocab, rows, seq

    def next_batch(self):
        x = torch.randint(0, self.vocab, (self.rows, self.seq + 1))
        return x[:, :-1], x[:, 1:]


def measure(preset: str, rank: int | None, seq: int = 128) -> dict:
    cfg = load_config(preset, {"model.vocab_size": load_config(preset).tokenizer.vocab_size, "train.dtype": "fp32"})
    tc = dataclasses.replace(cfg.train, grad_accum=1, compile="false", device="cpu")
    torch.manual_seed(0)
    cfg.model = fixed_shape(cfg.model)
    model = Transformer(cfg.model)
    if rank:
        add_adapters(model, LoRAConfig(rank=rank, alpha=2.0 * rank))
    rt = Runtime(torch.device("cpu"), torch.float32)
    optimizer = build_optimizer(model, tc, rt.device)
    step = Stepper(model, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), rt, tc)
    batches = RandomBatches(cfg.model.vocab_size, tc.batch_size, seq)
    times = []
    for i in range(4):
        t0 = time.perf_counter()
        step(batches)
        times.append(time.perf_counter() - t0)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    # gradients are set to None after each step: count what one backward holds
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"preset": preset, "mode": f"LoRA r={rank}" if rank else "full", "params": model.num_params(),
            "trainable": trainable_parameters(model), "adam_state_mib": state / 2**20, "grad_mib": grads / 2**20,
            "step_s": statistics.median(times[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["cpu-demo", "gpu-26m"])
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print("| preset | training | parameters | trainable | AdamW state | gradients | step (s) |")
    print("|---|---|---|---|---|---|---|")
    for preset in args.presets:
        for rank in (None, args.rank):
            r = measure(preset, rank)
            print(f"| {r['preset']} | {r['mode']} | {r['params']:,} | {r['trainable']:,} ({100 * r['trainable'] / r['params']:.1f}%) | "
                  f"{r['adam_state_mib']:.2f} MiB | {r['grad_mib']:.2f} MiB | {r['step_s']:.2f} |")


if __name__ == "__main__":
    main()
