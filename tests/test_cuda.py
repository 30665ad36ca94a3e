"""What only a GPU can show (marked `cuda`, skipped without one; run with `python -m pytest -m cuda`).

benchmarks/gpu.py runs these on the GPU machine beside its measurements (docs/gpu.md). The data is a
synthetic corpus made here, so nothing outside the repository is read.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tinylm.config import ModelConfig, SampleConfig, load_config
from tinylm.generate import generate_ids
from tinylm.model import Transformer

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")
GREEDY = SampleConfig(temperature=0.0, repetition_penalty=1.0, top_k=0, top_p=1.0)


def model_on_gpu(dtype=torch.float32, **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"dim": 256, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 256,
                         "vocab_size": 512, **kw})
    return Transformer(cfg).to(CUDA, dtype).eval()


@torch.inference_mode()
def test_kv_cache_decoding_equals_recomputation_in_bf16():
    """Teacher-forced: the logits of prefill + one cached step per token (eager and as a replayed CUDA
    graph) are those of one full forward, to bf16 rounding."""
    from tinylm.generate import GraphedDecodeStep

    model = model_on_gpu(torch.bfloat16)
    idx = torch.randint(0, 512, (4, 96), device=CUDA)
    full = model(idx)[0].float()
    scale = full.abs().max().item()
    for graphed in (False, True):
        cache = model.new_cache(4, 96)
        pieces = [model(idx[:, :32], cache=cache)[0]]
        step = GraphedDecodeStep(model, cache, 4) if graphed else (lambda ids: model(ids, cache=cache)[0])
        pieces += [step(idx[:, t:t + 1]).clone() for t in range(32, 96)]
        got = torch.cat(pieces, dim=1).float()
        assert (got - full).abs().max().item() <= 0.03 * scale, graphed


@torch.inference_mode()
def test_graphed_decoding_gives_the_eager_tokens_in_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    model = model_on_gpu()
    prompts = torch.randint(0, 512, (3, 16), device=CUDA)
    graphed = torch.stack(list(generate_ids(model, prompts, GREEDY, max_new_tokens=100)), dim=1)
    eager = torch.stack(list(generate_ids(model, prompts, GREEDY, max_new_tokens=100, cuda_graph=False)), dim=1)
    assert graphed.shape == (3, 100)
    assert torch.equal(graphed, eager)


def test_sdpa_takes_a_fused_kernel_at_training_shapes():
    """With only flash and memory-efficient attention allowed, a bf16 training forward and backward at
    the GPU presets' shapes (head dim 64, grouped-query heads) runs: it never needs the math path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for preset in ("gpu-26m", "gpu-small"):
        cfg = load_config(preset).model
        cfg.vocab_size, cfg.n_layers = 1024, 1
        torch.manual_seed(0)
        model = Transformer(cfg).to(CUDA).train()
        idx = torch.randint(0, 1024, (2, cfg.max_seq_len), device=CUDA)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(idx, idx)
            loss.backward()
        assert torch.isfinite(loss)


def test_compiled_step_matches_the_eager_one():
    """Same weights, same batch: the compiled model's bf16 loss and gradients are the eager ones to bf16
    rounding, and four training steps give the same losses. (Weights after AdamW steps are not compared:
    Adam's update is about lr * sign(g) wherever g is tiny, so rounding noise in g moves them by ~lr.)"""
    from tinylm.train import Stepper, build_optimizer, setup_runtime

    cfg = load_config("tiny", {"train.device": "cuda", "train.dtype": "bf16", "train.grad_accum": 2})
    cfg.model.vocab_size = 512
    tokens = torch.randint(0, 512, (8, cfg.model.max_seq_len + 1))

    class Batches:
        def next_batch(self):
            return tokens[:, :-1], tokens[:, 1:]

    losses, grads, first = {}, {}, {}
    for compiled in (False, True):
        rt = setup_runtime(cfg.train)
        torch.manual_seed(0)
        model = Transformer(cfg.model).to(CUDA)
        wrapped = torch.compile(model) if compiled else model
        with rt.autocast():
            loss = wrapped(tokens[:, :-1].to(CUDA), tokens[:, 1:].to(CUDA))[1]
        loss.backward()
        first[compiled] = loss.item()
        grads[compiled] = torch.cat([p.grad.flatten() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
        optimizer = build_optimizer(model, cfg.train, rt.device)
        step = Stepper(wrapped, model, optimizer, torch.amp.GradScaler("cuda", enabled=False), rt, cfg.train)
        losses[compiled] = [step(Batches())[0] for _ in range(4)]
    assert first[True] == pytest.approx(first[False], rel=1e-2)
    assert ((grads[True] - grads[False]).norm() / grads[False].norm()).item() < 3e-2
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)
    assert losses[False][-1] < losses[False][0]  # it trained


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """A tokenizer and shards of a synthetic corpus (seeded word salad: the tests need tokens, not English)."""
    from tinylm.prepare import shards_stage, tokenizer_stage

    root = tmp_path_factory.mktemp("cuda-data")
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "and", "then", "slept", "in", "sun"]
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(200)) for _ in range(400)))
    cfg = load_config("tiny", {"data.corpus": [str(corpus)], "data.val_fraction": 0.1})
    tokenizer_stage(cfg, root / "tokenizer", progress=False)
    shards_stage(cfg, root / "tokenizer", root / "shards", progress=False)
    return root / "shards"


def test_deterministic_resume_is_bit_identical(small_shards, tmp_path):
    """train.deterministic=true on a GPU: steps 5-8 replayed from the step-4 checkpoint give the same bits.
    (A subprocess each: deterministic mode is process-wide.)"""
    args = ["pretrain", "--config", "tiny", "--shards", str(small_shards), "--train.device=cuda",
            "--train.deterministic=true", "--train.max_steps=8", "--train.save_every=4", "--train.keep_last=3",
            "--model.dropout=0.1", "--train.grad_accum=2"]

    def pretrain(out):
        r = subprocess.run([sys.executable, "-m", "tinylm.cli", *args, "--out", str(out)], capture_output=True,
                           text=True, timeout=300, env=os.environ.copy())
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

    pretrain(tmp_path / "straight")
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight/checkpoints/step-0000004", tmp_path / "resumed/checkpoints/step-0000004")
    pretrain(tmp_path / "resumed")
    a = load_file(str(tmp_path / "straight/checkpoints/step-0000008/model.safetensors"))
    b = load_file(str(tmp_path / "resumed/checkpoints/step-0000008/model.safetensors"))
    four = load_file(str(tmp_path / "straight/checkpoints/step-0000004/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], four[k]) for k in a)  # steps 5-8 moved the weights
