"""The model size for a time budget (`model.size = "auto"`, the default of `tinylm run`).

A fixed budget buys either a small model that sees many tokens or a large one that sees few; the
best is in between, and where depends on how fast this machine trains each size. So before
pretraining starts, `choose_size` times one training step of each candidate of `LADDER` (smallest
first) on this machine, turns the step time into the tokens the budget allows (with the compile
speed-up where `train.compile` would compile), and predicts each candidate's loss from a scaling
law fitted to runs on a 2-core CPU (`scaling.json`, written by `benchmarks/scaling.py`):

    L(N, D) = E + A / N**alpha + B / D'**beta        (Hoffmann et al. 2022, "Chinchilla", approach 3)

N is the parameter count without the token embedding, D' the training tokens, discounted for
repetition when they exceed the unique tokens U of the data (Muennighoff et al. 2023, eq. 5):
D' = U * (1 + R* * (1 - exp(-R / R*))) with R = D / U - 1 repetitions and R* = 15.4.
The candidate with the lowest prediction is trained. The law was fitted on the built-in corpus with
a 4,096-token vocabulary; on other data its absolute figures differ, and it is the ranking of the
sizes it is used for. Width and depth are chosen; context (`model.max_seq_len`) and batch
(`train.batch_size`) stay as set.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, ModelConfig, TrainConfig

# name: (dim, n_layers, n_heads, n_kv_heads). Head width 32 up to "m", 64 above; grouped-query
# attention with 2-4 query heads per key/value head, as in the presets.
LADDER: dict[str, tuple[int, int, int, int]] = {
    "xs": (128, 4, 4, 2),
    "s": (192, 6, 6, 3),
    "m": (256, 6, 8, 4),  # cpu-demo's shape before "auto"
    "l": (384, 8, 6, 2),
    "xl": (512, 8, 8, 4),  # gpu-26m's
    "xxl": (768, 12, 12, 4),
}
SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden")
REPEAT_SCALE = 15.4  # R*_D of Muennighoff et al. 2023 (fitted there on 8.7B-token C4 runs)
MIN_STEPS = 50  # a candidate that the budget gives fewer steps than this is not tried


def check_size(model: ModelConfig) -> None:
    """Refuse a shape set beside `model.size`: the size decides it (ConfigError naming the field)."""
    if not model.size:
        return
    if model.size != "auto" and model.size not in LADDER:
        raise ConfigError(f"model.size must be 'auto', one of {', '.join(LADDER)}, or '' (the shape as set), "
                          f"not {model.size!r}")
    default = ModelConfig()
    for name in SHAPE_FIELDS:
        if getattr(model, name) != getattr(default, name):
            raise ConfigError(f"model.{name}={getattr(model, name)} is set beside model.size={model.size!r}, which "
                              f"chooses the shape; add --model.size= (empty) to set the shape yourself")


def shaped(model: ModelConfig, name: str) -> ModelConfig:
    """`model` with the shape of ladder entry `name` and `size` cleared (what a checkpoint records)."""
    dim, n_layers, n_heads, n_kv_heads = LADDER[name]
    return dataclasses.replace(model, size="", dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                               ffn_hidden=0)


def fixed_shape(model: ModelConfig, auto_as: str = "m") -> ModelConfig:
    """The shape without measuring anything: a ladder size applied, "auto" taken as `auto_as` (what the
    benchmarks time, since they compare fixed shapes)."""
    if not model.size:
        return model
    return shaped(model, auto_as if model.size == "auto" else model.size)


@dataclass
class ScalingLaw:
    """L(N, D) = E + A / N**alpha + B / D'**beta, in nats per token (see the module docstring)."""
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, params: float, tokens: float, unique_tokens: float | None = None) -> float:
        return self.E + self.A / params ** self.alpha + self.B / effective_tokens(tokens, unique_tokens) ** self.beta

    @classmethod
    def load(cls, path: Path | None = None) -> "ScalingLaw":
        data = json.loads((path or Path(__file__).with_name("scaling.json")).read_text(encoding="utf-8"))
        return cls(**data["law"])


def effective_tokens(tokens: float, unique_tokens: float | None) -> float:
    """D' of Muennighoff et al. 2023: repeated tokens count less and less (as many as unique at first)."""
    if not unique_tokens or tokens <= unique_tokens:
        return tokens
    repeats = tokens / unique_tokens - 1
    return unique_tokens * (1 + REPEAT_SCALE * (1 - math.exp(-repeats / REPEAT_SCALE)))


def fit_law(points: list[tuple[float, float, float, float]]) -> tuple[ScalingLaw, float]:
    """Least-squares fit of E, A, B for each (alpha, beta) on a grid; returns the best law and its RMS
    error. points: (params N, tokens D, unique tokens U, loss in nats per token)."""
    import numpy as np

    n, d, u, loss = (np.array(c, dtype=np.float64) for c in zip(*points))
    d_eff = np.array([effective_tokens(a, b) for a, b in zip(d, u)])
    best = None
    for alpha in np.arange(0.10, 0.81, 0.02):
        for beta in np.arange(0.10, 0.81, 0.02):
            X = np.stack([np.ones_like(n), n ** -alpha, d_eff ** -beta], axis=1)
            coef, *_ = np.linalg.lstsq(X, loss, rcond=None)
            if coef[1] < 0 or coef[2] < 0:  # a bigger model or more data must not predict a higher loss
                continue
            rms = float(np.sqrt(np.mean((X @ coef - loss) ** 2)))
            if best is None or rms < best[1]:
                best = (ScalingLaw(float(coef[0]), float(coef[1]), float(coef[2]), round(float(alpha), 2),
                                   round(float(beta), 2)), rms)
    if best is None:
        raise ValueError("no scaling law with non-negative terms fits these points")
    return best


@dataclass
class Candidate:
    name: str
    model: ModelConfig
    params: int  # without the token embedding
    step_s: float  # measured, eager
    tokens: float  # what the budget allows
    compiled: bool
    loss: float  # predicted, nats per token
    flops: float  # training FLOPs per token

    def describe(self, unique_tokens: int) -> str:
        m = self.model
        return (f"{self.name:>3}: dim {m.dim} x {m.n_layers} layers, {self.params / 1e6:.1f}M parameters, "
                f"{self.step_s:.3f} s/step eager{' (compiled faster)' if self.compiled else ''} -> "
                f"{self.tokens / 1e6:.1f}M tokens ({self.tokens / max(1, unique_tokens):.1f} epochs), "
                f"predicted loss {self.loss:.3f}")


def time_step(model: torch.nn.Module, tc: TrainConfig, rt, batch_size: int, seq_len: int, repeats: int = 2) -> float:
    """Seconds of one eager training step (forward, backward, optimizer) at this batch on this machine:
    the fastest of `repeats` after one untimed step."""
    from .train import build_optimizer

    optimizer = build_optimizer(model, tc, rt.device, sharded=False)
    x = torch.randint(0, model.cfg.vocab_size, (batch_size, seq_len), device=rt.device)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        with rt.autocast():
            _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
        if i:
            times.append(time.perf_counter() - t0)
    return min(times)


def choose_size(model_cfg: ModelConfig, tc: TrainConfig, rt, seq_len: int, budget_s: float, unique_tokens: int,
                tokens_per_step: int, max_tokens: float | None, law: ScalingLaw | None = None,
                say=print) -> Candidate:
    """The ladder entry with the lowest predicted loss for `budget_s` seconds of training on this machine.

    Candidates are timed smallest first; the search stops at the first one predicted worse than the
    best so far (the loss is lowest at one size and rises on both sides of it), or that the budget
    gives fewer than MIN_STEPS steps. max_tokens: what the other limits allow (epochs, tokens, steps).
    """
    from .compiling import choice, known_cost, plan_key
    from .model import Transformer

    law = law or ScalingLaw.load()
    best: Candidate | None = None
    t_start = time.perf_counter()
    for name in LADDER:
        cfg = shaped(model_cfg, name)
        torch.manual_seed(0)
        model = Transformer(cfg).to(rt.device)
        flops = model.flops_per_token(seq_len)
        if best is not None:  # the last one's pace, scaled by the work per token, says if this one can make MIN_STEPS
            guess = best.step_s * flops / best.flops
            if budget_s / guess < MIN_STEPS:
                say(f"size (auto): {name} would make only ~{budget_s / guess:.0f} steps in the budget; not tried")
                break
        step_s = time_step(model, tc, rt, tc.batch_size, seq_len) * tc.grad_accum
        params = model.num_params(embeddings=False)
        del model
        cost = known_cost(plan_key(cfg, rt.device, rt.dtype, tc.batch_size, seq_len), rt.device, rt.dtype, cfg.n_layers)
        compiled = {True: True, False: False, None: cost.pays(budget_s)}[choice(tc.compile)]
        seconds = budget_s - cost.compile_s if compiled else budget_s
        steps = max(0.0, seconds) / (step_s / cost.speedup if compiled else step_s)
        tokens = steps * tokens_per_step if not max_tokens else min(steps * tokens_per_step, max_tokens)
        cand = Candidate(name, cfg, params, step_s, tokens, compiled, law.loss(params, tokens, unique_tokens), flops)
        say(f"size (auto): {cand.describe(unique_tokens)}")
        if best is not None and cand.loss >= best.loss:
            break
        best = cand
    assert best is not None
    say(f"size (auto): training {best.name} (dim {best.model.dim} x {best.model.n_layers} layers); "
        f"choosing took {time.perf_counter() - t_start:.0f} s")
    return best
