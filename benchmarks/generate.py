"""Generation speed: tinylm's KV-cache decoder vs full recomputation and vs transformers' generate.

    python benchmarks/generate.py --presets cpu-demo gpu-26m

A model of the preset's size (random weights: speed does not depend on them) generates 200 new
tokens after a 32-token prompt, greedily, at batch 1 and batch 8, three ways:
  - tinylm: `generate_ids` (prefill in one pass, preallocated KV cache, one position per step);
  - recompute: the same model run over the whole sequence for every new token (no cache);
  - transformers: `LlamaForCausalLM.generate` on the same weights (its default dynamic cache).
Each method runs --repeats times (the rounds take turns, so a slow spell of a shared machine falls
on all three) and its fastest round counts, as `timeit` advises; the ratios of single rounds are
printed beside. Prints time to first token, tokens/s (all sequences of the batch) and the ratios,
and checks that tinylm and transformers produced the same tokens. Also the floor of a batch-1
token: one pass of a single row through every weight matrix (a decode step must read all the
weights once), which on a CPU without much memory bandwidth is most of the step and bounds the
ratio to recomputation; once in `nn.Linear`'s layout and once in the packed layout tinylm decodes
with (decoding.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from tinylm.config import SampleConfig, load_config
from tinylm.sizing import fixed_shape
from tinylm.export import to_transformers
from tinylm.generate import generate_ids
from tinylm.decoding import packed_matmul, packed_weights
from tinylm.model import Transformer

PROMPT, NEW = 32, 200
GREEDY = SampleConfig(temperature=0.0, repetition_penalty=1.0, top_k=0, top_p=1.0)


def sync(t: torch.Tensor) -> None:
    """Wait for the device that holds t (a GPU runs ahead of the Python that feeds it)."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def ours(model, prompts, new: int = NEW, cuda_graph: bool = True) -> tuple[float, float, torch.Tensor]:
    """(seconds to the first token, seconds in all, the new tokens (B, new)) of tinylm's decoder."""
    start = time.perf_counter()
    steps = generate_ids(model, prompts, GREEDY, max_new_tokens=new, cuda_graph=cuda_graph)
    tokens = [next(steps)]
    sync(tokens[0])
    first = time.perf_counter() - start
    tokens += list(steps)
    out = torch.stack(tokens, dim=1)
    sync(out)
    return first, time.perf_counter() - start, out


@torch.inference_mode()
def weight_pass(mats: list[torch.Tensor], packed: bool, reps: int = 50) -> tuple[float, float]:
    """(seconds, bytes) of one row times every matrix, in order, as a decoding step does.

    packed: tinylm's packed matrices (P, in, out / P) and its `packed_matmul`; else `nn.Linear`'s `x @ w.T`.
    """
    rows = {w.shape[1]: torch.randn(1, w.shape[1]) for w in mats}  # in: dim 1 of both layouts
    multiply = packed_matmul if packed else torch.nn.functional.linear
    products = [lambda w=w: multiply(rows[w.shape[1]], w) for w in mats]

    def once():
        for product in products:
            product()

    for _ in range(5):
        once()
    start = time.perf_counter()
    for _ in range(reps):
        once()
    return (time.perf_counter() - start) / reps, sum(w.numel() * w.element_size() for w in mats)


@torch.inference_mode()
def recompute(model, prompts, new: int = NEW) -> tuple[float, float, torch.Tensor]:
    ids, first, start = prompts, None, time.perf_counter()
    for _ in range(new):
        logits, _ = model(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        if first is None:
            sync(ids)
            first = time.perf_counter() - start
    sync(ids)
    return first, time.perf_counter() - start, ids[:, prompts.size(1):]


@torch.inference_mode()
def transformers_generate(hf, prompts, new: int = NEW) -> tuple[float, float, torch.Tensor]:
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(prompts))
    start = time.perf_counter()
    sync(hf.generate(prompts, max_new_tokens=1, **kw))
    first = time.perf_counter() - start
    start = time.perf_counter()
    out = hf.generate(prompts, max_new_tokens=new, min_new_tokens=new, **kw)
    sync(out)
    return first, time.perf_counter() - start, out[:, prompts.size(1):]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["cpu-demo", "gpu-26m"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds of the three methods, one after another; each method's fastest round counts")
    args = parser.parse_args()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.processor())
    import transformers

    print(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"fp32, greedy, {PROMPT}-token prompt, {NEW} new tokens")
    for preset in args.presets:
        cfg = load_config(preset)
        cfg.model = fixed_shape(cfg.model)
        cfg.model.vocab_size = cfg.tokenizer.vocab_size
        torch.manual_seed(0)
        model = Transformer(cfg.model).eval()
        hf = to_transformers(model)
        linear, size = weight_pass([m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)], False)
        packed = packed_weights(model)
        fused, _ = weight_pass([w for layer in packed.layers for w in (layer.qkv, layer.wo, layer.w13, layer.w2)]
                               + [packed.output], True)
        print(f"{preset:<9} floor of a batch-1 token: one row through {size / 1e6:.1f} MB of weights takes "
              f"{linear * 1000:.2f} ms in nn.Linear's layout ({size / linear / 1e9:.1f} GB/s), {fused * 1000:.2f} ms "
              f"in the packed layout tinylm decodes with ({size / fused / 1e9:.1f} GB/s)", flush=True)
        for batch in args.batches:
            prompts = torch.randint(8, cfg.model.vocab_size, (batch, PROMPT))
            ours(model, prompts[:, :4])  # warm up the kernels once
            methods = {"tinylm": lambda: ours(model, prompts), "recompute": lambda: recompute(model, prompts),
                       "transformers": lambda: transformers_generate(hf, prompts)}
            rounds = [{name: run() for name, run in methods.items()} for _ in range(args.repeats)]
            results = {name: min((r[name] for r in rounds), key=lambda result: result[1]) for name in methods}
            same = all(torch.equal(r["tinylm"][2], r["transformers"][2]) for r in rounds)
            speed = {name: batch * NEW / total for name, (_, total, _) in results.items()}
            spread = {other: sorted(r[other][1] / r["tinylm"][1] for r in rounds) for other in ("recompute", "transformers")}
            line = "  ".join(f"{name} {speed[name]:,.0f} tok/s (first token {first * 1000:.0f} ms)"
                             for name, (first, _, _) in results.items())
            per_token = (results["tinylm"][1] - results["tinylm"][0]) / (NEW - 1) * 1000
            print(f"{preset:<9} batch {batch}: {line} | tinylm {per_token:.2f} ms per step | tinylm vs recompute {speed['tinylm'] / speed['recompute']:.1f}x "
                  f"(single rounds {spread['recompute'][0]:.1f}-{spread['recompute'][-1]:.1f}x), vs transformers "
                  f"{speed['tinylm'] / speed['transformers']:.2f}x ({spread['transformers'][0]:.2f}-{spread['transformers'][-1]:.2f}x) "
                  f"| same tokens as transformers: {same}", flush=True)


if __name__ == "__main__":
    main()
