"""Training speed: tinylm's step vs a naive reference written the way the seeds do it, and MFU.

    python benchmarks/train.py --presets cpu-demo gpu-26m

For each preset, at the preset's sizes and micro-batch:
  - tinylm: the real training step (`train.Stepper`) with the preset's settings
    (bf16 autocast where the CPU has bf16 instructions, torch.compile where the preset turns it
    on, and then on a CPU the chunked attention of attention.py, else SDPA; fused AdamW);
  - naive: a LLaMA-style model written here like the seeds write it (explicit causal mask and
    softmax, fp32, no compile) with a plain for-loop AdamW.
Both see the same random tokens. Also measured in the same run: the machine's matmul peak in bf16
and fp32 (large square matrix products), so MFU = model FLOP/s / the peak of the dtype the step
computes its products in (bf16 under autocast, else fp32). The naive step's MFU is printed too: on
a CPU without bf16 both steps compute in fp32, and peak / naive bounds the possible speed-up.
Compile time is reported apart (it is paid once per run).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinylm.compiling import choice
from tinylm.config import load_config
from tinylm.sizing import fixed_shape
from tinylm.model import Transformer
from tinylm.parallel import wrap
from tinylm.device import measure_cpu_peak, pick_dtype
from tinylm.train import Stepper, attention_kernel, build_optimizer, setup_runtime


# --- the naive reference ---------------------------------------------------------------------------
class NaiveBlock(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, hidden):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = n_heads, n_kv_heads, dim // n_heads
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * n_kv_heads * self.hd, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, C = x.shape
        h = self.norm1(x)
        q = self.q(h).view(B, T, self.n_heads, self.hd).transpose(1, 2)
        k, v = self.kv(h).view(B, T, 2, self.n_kv, self.hd).permute(2, 0, 3, 1, 4)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)
        att = att.masked_fill(mask[:T, :T] == 0, float("-inf")).softmax(dim=-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(B, T, C))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def rope(x, cos, sin):
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-b, a), dim=-1) * sin


class NaiveModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hd = cfg.dim // cfg.n_heads
        self.emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(NaiveBlock(cfg.dim, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, cfg.hidden_dim)
                                    for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.head.weight = self.emb.weight
        inv = 1.0 / (cfg.rope_base ** (torch.arange(0, hd, 2).float() / hd))
        freqs = torch.outer(torch.arange(cfg.max_seq_len).float(), inv)
        self.register_buffer("cos", torch.cat((freqs, freqs), -1).cos())
        self.register_buffer("sin", torch.cat((freqs, freqs), -1).sin())
        self.register_buffer("mask", torch.tril(torch.ones(cfg.max_seq_len, cfg.max_seq_len)))

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x, self.cos[:T], self.sin[:T], self.mask)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


# --- measurements ----------------------------------------------------------------------------------
def matmul_peak(dtype: torch.dtype, seconds: float = 3.0) -> float:
    """Best FLOP/s of large square matrix products in this dtype (1024-4096 rows, seconds / 3 each;
    a CPU that emulates the dtype stops at the first size too slow for its share)."""
    return measure_cpu_peak(dtype, seconds, sizes=(1024, 2048, 4096))


def time_steps(step, steps: int, warmup: int, sync=lambda: None) -> tuple[float, float]:
    """(seconds of the warmup steps, seconds per timed step: the median).

    sync: waits for the device (torch.cuda.synchronize on a GPU), so that a step's time is its work's.
    """
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warm = time.perf_counter() - start
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return warm, sorted(times)[len(times) // 2]


class RandomBatches:
    """What the training step asks of a loader, with random tokens (speed does not depend on the text)."""

    def __init__(self, vocab: int, batch: int, seq: int):
        self.x = torch.randint(0, vocab, (batch, seq + 1))

    def next_batch(self):
        return self.x[:, :-1], self.x[:, 1:]


def bench_preset(preset: str, steps: int, warmup: int, device: str = "cpu", overrides: dict | None = None) -> dict:
    """Seconds per step of tinylm's step and of the naive one at the preset's micro-batch, on `device`."""
    cfg = load_config(preset, {"train.grad_accum": 1, "train.device": device, **(overrides or {})})
    cfg.model = fixed_shape(cfg.model)
    cfg.model.vocab_size = cfg.tokenizer.vocab_size
    tc, mc = cfg.train, cfg.model
    rt = setup_runtime(tc)
    batches = RandomBatches(mc.vocab_size, tc.batch_size, mc.max_seq_len)
    tokens = tc.batch_size * mc.max_seq_len
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else lambda: None

    torch.manual_seed(0)
    model = Transformer(mc).to(rt.device)
    flops = model.flops_per_token() * tokens
    optimizer = build_optimizer(model, tc, rt.device)
    compiled = choice(tc.compile) is not False  # a preset that may compile ("auto") is timed compiled
    model.attention = attention_kernel(tc, rt.device, compiled)  # as training does
    wrapped = wrap(model, rt, tc, compiled)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    step = Stepper(wrapped, model, optimizer, scaler, rt, tc)
    ours_warm, ours = time_steps(lambda: step(batches), steps, warmup, sync)
    del model, optimizer, wrapped, step

    torch.manual_seed(0)
    naive = NaiveModel(mc).to(rt.device)
    naive_opt = torch.optim.AdamW(naive.parameters(), lr=tc.lr, foreach=False)

    def naive_step():
        x, y = (t.to(rt.device) for t in batches.next_batch())
        naive(x, y).backward()
        torch.nn.utils.clip_grad_norm_(naive.parameters(), tc.grad_clip)
        naive_opt.step()
        naive_opt.zero_grad(set_to_none=True)

    _, theirs = time_steps(naive_step, max(3, steps // 2), 1, sync)
    params = sum(p.numel() for p in naive.parameters())
    del naive, naive_opt
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()
    return {"preset": preset, "params": params, "tokens_per_step": tokens,
            "dtype": rt.dtype, "compile": compiled, "warmup_s": ours_warm, "flops": flops,
            "ours_s": ours, "naive_s": theirs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["cpu-demo", "gpu-26m"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    # the peak is taken as the best of two measurements, before and after the steps: a VM's neighbours
    # can halve a few seconds of it, and a low peak would inflate MFU
    before = {dtype: matmul_peak(dtype) for dtype in (torch.bfloat16, torch.float32)}
    results = [bench_preset(preset, args.steps, args.warmup) for preset in args.presets]
    after = {dtype: matmul_peak(dtype) for dtype in before}
    peaks = {dtype: max(before[dtype], after[dtype]) for dtype in before}
    print(f"matmul peak: bf16 {peaks[torch.bfloat16] / 1e12:.3f} TFLOP/s, fp32 {peaks[torch.float32] / 1e12:.3f} TFLOP/s "
          f"(best of before/after the steps: bf16 {before[torch.bfloat16] / 1e12:.3f}/{after[torch.bfloat16] / 1e12:.3f}, "
          f"fp32 {before[torch.float32] / 1e12:.3f}/{after[torch.float32] / 1e12:.3f}; "
          f"autocast dtype here: {str(pick_dtype('auto', torch.device('cpu'))).removeprefix('torch.')})")
    for r in results:
        mfu, naive_mfu = r["flops"] / r["ours_s"] / peaks[r["dtype"]], r["flops"] / r["naive_s"] / peaks[torch.float32]
        ours_tok_s, naive_tok_s = r["tokens_per_step"] / r["ours_s"], r["tokens_per_step"] / r["naive_s"]
        name = str(r["dtype"]).removeprefix("torch.")
        print(f"{r['preset']:<10} {r['params'] / 1e6:.1f}M params, {r['tokens_per_step']:,} tokens/step, {name}"
              f"{' + compile' if r['compile'] else ''}: tinylm {ours_tok_s:,.0f} tok/s vs naive {naive_tok_s:,.0f} "
              f"tok/s = {ours_tok_s / naive_tok_s:.2f}x | {r['flops'] / r['ours_s'] / 1e12:.3f} TFLOP/s = MFU {mfu:.0%} of the "
              f"{name} peak (naive: {naive_mfu:.0%} of fp32, so an fp32 step can be at most {1 / naive_mfu:.2f}x "
              f"the naive one) | first {args.warmup} steps (compile) {r['warmup_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
