"""The model size for a time budget (`model.size = "auto"`, the default of `tinylm run`).

A fixed budget buys either a small model that sees many tokens or a large one that sees few; the
best is in between, and where depends on how fast this machine trains each size. So before
pretraining starts, `choose_size` times one training step of each candidate of `LADDER` (smallest
first) on this machine, turns the step time into the tokens the budget allows (with the compile
speed-up where `train.compile` would compile), and predicts each candidate's loss from a scaling
law fitted to runs on a 2-core CPU (`scaling.json`, written by `benchmarks/scaling.py`), one law for
each `train.optimizer`, since the optimizer moves the best size (with Muon `s` beats `xs` at ten minutes
of a 2-core bf16 CPU, where the AdamW law ranks `xs` first):

    L(N, D, b) = E + A / N**alpha + B / D'**beta        (Hoffmann et al. 2022, "Chinchilla", approach 3)

N is the parameter count without the token embedding, D' the training tokens, discounted for
repetition when they exceed the unique tokens U of the data (Muennighoff et al. 2023, eq. 5):
D' = U * (1 + R* * (1 - exp(-R / R*))) with R = D / U - 1 repetitions and R* = 15.4,
and then for the batch: a step of b tokens learns what b / (1 + b / B_noise) tokens would in steps
of one token each (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", eq. 2.11:
E = E_min (1 + B / B_noise)), so D' is divided by 1 + b / B_noise. The gradient noise scale B_noise
grows as the loss falls: B_noise(L) = B_* / L**(1 / alpha_B) with Kaplan et al. 2020's alpha_B = 0.21
("Scaling Laws for Neural Language Models", eq. 5.3), or stays constant (exponent 0), whichever fits
better; the prediction solves L = L(N, D, b, B_noise(L)) by iteration. B_* is fitted with the rest;
a law fitted at one batch has none (`noise_scale` 0) and then ranks only sizes.

Candidates are each ladder size at `train.batch_size` and, where the law has a noise scale, at its
half and its quarter: smaller steps cost more time per token but learn more per token, and the
measured pace decides. `train.batch_size` is thus the largest batch tried (what fits in memory).
The candidate with the lowest prediction is trained; a batch other than the one set must be
predicted better by more than the law's RMS error (`error`), so that the fit's noise alone never
moves it. The law was fitted on the built-in corpus with
a 4,096-token vocabulary; on other data its absolute figures differ, and it is the ranking of the
candidates it is used for.

Context: a window of T tokens is scored from position 1 to T, and its first tokens are predicted
from little context. The law's points were trained and validated at one context T0 (`context`); at
another T the law adds the mean excess loss of a window's positions,
C(T) - C(T0) with C(T) = (1/T) sum_{t=1..T} c * t**-gamma, where c * t**-gamma is the excess loss of
the t-th token of a window over a long context's, fitted to a trained model's held-out loss at each
position (`position_scale` c, `position_exponent` gamma; `benchmarks/scaling.py --positions`). Half
of `model.max_seq_len` (the longest context tried) is tried for the chosen size, at twice the batch
so that a step keeps its tokens, when its work per token (`flops_per_token`, an upper bound on the
speed-up) could pay for its excess loss; it is then timed, and like a batch other than the one set,
must be predicted better by more than the law's error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

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
MIN_CONTEXT = 64  # tokens: the shortest context tried


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
    """L(N, D, b) = E + A / N**alpha + B / D'**beta, in nats per token (see the module docstring).
    noise_scale: B_* in tokens, 0 for no batch term; B_noise(L) = noise_scale / L**noise_exponent.
    error: the fit's RMS error in nats, the least gain that moves the batch off `train.batch_size`.
    context, position_scale, position_exponent: the context term (the module docstring); 0, none."""
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    noise_scale: float = 0.0
    noise_exponent: float = 0.0
    error: float = 0.0
    context: int = 0  # T0: the context (tokens) the law's points trained and validated at
    position_scale: float = 0.0  # c: the t-th token of a window loses c * t**-gamma nats more than with long context
    position_exponent: float = 0.0  # gamma

    def loss(self, params: float, tokens: float, unique_tokens: float | None = None,
             tokens_per_step: float | None = None, seq_len: int | None = None) -> float:
        """Predicted loss of `params` (without the token embedding) trained on `tokens` in steps of
        `tokens_per_step` (None: no batch discount), of data holding `unique_tokens`, in windows of
        `seq_len` tokens (None: the law's own context)."""
        return self._data_loss(params, tokens, unique_tokens, tokens_per_step) + self.context_loss(seq_len)

    def context_loss(self, seq_len: int | None) -> float:
        """C(seq_len) - C(context) in nats per token: what windows of `seq_len` tokens lose (or gain,
        when longer) against the law's context; 0 without a context term."""
        if not (seq_len and self.context and self.position_scale):
            return 0.0
        return (window_excess(seq_len, self.position_scale, self.position_exponent)
                - window_excess(self.context, self.position_scale, self.position_exponent))

    def _data_loss(self, params: float, tokens: float, unique_tokens: float | None,
                   tokens_per_step: float | None) -> float:
        seen = effective_tokens(tokens, unique_tokens)
        loss = self.E + self.A / params ** self.alpha + self.B / seen ** self.beta
        if not (self.noise_scale and tokens_per_step):
            return loss
        # L = f(L), f increasing (a higher loss, a smaller noise scale, fewer useful tokens): from the
        # loss without the batch term the iteration rises to the smallest fixed point, or past any bound
        # where there is none (steps this large at this loss make no progress: infinite loss)
        for _ in range(1000):
            factor = batch_factor(tokens_per_step, self.noise(loss))
            new = self.E + self.A / params ** self.alpha + self.B / (seen / factor) ** self.beta
            if new > 100 * (1 + self.E):
                return math.inf
            if abs(new - loss) < 1e-10:
                break
            loss = new
        return new

    def noise(self, loss: float) -> float:
        """B_noise in tokens at this loss (nats per token); 0 without a batch term."""
        return self.noise_scale / max(loss, 1e-3) ** self.noise_exponent

    @classmethod
    def load(cls, optimizer: str, path: Path | None = None) -> "ScalingLaw":
        """The law fitted to runs trained with `optimizer` ("adamw", "muon") in `path` (the shipped
        scaling.json if None). ValueError naming the file if it holds no law for that optimizer."""
        path = path or Path(__file__).with_name("scaling.json")
        laws = json.loads(path.read_text(encoding="utf-8"))["laws"]
        if optimizer not in laws:
            raise ValueError(f"{path} holds scaling laws for {', '.join(sorted(laws))}, not for train.optimizer="
                             f"{optimizer!r}: measure one with benchmarks/scaling.py")
        return cls(**laws[optimizer]["law"])


def effective_tokens(tokens: float, unique_tokens: float | None) -> float:
    """D' of Muennighoff et al. 2023: repeated tokens count less and less (as many as unique at first)."""
    if not unique_tokens or tokens <= unique_tokens:
        return tokens
    repeats = tokens / unique_tokens - 1
    return unique_tokens * (1 + REPEAT_SCALE * (1 - math.exp(-repeats / REPEAT_SCALE)))


def window_excess(seq_len: int, scale: float, exponent: float) -> float:
    """C(T) = (1/T) sum_{t=1..T} scale * t**-exponent: a window's mean excess loss over long context."""
    return scale * sum(t ** -exponent for t in range(1, seq_len + 1)) / seq_len


def fit_positions(losses: Sequence[float]) -> tuple[float, float, float, float]:
    """(c, gamma, l_inf, RMS error) of loss(t) = l_inf + c * t**-gamma fitted by least squares to the
    mean held-out loss at each position t = 1, 2, ... of a window (`evaluate.position_losses`),
    gamma on a grid of 0.05 to 2.0. ValueError if no fit has c > 0 (the loss does not fall with context)."""
    import numpy as np

    y = np.asarray(losses, dtype=np.float64)
    t = np.arange(1, len(y) + 1, dtype=np.float64)
    best = None
    for gamma in np.arange(0.05, 2.001, 0.01):
        X = np.stack([np.ones_like(t), t ** -gamma], axis=1)
        (l_inf, c), *_ = np.linalg.lstsq(X, y, rcond=None)
        rms = float(np.sqrt(np.mean((X @ np.array([l_inf, c]) - y) ** 2)))
        if c > 0 and (best is None or rms < best[3]):
            best = (float(c), round(float(gamma), 2), float(l_inf), rms)
    if best is None:
        raise ValueError("the held-out loss does not fall with the position in the window: no context term fits")
    return best


def batch_factor(tokens_per_step: float | None, noise_scale: float) -> float:
    """1 + b / B_noise: how many more tokens steps of b tokens need than steps of one (McCandlish et
    al. 2018, eq. 2.11); 1 without a batch term or a step size."""
    return 1.0 + tokens_per_step / noise_scale if noise_scale and tokens_per_step else 1.0


NOISE_AT_4_NATS = [0.0] + [2.0 ** (k / 2) for k in range(16, 41)]  # B_noise at a loss of 4 tried by the fit: none, 256 to 1M tokens
NOISE_EXPONENTS = (0.0, round(1 / 0.21, 3))  # constant, or Kaplan et al. 2020's B_crit(L) = B_* / L**(1 / 0.21)


def fit_law(points: list[tuple[float, float, float, float, float]]) -> tuple[ScalingLaw, float]:
    """Least-squares fit of E, A, B for each (alpha, beta, B_noise, its exponent) on a grid, with each
    point's measured loss in its noise scale; returns the best law and its RMS error (of `law.loss`).
    points: (params N, tokens D, unique tokens U, tokens per step b, loss in nats per token). Points
    all at one b get no batch term (noise_scale 0): they cannot tell B_noise apart from B. ValueError if no law
    has E, A and B all >= 0 (the loss cannot fall below zero, nor rise with size or data)."""
    import numpy as np

    n, d, u, b, loss = (np.array(c, dtype=np.float64) for c in zip(*points))
    repeated = np.array([effective_tokens(x, y) for x, y in zip(d, u)])
    best = None
    batched = len(set(b.tolist())) > 1  # a batch term needs points at two batches or more
    for exponent in NOISE_EXPONENTS if batched else (0.0,):
        for at_4 in (NOISE_AT_4_NATS if exponent == 0 else NOISE_AT_4_NATS[1:]) if batched else (0.0,):
            scale = at_4 * 4.0 ** exponent
            d_eff = repeated / np.array([batch_factor(x, scale / y ** exponent) for x, y in zip(b, loss)])
            for alpha in np.arange(0.10, 0.81, 0.02):
                for beta in np.arange(0.10, 0.81, 0.02):
                    X = np.stack([np.ones_like(n), n ** -alpha, d_eff ** -beta], axis=1)
                    coef, *_ = np.linalg.lstsq(X, loss, rcond=None)
                    if min(coef) < 0:
                        continue
                    rms = float(np.sqrt(np.mean((X @ coef - loss) ** 2)))
                    if best is None or rms < best[1] - max(1e-9, 1e-6 * best[1]):  # a noise scale must earn its place
                        best = (ScalingLaw(float(coef[0]), float(coef[1]), float(coef[2]), round(float(alpha), 2),
                                           round(float(beta), 2), scale, exponent if scale else 0.0), rms)
    if best is None:
        raise ValueError("no scaling law with non-negative E, A and B fits these points")
    law = best[0]
    predicted = np.array([law.loss(*p[:4]) for p in points])
    law.error = round(float(np.sqrt(np.mean((predicted - loss) ** 2))), 5)
    return law, law.error


@dataclass
class Candidate:
    name: str
    model: ModelConfig  # model.max_seq_len is the candidate's context
    batch_size: int  # sequences per micro-batch
    params: int  # without the token embedding
    step_s: float  # measured, eager
    tokens: float  # what the budget allows
    compiled: bool
    loss: float  # predicted, nats per token
    flops: float  # training FLOPs per token
    margin: float = 0.0  # added to the loss when ranking: the law's error, for a batch or context other than the one set

    @property
    def score(self) -> float:
        return self.loss + self.margin

    def describe(self, unique_tokens: int) -> str:
        m = self.model
        return (f"{self.name:>3}: dim {m.dim} x {m.n_layers} layers, {self.params / 1e6:.1f}M parameters, "
                f"batch {self.batch_size} x {m.max_seq_len} tokens, {self.step_s:.3f} s/step eager"
                f"{' (compiled faster)' if self.compiled else ''} -> "
                f"{self.tokens / 1e6:.1f}M tokens ({self.tokens / max(1, unique_tokens):.1f} epochs), "
                f"predicted loss {self.loss:.3f}" + (f" (+{self.margin:.3f}, the law's error, to move off the "
                                                     f"batch and context as set)" if self.margin else ""))


WARMUP_STEPS = 3  # untimed: the first steps of a new shape run up to 1.5x slower (size s, bf16 EPYC: 0.62, 0.75, 0.63, then 0.48 s)


def time_step(model: torch.nn.Module, tc: TrainConfig, rt, batch_size: int, seq_len: int, repeats: int = 3) -> float:
    """Seconds of one eager training step (forward, backward, optimizer) at this batch on this machine:
    the fastest of `repeats` after WARMUP_STEPS untimed ones."""
    from .train import build_optimizer

    optimizer = build_optimizer(model, tc, rt.device, sharded=False)
    x = torch.randint(0, model.cfg.vocab_size, (batch_size, seq_len), device=rt.device)
    times = []
    for i in range(WARMUP_STEPS + repeats):
        t0 = time.perf_counter()
        with rt.autocast():
            _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
        if i >= WARMUP_STEPS:
            times.append(time.perf_counter() - t0)
    return min(times)


def batch_choices(batch_size: int, law: ScalingLaw) -> list[int]:
    """The batches tried: `batch_size`, and its half and quarter where the law has a batch term."""
    if not law.noise_scale:
        return [batch_size]
    return sorted({max(1, batch_size // k) for k in (1, 2, 4)}, reverse=True)


def choose_size(model_cfg: ModelConfig, tc: TrainConfig, rt, seq_len: int, budget_s: float, unique_tokens: int,
                tokens_per_step: int, max_tokens: float | None, law: ScalingLaw | None = None,
                say=print) -> Candidate:
    """The ladder size, batch and context with the lowest predicted loss for `budget_s` seconds of
    training on this machine. tokens_per_step: at `tc.batch_size` and `seq_len` (all ranks and
    accumulation included).

    Sizes are timed smallest first at `seq_len`, each at every batch of `batch_choices`; the search
    stops at the first size predicted worse than the best so far (the loss is lowest at one size and
    rises on both sides of it), or that the budget gives fewer than MIN_STEPS steps. Then the chosen
    size is tried at half the context (`context_choices`). max_tokens: what the epoch and token limits
    allow (`tc.max_steps` is applied per batch).
    """
    from .model import Transformer

    if law is None:
        law = ScalingLaw.load(tc.optimizer)
        say(f"size (auto): predicting with the scaling law of {tc.optimizer} runs (scaling.json, RMS error "
            f"{law.error:.3f} nats)")
    best: Candidate | None = None
    t_start = time.perf_counter()
    for name in LADDER:
        cfg = dataclasses.replace(shaped(model_cfg, name), max_seq_len=seq_len)
        torch.manual_seed(0)
        model = Transformer(cfg).to(rt.device)
        flops = model.flops_per_token(seq_len)
        if best is not None:  # the last one's pace, scaled by the work per token, says if this one can make MIN_STEPS
            guess = best.step_s * flops / best.flops
            if budget_s / guess < MIN_STEPS:
                say(f"size (auto): {name} would make only ~{budget_s / guess:.0f} steps in the budget; not tried")
                break
        size_best: Candidate | None = None
        for batch in batch_choices(tc.batch_size, law):
            cand = _candidate(name, model, tc, rt, batch, tokens_per_step * batch // tc.batch_size, budget_s,
                              unique_tokens, max_tokens, law, margin=law.error if batch != tc.batch_size else 0.0)
            say(f"size (auto): {cand.describe(unique_tokens)}")
            if size_best is None or cand.score < size_best.score:
                size_best = cand
        del model
        if best is not None and size_best.score >= best.score:
            break
        best = size_best
    assert best is not None
    for context in context_choices(seq_len, law)[1:]:
        batch = best.batch_size * seq_len // context  # a step keeps its tokens
        model = Transformer(dataclasses.replace(best.model, max_seq_len=context)).to(rt.device)
        bound = _candidate(best.name, model, tc, rt, batch, tokens_per_step * best.batch_size // tc.batch_size,
                           budget_s, unique_tokens, max_tokens, law, margin=law.error,
                           step_s=best.step_s * model.flops_per_token(context) / best.flops)
        if bound.score >= best.score:  # not even at the speed-up its work per token allows
            say(f"size (auto): context {context} would lose {law.context_loss(context):.3f} nats for at most "
                f"{best.flops / bound.flops:.2f}x the pace: not tried")
            continue
        cand = _candidate(best.name, model, tc, rt, batch, tokens_per_step * best.batch_size // tc.batch_size,
                          budget_s, unique_tokens, max_tokens, law, margin=law.error)
        say(f"size (auto): {cand.describe(unique_tokens)}")
        if cand.score < best.score:
            best = cand
    say(f"size (auto): training {best.name} (dim {best.model.dim} x {best.model.n_layers} layers) at batch "
        f"{best.batch_size} x {best.model.max_seq_len} tokens; choosing took {time.perf_counter() - t_start:.0f} s")
    return best


def context_choices(seq_len: int, law: ScalingLaw) -> list[int]:
    """The contexts tried: `seq_len`, and its half where the law has a context term and the half is
    MIN_CONTEXT or more."""
    if not (law.position_scale and law.context) or seq_len // 2 < MIN_CONTEXT:
        return [seq_len]
    return [seq_len, seq_len // 2]


def _candidate(name: str, model, tc: TrainConfig, rt, batch: int, step_tokens: int, budget_s: float,
               unique_tokens: int, max_tokens: float | None, law: ScalingLaw, margin: float,
               step_s: float | None = None) -> Candidate:
    """`model` at `batch` sequences of its context for the budget: its step timed here (or `step_s`),
    compiled where `tc.compile` would, and its loss predicted."""
    from .compiling import choice, known_cost, plan_key

    cfg, seq_len = model.cfg, model.cfg.max_seq_len
    if step_s is None:
        step_s = time_step(model, tc, rt, batch, seq_len) * tc.grad_accum
    cost = known_cost(plan_key(cfg, rt.device, rt.dtype, batch, seq_len), rt.device, rt.dtype, cfg.n_layers)
    compiled = {True: True, False: False, None: cost.pays(budget_s)}[choice(tc.compile)]
    seconds = budget_s - cost.compile_s if compiled else budget_s
    steps = max(0.0, seconds) / (step_s / cost.speedup if compiled else step_s)
    steps = min(steps, tc.max_steps) if tc.max_steps else steps
    tokens = steps * step_tokens if not max_tokens else min(steps * step_tokens, max_tokens)
    return Candidate(name, cfg, batch, model.num_params(embeddings=False), step_s, tokens, compiled,
                     law.loss(model.num_params(embeddings=False), tokens, unique_tokens, step_tokens, seq_len),
                     model.flops_per_token(seq_len), margin=margin)
