"""Two DDP ranks under torchrun (gloo, CPU) train the same weights as one process with the same global batch."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file



def _pretrain(args, out, nproc=None, verb=("pretrain",)):
    common = [*verb, "--config", "tiny", "--out", str(out), *args]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "tinylm.cli", *common]
    else:
        cmd = [sys.executable, "-m", "tinylm.cli", *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_two_ranks_match_one_process(prepared, tmp_path):
    shared = ["--shards", str(prepared["shards"]), "--train.max_steps=6", "--train.grad_accum=2",
              "--train.dtype=fp32", "--train.eval_every=3", "--train.save_every=3"]
    _pretrain(shared + ["--train.batch_size=8"], tmp_path / "single")
    ddp = _pretrain(shared + ["--train.batch_size=4"], tmp_path / "ddp", nproc=2)
    assert "x2" in ddp.stdout  # the preflight line names the world size
    for step in ("step-0000003", "step-0000006"):
        a = load_file(str(tmp_path / "single/checkpoints" / step / "model.safetensors"))
        b = load_file(str(tmp_path / "ddp/checkpoints" / step / "model.safetensors"))
        for name in a:
            assert torch.allclose(a[name], b[name], atol=2e-5, rtol=1e-4), (step, name)
    # the comparison is between trained weights: steps 4-6 moved them far beyond the tolerance
    three = load_file(str(tmp_path / "single/checkpoints/step-0000003/model.safetensors"))
    assert (three["layers.0.attn.wq.weight"] - a["layers.0.attn.wq.weight"]).abs().max() > 1e-3


@pytest.mark.slow
def test_sft_on_two_ranks_matches_one_process(prepared, tmp_path):
    from test_sft import arithmetic_chats

    base = tmp_path / "base"
    _pretrain(["--shards", str(prepared["shards"]), "--train.max_steps=3", "--train.dtype=fp32"], base)
    chats = arithmetic_chats(tmp_path / "chats.jsonl", n=200)
    shared = [f"--sft.corpus={chats}", "--sft.train.max_steps=4", "--sft.train.max_epochs=0", "--train.dtype=fp32",
              "--train.save_every=0", "--sft.train.eval_every=2"]
    _pretrain(shared + ["--sft.train.batch_size=8"], tmp_path / "single", verb=("sft", str(base)))
    _pretrain(shared + ["--sft.train.batch_size=4"], tmp_path / "ddp", nproc=2, verb=("sft", str(base)))
    a = load_file(str(tmp_path / "single/checkpoints/step-0000004/model.safetensors"))
    b = load_file(str(tmp_path / "ddp/checkpoints/step-0000004/model.safetensors"))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=2e-5, rtol=1e-4), name


@pytest.mark.slow
def test_fsdp_two_ranks_match_one_process_and_resume(prepared, tmp_path):
    """FSDP2 shards weights and optimizer over 2 ranks; its checkpoints are the plain single-process
    format; a run resumed from one of them ends with the weights of an uninterrupted single process."""
    import shutil

    from tinylm.checkpoint import load_checkpoint

    shared = ["--shards", str(prepared["shards"]), "--train.max_steps=6", "--train.grad_accum=2",
              "--train.dtype=fp32", "--train.eval_every=3", "--train.save_every=3"]
    _pretrain(shared + ["--train.batch_size=8"], tmp_path / "single")
    fsdp = _pretrain(shared + ["--train.batch_size=4", "--train.parallel=fsdp"], tmp_path / "fsdp", nproc=2)
    assert "x2 fsdp" in fsdp.stdout
    ckpts = tmp_path / "fsdp/checkpoints"
    first = load_file(str(ckpts / "step-0000006/model.safetensors"))
    load_checkpoint(ckpts / "step-0000003")  # strict: every name, shape and hash of the plain format

    shutil.rmtree(ckpts / "step-0000006")  # as if killed after the step-3 save
    resumed = _pretrain(shared + ["--train.batch_size=4", "--train.parallel=fsdp"], tmp_path / "fsdp", nproc=2)
    assert "resuming from step-0000003" in resumed.stdout
    single = load_file(str(tmp_path / "single/checkpoints/step-0000006/model.safetensors"))
    again = load_file(str(ckpts / "step-0000006/model.safetensors"))
    for name in single:
        assert torch.allclose(single[name], first[name], atol=2e-5, rtol=1e-4), name
        assert torch.allclose(single[name], again[name], atol=2e-5, rtol=1e-4), name
    three = load_file(str(tmp_path / "single/checkpoints/step-0000003/model.safetensors"))
    assert (three["layers.0.attn.wq.weight"] - single["layers.0.attn.wq.weight"]).abs().max() > 1e-3
