"""Preemption: SIGTERM or SIGINT saves a final checkpoint and stops; SIGKILL at any moment loses only
the steps since the last checkpoint; running the same command again ends with the very weights of
an uninterrupted run (bit for bit on CPU)."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinylm.checkpoint import latest_checkpoint, load_checkpoint

STEPS = 60
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _command(prepared, out: Path, verb: str, base: Path | None = None, chats: Path | None = None,
             nproc: int = 0, steps: int = STEPS) -> list[str]:
    common = ["--config", "tiny", "--out", str(out),
              "--train.save_every=7", "--train.eval_every=20", "--train.log_every=1"]
    if verb == "pretrain":
        args = ["pretrain", "--shards", str(prepared["shards"]), f"--train.max_steps={steps}", *common]
    else:
        args = ["sft", str(base), f"--sft.corpus={chats}", f"--sft.train.max_steps={steps}", "--sft.train.max_epochs=0",
                "--sft.train.batch_size=4", "--sft.train.eval_every=20", *common]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else [sys.executable]
    return [*launcher, "-m", "tinylm.cli", *args]


def _finish(cmd: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def _weights(out: Path, steps: int = STEPS) -> dict:
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == f"step-{steps:07d}", ckpt
    return load_file(str(ckpt / "model.safetensors"))


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs by {(a[name] - b[name]).abs().max()}"


def _logged_steps(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


@pytest.fixture(scope="module")
def sft_inputs(prepared, tmp_path_factory):
    from test_sft import arithmetic_chats

    root = tmp_path_factory.mktemp("preempt-sft")
    base = root / "base"
    _finish([sys.executable, "-m", "tinylm.cli", "pretrain", "--config", "tiny", "--shards", str(prepared["shards"]),
             "--out", str(base), "--train.max_steps=3"])
    return {"base": base, "chats": arithmetic_chats(root / "chats.jsonl", n=200)}


@pytest.fixture(scope="module")
def reference(prepared, sft_inputs, tmp_path_factory):
    """Uninterrupted runs, computed once per stage on demand."""
    cache = {}

    def weights(verb: str) -> dict:
        if verb not in cache:
            out = tmp_path_factory.mktemp(f"reference-{verb}")
            _finish(_command(prepared, out, verb, **sft_inputs))
            cache[verb] = _weights(out)
        return cache[verb]
    return weights


@pytest.mark.parametrize("verb,sig", [("pretrain", signal.SIGTERM),
                                      pytest.param("pretrain", signal.SIGINT, marks=pytest.mark.slow),
                                      pytest.param("sft", signal.SIGTERM, marks=pytest.mark.slow)])
def test_signal_saves_stops_and_resumes_bit_identical(prepared, sft_inputs, reference, tmp_path, verb, sig):
    out = tmp_path / "run"
    cmd = _command(prepared, out, verb, **sft_inputs)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    deadline = time.time() + 300
    while _logged_steps(out) < 3:  # training is under way
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + sig, log[-3000:]
    stopped_at = _logged_steps(out)
    assert 3 <= stopped_at < STEPS and f"{sig.name}: stopping after step {stopped_at}" in log
    assert latest_checkpoint(out).name == f"step-{stopped_at:07d}"  # the final checkpoint is the stopping step

    resumed = _finish(cmd)
    assert f"resuming from step-{stopped_at:07d}" in resumed.stdout
    _assert_identical(_weights(out), reference(verb))


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(prepared, reference, tmp_path):
    """Several SIGKILLs at random moments (mid-step, mid-save, mid-eval: wherever they land); each leaves
    a checkpoint that loads and verifies; the run completed afterwards matches the uninterrupted one."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    out = tmp_path / "run"
    cmd = _command(prepared, out, "pretrain")
    kills = []
    for attempt in range(5):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        before = _logged_steps(out)
        while _logged_steps(out) <= before and proc.poll() is None:  # wait for this attempt to train
            time.sleep(0.01)
        # the last attempt waits for a checkpoint, so the run completed afterwards must resume from one
        # (four short random waits can all land before the first save: seed 2940721763 did in CI)
        while attempt == 4 and latest_checkpoint(out) is None and proc.poll() is None:
            time.sleep(0.01)
        if proc.poll() is not None:  # the last kill came after the final save: nothing was left to train
            assert proc.returncode == 0, f"seed {seed}: the run failed"
            break
        time.sleep(rng.uniform(0.0, 0.6))  # then kill at a random moment
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(_logged_steps(out))
        ckpt = latest_checkpoint(out)
        if ckpt is not None:
            load_checkpoint(ckpt)  # complete, and every file matches its SHA-256
    assert len(kills) >= 2, f"seed {seed}: killed only {kills}"
    final = _finish(cmd)
    assert "resuming from" in final.stdout, f"seed {seed}"
    _assert_identical(_weights(out), reference("pretrain"))


def test_sigkill_mid_save_keeps_the_previous_checkpoint(prepared, tmp_path):
    """Killed while a checkpoint directory is being written: the half-written one is never read, the
    previous one is still the latest and intact, and the next run cleans up and goes on."""
    out = tmp_path / "run"
    cmd = _command(prepared, out, "pretrain")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    ckpts = out / "checkpoints"
    deadline, in_progress = time.time() + 300, []
    while not in_progress:  # a save after the first complete checkpoint is being written
        if (ckpts / "step-0000007" / "meta.json").is_file():
            in_progress = [p.name for p in ckpts.iterdir() if p.name.startswith("step-") and p.name.endswith(".tmp")]
        assert proc.poll() is None and time.time() < deadline, "no save in progress was seen"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = latest_checkpoint(out)
    assert latest.name < in_progress[0]  # the half-written one is not taken for a checkpoint
    load_checkpoint(latest)
    resumed = _finish(cmd)
    assert f"resuming from {latest.name}" in resumed.stdout
    assert not any(p.name.endswith(".tmp") for p in ckpts.iterdir())  # the trainer cleaned up


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["pretrain", "sft"])
def test_sigterm_under_torchrun_two_ranks(prepared, sft_inputs, tmp_path, verb):
    """torchrun passes SIGTERM to both ranks; they agree on the step, rank 0 saves, and a rerun of the
    same torchrun command ends with the weights of an uninterrupted 2-rank run."""
    # tiny SFT steps take ~20 ms: enough of them that the signal, forwarded by torchrun's agent, lands mid-run
    steps = 300
    reference_out, out = tmp_path / "reference", tmp_path / "run"
    _finish(_command(prepared, reference_out, verb, nproc=2, steps=steps, **sft_inputs))
    cmd = _command(prepared, out, verb, nproc=2, steps=steps, **sft_inputs)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                            start_new_session=True)
    deadline = time.time() + 300
    while _logged_steps(out) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:] if proc.poll() is not None else ""
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=300)[0]
    stopped_at = _logged_steps(out)
    assert proc.returncode != 0 and f"SIGTERM: stopping after step {stopped_at}" in log, log[-3000:]
    assert latest_checkpoint(out).name == f"step-{stopped_at:07d}"
    resumed = _finish(cmd)
    assert f"resuming from step-{stopped_at:07d}" in resumed.stdout
    assert stopped_at < steps
    _assert_identical(_weights(out, steps), _weights(reference_out, steps))
