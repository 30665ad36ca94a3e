"""THE training loop. Pretraining and fine-tuning differ only in the batches they feed it.

Reads top to bottom in the order things happen: runtime (device, precision, ranks) -> model ->
optimizer -> resume -> loop { lr, micro-batches with accumulation, clip, step, log, eval, save }.
Runs as one process or under `torchrun` (DDP or FSDP2, see parallel.py) with the same code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from .checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, load_trainer_state, remove_partial,
                         save_checkpoint)
from .compiling import CompileTimer, choice, known_cost, plan_key, settled_pace
from .config import Config, ConfigError, TrainConfig, to_toml
from .files import claimed_folder, output_lock, write_text
from .logs import MetricsLog, Tracker, format_duration
from .lora import adapter_spec, add_adapters, trainable_parameters
from .model import Transformer
from .parallel import full_state, is_sharded, load_full_state, local_value, shard, sync_gradients, wrap
from .device import peak_flops, pick_device, pick_dtype
from .tokenizer import Tokenizer


# --- runtime: device, precision, ranks -----------------------------------------------------------
@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # autocast dtype (float32 = no autocast)
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    distributed: bool = False  # launched by torchrun: a process group, DDP/FSDP and collectives, even for one rank

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A CPU batch on the training device; on a GPU through pinned memory, so the copy is asynchronous."""
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def setup_runtime(tc: TrainConfig) -> Runtime:
    """Single process, or one rank of a `torchrun` job.

    Under torchrun (TORCHELASTIC_RUN_ID in the environment, or WORLD_SIZE > 1) a process group is
    started (NCCL on GPUs, gloo on CPUs) and the model is wrapped in DDP or FSDP2 even for a single
    rank, so `torchrun --nproc_per_node 1` runs the very code that N ranks run.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    distributed = world > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    device = pick_device(tc.device)
    if distributed:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if tc.deterministic:  # same seed, same bits: also for cuBLAS, which needs a fixed workspace
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
    return Runtime(device, pick_dtype(tc.dtype, device), rank, world, local_rank, distributed)


def attention_kernel(tc: TrainConfig, device: torch.device, compiled: bool | None = None) -> str:
    """`train.attention` resolved: "auto" takes the hand-written chunked attention (attention.py) for a
    step compiled on a CPU, where it measured 1.2-2.4x PyTorch's CPU flash attention forward +
    backward (eager it is not faster), and SDPA everywhere else."""
    if tc.attention == "chunked" and device.type != "cpu":
        raise ConfigError(f"train.attention=chunked is a CPU kernel; on {device.type} take 'sdpa' or 'auto'")
    if tc.attention != "auto":
        return tc.attention
    compiled = choice(tc.compile) is True if compiled is None else compiled
    return "chunked" if compiled and device.type == "cpu" else "sdpa"


# --- optimisation --------------------------------------------------------------------------------
def build_optimizer(model: torch.nn.Module, tc: TrainConfig, device: torch.device, sharded: bool = False):
    """AdamW with weight decay on matrices (embeddings, projections), not on norms; or, with
    `train.optimizer = "muon"`, torch's Muon (Jordan et al. 2024) for the hidden 2-D weights of the
    blocks, its step scaled to AdamW's RMS (`match_rms_adamw`, Liu et al. 2025, "Muon is Scalable")
    so that one learning rate serves both, and AdamW for embeddings, head and norms. The token
    embedding (with the head when tied) has a group of its own, marked `"embedding": True`, whose
    rate the training loop sets to `train.embedding_lr` on the same schedule.
    """
    fused = device.type in ("cuda", "cpu") and not sharded  # one kernel per tensor group: 26M params on CPU 21 ms vs 84 ms foreach
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = {n for n, p in named if tc.optimizer == "muon" and p.dim() == 2 and ".layers." in f".{n}"}
    embedding = {n for n, p in named if n.endswith("tok_embeddings.weight")}  # the head too when tied (one tensor)
    groups = [
        {"params": [p for n, p in named if n in embedding], "weight_decay": tc.weight_decay, "embedding": True},
        {"params": [p for n, p in named if p.dim() >= 2 and n not in hidden | embedding], "weight_decay": tc.weight_decay},
        {"params": [p for n, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]
    adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=tc.lr, betas=(tc.beta1, tc.beta2),
                              fused=fused, foreach=not fused)
    if not hidden:
        return adamw
    native_bf16 = pick_dtype("auto", device) == torch.bfloat16  # where bf16 products are not emulated
    muon = Muon([p for n, p in named if n in hidden], lr=tc.lr, weight_decay=tc.weight_decay,
                adjust_lr_fn="match_rms_adamw", ns_dtype=torch.bfloat16 if native_bf16 else torch.float32)
    return Optimizers(adamw, muon)


def newton_schulz(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Muon's orthogonalisation of a 2-D update, or of a stack (G, rows, cols) of same-shaped ones
    (Jordan et al. 2024; torch.optim.Muon's quintic iteration, coefficients and normalisation, each
    matrix normalised by its own Frobenius norm), computed in `dtype`; same shape as `g`."""
    a, b, c = coefficients
    x = g.to(dtype)
    stacked = x.dim() == 3
    if not stacked:
        x = x[None]
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    if tall:
        x = x.mT
    return x if stacked else x[0]


class Muon(torch.optim.Muon):
    """torch.optim.Muon's update (momentum, Nesterov, decoupled weight decay, `adjust_lr_fn`), with
    the Newton-Schulz iteration in `ns_dtype` and run once per shape on the stacked matrices.

    torch computes the iteration in bf16 always, which a CPU without bf16 instructions (AVX2)
    emulates: ~18x slower than fp32 there (8 matrices of 192 x 192, 315 vs 17 ms), half of an `xs`
    step and most of an `s` one; so ns_dtype is fp32 there. And it runs one matrix at a time: at
    the CPU sizes (matrices of 64-512 rows) the small products cost their overhead more than their
    arithmetic, and the layers' same-shaped matrices stacked into one batched product take a third
    of the time (bf16, 28 matrices of `xs`: 21 -> 7.5 ms). State and checkpoints are torch's."""

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            if not params:
                continue
            lr, momentum = group["lr"], group["momentum"]
            torch._foreach_lerp_(buffers, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for i, param in enumerate(params):
                by_shape.setdefault(tuple(param.shape), []).append(i)
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            for (rows, cols), members in by_shape.items():
                ortho = newton_schulz(torch.stack([updates[i] for i in members]), group["ns_coefficients"],
                                      group["ns_steps"], group["eps"], self.ns_dtype)
                scale = 0.2 * math.sqrt(max(rows, cols)) if group["adjust_lr_fn"] == "match_rms_adamw" else (
                    math.sqrt(max(1.0, rows / cols)) if group["adjust_lr_fn"] in (None, "original") else 1.0)
                torch._foreach_add_([params[i] for i in members], list(ortho.to(params[members[0]].dtype).unbind()),
                                    alpha=-lr * scale)
        return loss


class Optimizers:
    """Several optimizers stepped as one (each owns its own parameters): what the loop, the checkpoint
    and GradScaler (fp16: it unscales every group, then steps all or none) need of `torch.optim.Optimizer`."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("optimizers", ())) != len(self.optimizers):
            raise CheckpointError("the checkpoint's optimizer state is for another train.optimizer")
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)


class Pace:
    """The typical step time (a running mean that skips outliers: the compiling step), and from it the
    steps a time-limited run can expect in all: the planned steps or those the time left allows at this
    pace, whichever are fewer (a fine-tuning planned for 2 epochs whose max_time ends it a fifth of the
    way warms up over a share of the fifth). It times the steps alone, not the validations and saves
    between them, so that a warm-up in a share of the steps stays a share of the steps."""

    def __init__(self, tc: TrainConfig):
        self.tc, self.step_s = tc, None

    def update(self, dt: float) -> None:
        if self.step_s is None or dt < 4 * self.step_s:
            self.step_s = dt if self.step_s is None else 0.9 * self.step_s + 0.1 * dt

    def expected_steps(self, progress: "Progress", total_steps: int | None) -> float | None:
        by_time = None
        if self.tc.max_time and self.step_s is not None:
            by_time = progress.step + max(0.0, self.tc.max_time - progress.elapsed - progress.reserve) / self.step_s
        if total_steps:
            return float(total_steps) if by_time is None else min(float(total_steps), by_time)
        return by_time


# a warm-up floor in steps (warmup_steps beside warmup_fraction) takes at most this share of the run
WARMUP_FLOOR_SHARE = 0.25


def lr_at(step: int, progress: float, tc: TrainConfig, expected_steps: float | None = None) -> float:
    """The learning rate at optimizer step `step`, `progress` (0..1) of the way through the run.

    Linear warm-up, then either a cosine from 1 to `min_lr_ratio` over the whole run, or ("wsd",
    warmup-stable-decay: Hu et al. 2024, MiniCPM) the peak until the last `decay_fraction`, then a
    linear decay to `min_lr_ratio`. The warm-up lasts `warmup_steps` steps, or, with
    `warmup_fraction`, that share of the run's steps (of `expected_steps` when known: the steps of a
    time-limited run come from its measured pace, so a pause to compile does not cut the warm-up
    short; before that, of the progress) but never fewer than `warmup_steps` unless those would be
    over a quarter of the run: a fresh model needs some tens of steps to reach a high rate safely
    whatever the machine (the AVX2 speedrun: 10 warm-up steps of ~200 gave 2.65 bits/byte, 30 gave 2.49).
    """
    progress = min(1.0, progress)
    if tc.warmup_fraction > 0 and expected_steps:
        floor = min(tc.warmup_steps, WARMUP_FLOOR_SHARE * expected_steps)
        warmup = min(1.0, (step + 1) / max(1.0, tc.warmup_fraction * expected_steps, floor))
    elif tc.warmup_fraction > 0:  # from 0.1% of the way, so that the first step is not wasted at zero
        warmup = min(1.0, max(progress, 0.001) / tc.warmup_fraction)
        if tc.warmup_steps > 0:
            warmup = min(warmup, (step + 1) / tc.warmup_steps)
    else:
        warmup = min(1.0, (step + 1) / tc.warmup_steps) if tc.warmup_steps > 0 else 1.0
    if tc.schedule == "wsd":
        into_decay = (progress - (1 - tc.decay_fraction)) / tc.decay_fraction if tc.decay_fraction > 0 else 0.0
        shape = 1 - (1 - tc.min_lr_ratio) * min(1.0, max(0.0, into_decay))
    else:
        shape = tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return tc.lr * warmup * shape


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""
    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0  # seconds of the stage's wall time (steps, validations, saves), summed over resumptions
    reserve: float = 0.0  # seconds kept back for the final validation and checkpoint save
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    best_val_loss: float = float("inf")
    lr_max: float = 0.0  # the highest learning rate a step has used


def horizon(tc: TrainConfig, tokens_per_step: int, steps_per_epoch: int) -> int | None:
    """Total optimizer steps implied by the step/epoch/token limits (None if only time-limited)."""
    limits = []
    if tc.max_steps:
        limits.append(tc.max_steps)
    if tc.max_epochs:
        limits.append(math.ceil(tc.max_epochs * steps_per_epoch))
    if tc.max_tokens:
        limits.append(math.ceil(tc.max_tokens / tokens_per_step))
    if not limits and not tc.max_time:
        raise ValueError("no training limit: set train.max_steps, max_epochs, max_tokens or max_time")
    return min(limits) if limits else None


def fraction_done(p: Progress, tc: TrainConfig, total_steps: int | None) -> float:
    """How far the run is, 0 to 1: in steps, or in time when that is further. Time is the wall time
    spent (steps, validations, saves) plus the reserve for the final validation and save, so that a
    time-limited stage ends, those included, when train.max_time runs out."""
    parts = [p.step / total_steps] if total_steps else []
    if tc.max_time:
        parts.append((p.elapsed + p.reserve) / tc.max_time)
    return min(1.0, max(parts))


class LoopTime:
    """The training loop's wall time as train.max_time counts it: laps from the end of one step to the
    end of the next, so that validations, log lines and checkpoint saves count as steps do; and the
    durations of the last validation and the last save, from which the stage keeps back time for its
    final ones."""

    def __init__(self, tc: TrainConfig, validates: bool):
        self.tc, self.validates = tc, validates
        self.lap_start = time.perf_counter()
        self.validation_s = self.save_s = 0.0  # seconds the last one took (0: none yet)

    def lap(self) -> float:
        """Seconds since the previous lap."""
        now = time.perf_counter()
        seconds, self.lap_start = now - self.lap_start, now
        return seconds

    @contextlib.contextmanager
    def timing(self, what: str):
        """Time a validation ("validation_s") or a save ("save_s")."""
        t0 = time.perf_counter()
        yield
        setattr(self, what, time.perf_counter() - t0)

    def reserve(self, validation_s: float, save_s: float, step_s: float) -> float:
        """Seconds to keep back for the final validation and save: the last ones measured; before the first
        validation, a third of a micro-batch's step time per validation micro-batch (a forward pass without
        the backward: cpu-demo measured a quarter)."""
        if self.validates and not validation_s:
            validation_s = step_s / 3 * self.tc.eval_batches / self.tc.grad_accum
        return validation_s + save_s


# --- the loop ------------------------------------------------------------------------------------
class NextTokenLoss:
    """The objective of pretraining and SFT: cross-entropy of every target that is not -100.

    An objective is `(model, x, y) -> mean loss` plus `count(y)`, the number of units the mean is over,
    by which micro-batches and ranks are weighed (dpo.py's counts preference pairs)."""

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(x, y)[1]

    def count(self, y: torch.Tensor) -> int:
        return int((y != -100).sum())


@torch.no_grad()
def evaluate(model: torch.nn.Module, make_batches: Callable, n_batches: int, rt: Runtime,
             objective: Callable | None = None) -> float:
    """Mean loss per target token over `n_batches` validation micro-batches (all ranks together).

    `make_batches` returns batches in the same seeded random order every time, so each validation
    scores the same sample drawn from the whole held-out split (not its first rows). Each batch
    weighs by its number of targets, as in training.
    """
    model.eval()
    objective = objective or NextTokenLoss()
    batches = make_batches()
    total = torch.zeros(2, device=rt.device, dtype=torch.float64)  # (sum of token losses, tokens)
    for _ in range(n_batches):
        x, y = batches.next_batch()
        y = y.to(rt.device)
        with rt.autocast():
            loss = objective(model, x.to(rt.device), y)
        count = torch.tensor(float(objective.count(y)), device=rt.device, dtype=torch.float64)
        total += torch.stack([loss.double() * count, count])
    if rt.distributed:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def train(cfg: Config, out_dir: str | Path, rt: Runtime, train_batches, make_val_batches: Callable | None,
          tokenizer_dir: str | Path, bytes_per_token: float | None = None, stage: str = "pretrain",
          objective: Callable | None = None) -> dict:
    """Train `cfg.model` on `train_batches`; checkpoints and logs go to out_dir. Returns a summary.

    `objective` is the loss (NextTokenLoss unless given: dpo.py gives its preference loss).

    out_dir must be new, empty or an earlier output of this stage (files.OutputError otherwise), and
    is locked while training writes it (files.LockedError for a second process).
    """
    out_dir = Path(out_dir)
    inputs = (tokenizer_dir, *([cfg.train.init_from] if cfg.train.init_from else []))
    if not rt.is_main:
        return _train(cfg, out_dir, rt, train_batches, make_val_batches, tokenizer_dir, bytes_per_token, stage, objective)
    with output_lock(out_dir), claimed_folder(out_dir, stage, inputs=inputs, legacy=("checkpoints",)):
        return _train(cfg, out_dir, rt, train_batches, make_val_batches, tokenizer_dir, bytes_per_token, stage, objective)


def _train(cfg: Config, out_dir: Path, rt: Runtime, train_batches, make_val_batches: Callable | None,
           tokenizer_dir: str | Path, bytes_per_token: float | None, stage: str, objective: Callable | None) -> dict:
    tc = cfg.train
    if cfg.model.size:  # pipeline.model_for_budget turns a size into a shape
        raise ConfigError(f"model.size={cfg.model.size!r} is not resolved into a shape; train through pipeline.pretrain")
    torch.manual_seed(tc.seed)  # the same initial weights on every rank (FSDP does not broadcast them)
    model = Transformer(cfg.model).to(rt.device)
    if tc.guided_heads:
        if objective is not None and not isinstance(objective, NextTokenLoss):
            raise ConfigError(f"train.guided_heads adds to the next-token loss; the {stage} stage trains another")
        try:
            model.set_guidance(tc.guided_heads, tc.guided_weight, tc.guided_mass)
        except ValueError as e:
            raise ConfigError(f"train.guided_heads: {e}") from None
    compiled = choice(tc.compile)  # None: "auto", decided after the first steps
    if compiled is None and rt.distributed:  # ranks must not decide apart: no switch mid-run
        compiled = rt.device.type == "cuda"
    model.attention = attention_kernel(tc, rt.device, bool(compiled))
    if rt.rank:
        torch.manual_seed(tc.seed + rt.rank)  # but each rank its own dropout
    if tc.init_from:
        start, _, _ = load_checkpoint(tc.init_from, rt.device)
        model.load_state_dict(start.state_dict(), strict=True)
        del start
    if stage != "pretrain" and cfg.lora.rank:  # fine-tuning with adapters: only they train
        add_adapters(model, cfg.lora)
    if is_sharded(rt, tc):
        shard(model, rt)  # before the optimizer, which must see the sharded parameters
    if tc.optimizer == "muon" and is_sharded(rt, tc):
        raise ConfigError("train.optimizer = 'muon' works in one process or with DDP, not with FSDP (its "
                          "orthogonalisation needs whole matrices): use train.optimizer = 'adamw' or train.parallel = 'ddp'")
    optimizer = build_optimizer(model, tc, rt.device, sharded=is_sharded(rt, tc))
    embedding_scale = tc.embedding_lr / tc.lr if tc.embedding_lr and tc.lr else 1.0  # the schedule scales both alike
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    progress = Progress()

    if rt.is_main:
        remove_partial(out_dir)  # a save cut short by a kill
    resume_from = latest_checkpoint(out_dir) if tc.resume else None
    if resume_from is not None:
        embedding_marks = [group.get("embedding", False) for group in optimizer.param_groups]
        progress = _restore(resume_from, model, optimizer, scaler, train_batches, rt, tc, tokenizer_dir)
        for group, mark in zip(optimizer.param_groups, embedding_marks):  # loading takes the saved groups' keys,
            group["embedding"] = mark                                     # which older checkpoints lack
    growing = not getattr(train_batches, "grown", True)  # data.GrowingBatches before its full context
    if tc.short_seq_len and not hasattr(train_batches, "grow"):
        raise ConfigError(f"train.short_seq_len: a short context first is for pretraining's packed windows; the "
                          f"{stage} stage trains on whole examples")
    wrapped = wrap(model, rt, tc, bool(compiled))

    tokens_per_step = train_batches.windows_per_step * train_batches.seq_len * tc.grad_accum  # at most (SFT pads less)
    total_steps = horizon(tc, tokens_per_step, max(1, train_batches.steps_per_epoch // tc.grad_accum))
    flops_per_token = model.flops_per_token(train_batches.seq_len)  # attention counted at the full window
    peak = peak_flops(rt.device, rt.dtype) if rt.is_main else None
    log = MetricsLog(out_dir, enabled=rt.is_main)
    tracker = Tracker(tc, out_dir, cfg.to_dict()) if rt.is_main else None
    if rt.is_main:
        write_text(out_dir / "config.toml", to_toml(cfg))
        log.line(_preflight(model, rt, tokens_per_step, total_steps, tc, resume_from, stage, peak))
        if growing:
            log.line(f"context: {train_batches.seq_len} tokens at batch {train_batches.batch_size} for the first "
                     f"{tc.short_seq_fraction:.0%} of the run, then {cfg.model.max_seq_len} at batch {tc.batch_size} "
                     f"(train.short_seq_len)")

    def save() -> None:
        weights, optim_state = full_state(model, optimizer, rt, tc)  # collective under FSDP
        if rt.is_main:
            trainer = {**progress.__dict__, "data": train_batches.state_dict(), "stage": stage,
                       "tokens_per_step": tokens_per_step, "total_steps": total_steps,
                       "ran_on": f"{rt.device} {str(rt.dtype).replace('torch.', '')} x{rt.world}"}
            extra = {"scaler": scaler.state_dict(), "rng_cpu": torch.get_rng_state()}
            if rt.device.type == "cuda":
                extra["rng_cuda"] = torch.cuda.get_rng_state(rt.device)
            plain = model if not is_sharded(rt, tc) else _plain_model(cfg, weights)
            save_checkpoint(out_dir, plain, cfg, tokenizer_dir, trainer, optim_state, extra, tc.keep_last)
        if rt.distributed:
            dist.barrier()

    def run_eval() -> dict:
        if make_val_batches is None:
            return {}
        # the plain module, never the compiled step: a no-grad graph is a second compile (13 s for
        # cpu-speedrun on a fresh cache, where the whole held-out split takes 1.1 s eagerly)
        val_loss = evaluate(model, make_val_batches, tc.eval_batches, rt, objective)
        progress.best_val_loss = min(progress.best_val_loss, val_loss)
        out = {"val_loss": round(val_loss, 5)}
        if bytes_per_token:
            out["val_bpb"] = round(val_loss / math.log(2) / bytes_per_token, 5)
        return out

    step = Stepper(wrapped, model, optimizer, scaler, rt, tc, say=log.line, objective=objective)
    stop = StopRequest()
    bar = tqdm(total=total_steps, initial=progress.step, desc=stage, unit="step", disable=not rt.is_main or None,
               dynamic_ncols=True, leave=False)
    wrapped.train()
    compile_timer, eager_times = None, []
    pace = Pace(tc)
    last_saved = progress.step if resume_from else -1
    steps_run = 0
    loop_time = LoopTime(tc, validates=make_val_batches is not None)
    try:
        while fraction_done(progress, tc, total_steps) < 1.0 and not stop.agreed:
            t0 = time.perf_counter()
            fraction = fraction_done(progress, tc, total_steps)
            if growing and fraction >= tc.short_seq_fraction:  # the full context from this step on
                train_batches.grow()
                growing = False
                flops_per_token = model.flops_per_token(train_batches.seq_len)
                if compile_timer is not None:
                    compile_timer.reshaped()
                if rt.is_main:
                    log.line(f"context: {train_batches.seq_len} tokens at batch {train_batches.batch_size} from step "
                             f"{progress.step + 1:,} ({fraction:.0%} of the run; train.short_seq_fraction="
                             f"{tc.short_seq_fraction:g})")
            lr = lr_at(progress.step, fraction, tc, pace.expected_steps(progress, total_steps))
            for group in optimizer.param_groups:
                group["lr"] = lr * (embedding_scale if group.get("embedding") else 1.0)
            dropout_on = train_batches.progress >= tc.dropout_from_epoch
            if model.set_dropout(dropout_on) and dropout_on and progress.step and rt.is_main:
                log.line(f"dropout: on from step {progress.step + 1:,} (epoch {train_batches.progress:.2f}; "
                         f"train.dropout_from_epoch={tc.dropout_from_epoch:g})")
            loss_value, grad_norm, tokens = step(train_batches)  # tokens: real ones, padding not counted
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                _skip_nonfinite(progress, log, loss_value)
                continue
            progress.nonfinite_in_row = 0
            progress.lr_max = max(progress.lr_max, lr)
            progress.step += 1
            steps_run += 1
            progress.tokens += tokens
            # ranks agree on the times (the slowest rank's) and on stopping; dt is the step's own time
            dt, lap, validation_s, save_s = stop.agree(rt, time.perf_counter() - t0, loop_time.lap(),
                                                       loop_time.validation_s, loop_time.save_s)
            progress.elapsed += lap
            pace.update(dt)
            progress.reserve = loop_time.reserve(validation_s, save_s, pace.step_s)
            if compile_timer is not None and (said := compile_timer.step(dt)):
                log.line(said)
                if compile_timer.speedup < 1:  # measured slower (an AVX2 CPU: 0.95x): back to the eager step
                    model.attention = attention_kernel(tc, rt.device, False)
                    wrapped = step.wrapped = wrap(model, rt, tc, False)
            if compile_timer is not None and compile_timer.done:
                compile_timer = None
            if compiled is None and steps_run > 1:  # "auto": the eager steps after the first (its warm-up)
                eager_times.append(dt)
                eager_s = settled_pace(eager_times, PACE_AFTER - 1)
                if eager_s is not None:  # the eager pace is known now
                    then = (tc.batch_size, cfg.model.max_seq_len) if growing else None  # a second compile to come
                    compile_key = plan_key(cfg.model, rt.device, rt.dtype, train_batches.batch_size, train_batches.seq_len, then)
                    compiled, said = _decide_compile(progress, tc, total_steps, eager_s, compile_key, rt,
                                                     cfg.model.n_layers * (2 if growing else 1))
                    log.line(said)
                    if compiled:
                        model.attention = attention_kernel(tc, rt.device, True)
                        wrapped = step.wrapped = wrap(model, rt, tc, True)
                        compile_timer = CompileTimer(eager_s, compile_key, reshapes=int(growing))

            record = {"step": progress.step, "loss": round(loss_value, 5), "lr": lr, "grad_norm": round(grad_norm, 4),
                      "tok_per_s": round(tokens / dt), "tokens": progress.tokens,
                      "tflops": _figures(tokens * flops_per_token / dt / 1e12),
                      "epoch": round(train_batches.progress, 4), "elapsed": round(progress.elapsed, 2)}
            if peak:
                record["mfu"] = _figures(record["tflops"] * 1e12 / peak[0])
            finished = fraction_done(progress, tc, total_steps) >= 1.0
            if (tc.eval_every and progress.step % tc.eval_every == 0) or finished:
                with loop_time.timing("validation_s"):
                    record.update(run_eval())
            if rt.is_main:
                if steps_run == PACE_AFTER:
                    log.line(_pace(progress, tc, total_steps, tokens, dt))
                bar.update(1)
                remaining = _eta(progress, tc, total_steps)
                show = progress.step % tc.log_every == 0 or finished or "val_loss" in record or progress.step == 1
                log.step(record, total_steps, remaining, show)
                if tracker:
                    tracker.log(record)
            if (tc.save_every and progress.step % tc.save_every == 0) or finished:
                with loop_time.timing("save_s"):
                    save()
                last_saved = progress.step
        if stop.agreed and rt.is_main:
            log.line(f"{stop.name}: stopping after step {progress.step}; a final checkpoint keeps everything "
                     "(run the same command again to continue)")
        if last_saved != progress.step:  # stopped by a signal, a resumed run that was already finished, or an empty loop
            save()
    finally:
        stop.restore()
    progress.elapsed += loop_time.lap()  # the final validation and save (the checkpoint has the figure the loop stopped at)
    bar.close()
    if tracker:
        tracker.close()
    summary = {"stage": stage, "steps": progress.step, "tokens": progress.tokens, "elapsed": round(progress.elapsed, 1),
               "best_val_loss": progress.best_val_loss, "params": model.num_params(),
               "checkpoint": str(latest_checkpoint(out_dir)), "stopped_by": stop.name}
    if rt.is_main:
        log.line(f"{'stopped' if stop.agreed else 'done'}: {progress.step} steps, {progress.tokens:,} tokens in {format_duration(progress.elapsed)}; "
                 f"checkpoint {summary['checkpoint']}")
        if not stop.agreed and (warning := shortfall(progress.step, total_steps, progress.lr_max, tc)):
            log.line(f"WARNING {stage}: {warning}")
    return summary


def shortfall(done: int, planned: int | None, lr_max: float, tc: TrainConfig) -> str | None:
    """What a finished run fell short of, in words, with what to change; None when it ran as planned.

    Short of its plan: stopped by train.max_time before the steps that max_steps, max_epochs or
    max_tokens plan. Short of its learning rate: the warm-up in steps (train.warmup_steps) outlasted
    the run, so the rate never reached train.lr (a warm-up in a share of the run, warmup_fraction,
    always ends in time; the decay that follows is by design, not a shortfall)."""
    problems, fixes = [], []
    if planned and done < planned:
        problems.append(f"stopped after {done:,} of {planned:,} planned steps ({done / planned:.0%}): "
                        f"train.max_time={tc.max_time:g} s ran out first")
        fixes.append(f"raise train.max_time to about {tc.max_time * planned / max(1, done):,.0f} s, or plan fewer steps "
                     f"(train.max_steps={done:,})")
    if done and not tc.warmup_fraction and done < tc.warmup_steps:
        problems.append(f"the learning rate rose to {lr_max:.3g}, {lr_max / tc.lr:.0%} of its peak train.lr={tc.lr:g}: "
                        f"the warm-up of {tc.warmup_steps:,} steps outlasted the run")
        fixes.append(f"set train.warmup_fraction=0.05 (a share of the run, whatever the machine's pace) or "
                     f"train.warmup_steps to at most {max(1, done // 10):,} (a tenth of the steps run)")
    if not problems:
        return None
    return "starved run: " + "; ".join(problems) + ". To change: " + "; ".join(fixes) + "."


class StopRequest:
    """SIGTERM or SIGINT during training (preemption, Ctrl-C) asks the loop to stop after the current
    step and save; a second signal stops at once (the last complete checkpoint stays intact). Under
    torchrun the ranks agree at the end of each step, in the one all-reduce that also agrees on the
    step time, so that they all stop at the same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None  # set by the handler, on this rank, at any moment
        self.agreed: int | None = None  # set at the end of a step, the same on every rank
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            self.restore()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.received = signum

    @property
    def name(self) -> str | None:
        return signal.Signals(self.agreed).name if self.agreed else None

    def agree(self, rt: Runtime, *seconds: float) -> list[float]:
        """The slowest rank's figure of each of `seconds` (time limits must end every rank at the same
        step); a signal received by any rank becomes `agreed` on all of them."""
        figures = [*seconds, self.received or 0]
        if rt.distributed:
            both = torch.tensor(figures, dtype=torch.float64, device=rt.device)
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
            figures = both.tolist()
        self.agreed = int(figures[-1]) or None
        return figures[:-1]

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


class Stepper:
    """One optimizer step: grad_accum micro-batches (ranks sync gradients on the last one only), clip, step.

    The loss is the mean over every target token of the global batch (all micro-batches, all
    ranks), so micro-batches and ranks holding fewer SFT answer tokens weigh less, exactly as one
    big batch would. On out-of-memory (one process) the step is redone with every micro-batch run
    in twice as many pieces: the same sequences, the same update, less memory at once.
    """

    def __init__(self, wrapped, model, optimizer, scaler, rt: Runtime, tc: TrainConfig, say: Callable = print,
                 objective: Callable | None = None):
        self.wrapped, self.model, self.optimizer, self.scaler, self.rt, self.tc = wrapped, model, optimizer, scaler, rt, tc
        self.objective = objective or NextTokenLoss()
        self.pieces = 1
        self.say = say

    def __call__(self, batches) -> tuple[float, float, int]:
        """Returns (mean loss, gradient norm, input tokens of all ranks that are not padding); a
        non-finite loss or norm skips the update. Padding is `batches.pad_id` where the loader has one."""
        micro_batches = [batches.next_batch() for _ in range(self.tc.grad_accum)]
        pad_id = getattr(batches, "pad_id", None)
        tokens = sum(int(x.numel() if pad_id is None else (x != pad_id).sum()) for x, _ in micro_batches)
        while True:
            try:
                return self._step(micro_batches, tokens)
            except torch.OutOfMemoryError:
                self.optimizer.zero_grad(set_to_none=True)
                rows = micro_batches[0][0].shape[0]
                if self.rt.distributed or self.pieces >= rows:  # ranks cannot agree on a retry mid-step
                    raise
                self.pieces *= 2
                if self.rt.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.say(f"out of memory: running each micro-batch of {rows} sequences in {self.pieces} pieces "
                         f"of {math.ceil(rows / self.pieces)} (set train.batch_size lower to skip this)")

    def _step(self, micro_batches, tokens: int) -> tuple[float, float, int]:
        rt, tc = self.rt, self.tc
        pieces = [(x, y) for xb, yb in micro_batches
                  for x, y in zip(torch.tensor_split(xb, self.pieces), torch.tensor_split(yb, self.pieces)) if len(x)]
        counts = [self.objective.count(y) for _, y in pieces]
        total = float(sum(counts))
        if rt.distributed:
            global_count = torch.tensor([total, tokens], device=rt.device, dtype=torch.float64)
            dist.all_reduce(global_count)
            total, tokens = global_count[0].item(), int(global_count[1].item())
        loss_sum = torch.zeros((), device=rt.device, dtype=torch.float64)
        for i, ((x, y), count) in enumerate(zip(pieces, counts)):
            x, y = rt.to_device(x), rt.to_device(y)
            sync = i == len(pieces) - 1 or not rt.distributed
            with sync_gradients(self.wrapped, self.model, rt, tc, sync), rt.autocast():
                loss = self.objective(self.wrapped, x, y)  # mean over this piece's targets
            weight = count * rt.world / total  # DDP and FSDP average over ranks: undo it, then weigh by tokens
            self.scaler.scale(loss * weight).backward()
            loss_sum += loss.detach().double() * count
        self.scaler.unscale_(self.optimizer)
        clip = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        grad_norm = local_value(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        if rt.distributed:
            dist.all_reduce(loss_sum)
        loss_value, norm_value = (loss_sum / total).item(), grad_norm.item()  # the one host sync per step
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, norm_value, tokens


def _plain_model(cfg: Config, weights: dict) -> Transformer:
    """A single-process model holding gathered FSDP weights, for the checkpoint writer."""
    plain = Transformer(cfg.model)
    plain.load_state_dict(weights, strict=True)
    return plain


def _restore(ckpt: Path, model, optimizer, scaler, train_batches, rt: Runtime, tc: TrainConfig, tokenizer_dir
             ) -> Progress:
    """Load weights, optimizer, scaler, RNG and data position from a checkpoint."""
    saved, saved_tok, meta = load_checkpoint(ckpt, rt.device, adapters=True)
    if meta.get("lora") != adapter_spec(model):
        raise CheckpointError(f"cannot resume from {ckpt}: its LoRA adapters ({meta.get('lora') or 'none'}) differ from "
                              f"this run's ({adapter_spec(model) or 'none'}); use another --out or set [lora] as it was")
    if saved.cfg != model.cfg:
        changed = {k: (v, getattr(model.cfg, k)) for k, v in dataclasses.asdict(saved.cfg).items() if getattr(model.cfg, k) != v}
        raise CheckpointError(f"cannot resume from {ckpt}: its model differs ({', '.join(f'{k}: {a} then, {b} now' for k, (a, b) in changed.items())}); "
                              "use another --out, or --train.resume=false to start over")
    if saved_tok.fingerprint != Tokenizer.load(tokenizer_dir).fingerprint:
        raise CheckpointError(f"cannot resume from {ckpt}: it was trained with another tokenizer than {tokenizer_dir}")
    state = load_trainer_state(ckpt)
    try:
        load_full_state(model, optimizer, saved.state_dict(), state["optimizer"], rt, tc)
    except ValueError as e:  # torch: another number or size of parameter groups
        raise CheckpointError(f"cannot resume from {ckpt}: its optimizer state does not fit this run's parameter "
                              f"groups ({e}; an older tinylm grouped the embedding with the other matrices); "
                              "use another --out, or --train.resume=false to start over") from e
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if "rng_cuda" in state and rt.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng_cuda"], rt.device)
    trainer = dict(meta["trainer"])
    train_batches.load_state_dict(trainer.pop("data"))
    fields = Progress.__dataclass_fields__
    return Progress(**{k: v for k, v in trainer.items() if k in fields})


def _figures(x: float, digits: int = 4) -> float:
    """x to `digits` significant figures: a tiny model's 0.0019 TFLOP/s keeps its precision, which
    rounding to decimal places would not."""
    return float(f"{x:.{digits}g}")


MAX_NONFINITE_IN_ROW = 5


def _skip_nonfinite(progress: Progress, log, loss_value: float) -> None:
    progress.nonfinite_in_row += 1
    progress.nonfinite_total += 1
    log.line(f"step {progress.step + 1}: non-finite loss {loss_value} or gradient; step skipped "
             f"({progress.nonfinite_in_row} in a row)")
    if progress.nonfinite_in_row >= MAX_NONFINITE_IN_ROW:
        raise FloatingPointError(f"{MAX_NONFINITE_IN_ROW} non-finite steps in a row at step {progress.step}: "
                                 "lower train.lr; the last good checkpoint is kept")


def _eta(progress: Progress, tc: TrainConfig, total_steps: int | None) -> float:
    done = fraction_done(progress, tc, total_steps)
    return progress.elapsed * (1 - done) / done if done > 0 else float("nan")


def estimate_memory(model: Transformer, tc: TrainConfig, rt: Runtime) -> tuple[float, float]:
    """(bytes of weights + gradients + Adam moments, bytes of activations of one micro-batch): rough."""
    c = model.cfg
    states = model.num_params() * 4 + trainable_parameters(model) * (4 + 8)  # fp32 weights; gradients and two fp32 moments of what trains
    if is_sharded(rt, tc):
        states /= rt.world  # each rank keeps its shard (plus one gathered block at a time)
    rows = tc.batch_size * c.max_seq_len
    width = 2 if rt.dtype != torch.float32 else 4
    per_layer = 10 * c.dim + 3 * c.hidden_dim + 2 * c.kv_heads * c.head_dim  # tensors saved for backward
    logits = c.vocab_size * (width + 4 + 4)  # logits, their fp32 copy for the loss, its gradient
    return states, rows * (c.n_layers * per_layer * width + logits)


def _preflight(model: Transformer, rt: Runtime, tokens_per_step: int, total_steps, tc: TrainConfig,
               resume_from, stage: str, peak: tuple[float, str] | None = None) -> str:
    n = model.num_params()
    limit = f"{total_steps} steps" if total_steps else ""
    if tc.max_time:
        limit += (" or " if limit else "") + f"{format_duration(tc.max_time)}"
    states, activations = estimate_memory(model, tc, rt)
    where = f"resuming from {resume_from.name}" if resume_from else "from scratch" if not tc.init_from else f"from {tc.init_from}"
    trainable = trainable_parameters(model)
    adapters = f" | LoRA: {trainable:,} trainable ({100 * trainable / n:.2f}%)" if trainable < n else ""
    return (f"{stage}: {n:,} parameters ({model.num_params(embeddings=False):,} without embeddings){adapters} | "
            f"{rt.device} {str(rt.dtype).replace('torch.', '')} x{rt.world}{f' {tc.parallel} ({dist.get_backend()})' if rt.distributed else ''} | {tokens_per_step:,} tokens/step | "
            f"{limit} | memory ~{states / 2**20:,.0f} MiB weights+optimizer + ~{activations / 2**20:,.0f} MiB "
            f"activations per micro-batch | {where}"
            + (f" | MFU against {peak[0] / 1e12:,.2f} TFLOP/s ({peak[1]})" if peak else ""))


PACE_AFTER = 3  # steps: the first ones include compilation and warm-up


def _decide_compile(progress: Progress, tc: TrainConfig, total_steps: int | None, eager_step_s: float, key: str,
                    rt: Runtime, blocks: int) -> tuple[bool, str]:
    """`train.compile = "auto"`: compile now if it pays back within what is left of the run. `blocks`: the
    transformer blocks to compile in all, for the estimate before a measurement (a step that changes shape
    later, train.short_seq_len, compiles them twice)."""
    remaining = [(total_steps - progress.step) * eager_step_s] if total_steps else []
    if tc.max_time:
        remaining.append(tc.max_time - progress.elapsed)
    left = min(remaining)
    cost = known_cost(key, rt.device, rt.dtype, blocks)
    verdict = "compiling now" if cost.pays(left) else "not compiling"
    return cost.pays(left), (f"compile (auto): {verdict}: {cost.describe()}; about {format_duration(left)} of "
                             f"training left at {eager_step_s:.3f} s/step eager")


def _pace(progress: Progress, tc: TrainConfig, total_steps: int | None, tokens_per_step: int, dt: float) -> str:
    """The time-to-finish estimate, once the first steps have been timed."""
    remaining_steps = (total_steps - progress.step) if total_steps else float("inf")
    seconds = remaining_steps * dt
    if tc.max_time:
        seconds = min(seconds, tc.max_time - progress.elapsed)
    return (f"pace: {tokens_per_step / dt:,.0f} tokens/s ({dt:.2f} s/step) -> about {format_duration(seconds)} "
            f"to finish")
