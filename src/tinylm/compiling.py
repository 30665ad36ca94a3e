"""Compile the training step only when it pays for itself within the run (`train.compile = "auto"`).

`torch.compile` costs time once (for `cpu-speedrun` on a 2-core bf16 CPU 11-13 s with a warm Inductor
cache, 48-53 s cold; 77 s for `cpu-demo` and 147 s for `gpu-26m` on an AVX2 one) and then makes each
step faster (1.2-1.9x on CPUs, 2x and more on GPUs). In a run of a few minutes the cost can exceed the
gain. "auto" trains the first steps eager, which measures the eager pace, then compiles only if

    compile_s < remaining_s * (1 - 1 / speedup)

that is, if the compiled steps save more time than compiling takes within what is left of the budget.
`compile_s` and `speedup` are this machine's own, measured on an earlier run of the same model shape
and cached in `$XDG_CACHE_HOME/tinylm/compile.json` (`~/.cache/...`); before a first measurement, the
figures of `ESTIMATES` stand in. A run that compiles records what it measured for the next one. A
measurement taken while something else ran on the machine can be far off (1.1x or 3x where 1.9x is
usual), so the cache keeps the last `KEEP_RUNS` and the median decides. Each pace, eager and
compiled, is the median over at least `MIN_TIMED_S` of steps: a handful of 0.03-s steps is noise.
"""

from __future__ import annotations

import json
import os
import platform
from statistics import median
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .files import hash_json, write_json

# Before this machine has measured its own: seconds to compile per transformer block and the step
# speed-up, by device and CPU precision. The machine that has measured nothing has an empty Inductor
# cache too, and compiles cold: bf16, xs (4 blocks) 34 and 46 s on a 2-core EPYC, 52 and 53 s on a
# 2-core Xeon, s (6 blocks) 60 s on the Xeon (2026-12-01/02; a warm cache: 13 s); the ladder sizes
# xs to l at 16 x 256 tokens, 18 compiles: median 1.89x, from 1.13 to 3.02x. AVX2 fp32: cpu-demo 77 s
# for 6 blocks, 1.18x. An H200: gpu-26m 30 s for 8, 2x.
ESTIMATES = {("cpu", "bf16"): (10.0, 1.85), ("cpu", "fp32"): (13.0, 1.18), ("cuda", ""): (4.0, 2.0), ("mps", ""): (10.0, 1.2)}
MIN_SPEEDUP = 1.02  # a compiled step measured slower than this is not worth compiling again
KEEP_RUNS = 5  # measurements kept per shape; their median is used
# a pace is the median of at least this many seconds of steps: five steps of xs at batch 4 (~0.03 s each)
# gave speed-ups of 1.11x to 1.71x for the same shape on the same machine
MIN_TIMED_S = 1.0


def choice(setting: str) -> bool | None:
    """`train.compile` as True, False, or None for "auto" (decided while training)."""
    return {"true": True, "false": False, "auto": None}[setting]


def cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tinylm" / "compile.json"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def plan_key(model_cfg, device: torch.device, dtype: torch.dtype, batch_size: int, seq_len: int,
             then: tuple[int, int] | None = None) -> str:
    """What a compile time and speed-up depend on: torch, the device, the dtype, the model, the batch
    (sequences x tokens) and, for a step that changes shape later (`train.short_seq_len`), the batch
    `then`, whose compile is part of the cost."""
    return hash_json({"torch": torch.__version__, "device": device_name(device), "threads": torch.get_num_threads(),
                      "dtype": str(dtype), "model": asdict(model_cfg),
                      "batch": [batch_size, seq_len] + (list(then) if then else [])})


@dataclass
class CompileCost:
    compile_s: float
    speedup: float
    measured: bool  # False: the ESTIMATES stand-in

    def pays(self, remaining_s: float) -> bool:
        return self.speedup >= MIN_SPEEDUP and self.compile_s < remaining_s * (1 - 1 / self.speedup)

    def describe(self) -> str:
        where = "measured here" if self.measured else "estimated: not yet measured on this machine"
        return f"{self.compile_s:.0f} s to compile, steps {self.speedup:.2f}x faster ({where})"


def known_cost(key: str, device: torch.device, dtype: torch.dtype, n_layers: int) -> CompileCost:
    """This machine's measured cost for `key` (the median of its last runs), or the ESTIMATES stand-in
    for `n_layers` blocks."""
    try:
        entry = json.loads(cache_file().read_text(encoding="utf-8"))[key]
        return CompileCost(float(entry["compile_s"]), float(entry["speedup"]), True)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    kind = ("bf16" if dtype in (torch.bfloat16, torch.float16) else "fp32") if device.type == "cpu" else ""
    per_layer, speedup = ESTIMATES.get((device.type, kind), ESTIMATES[("cpu", "fp32")])
    return CompileCost(per_layer * n_layers, speedup, False)


def record_cost(key: str, compile_s: float, speedup: float) -> None:
    """Add this run's measurement to the machine's last KEEP_RUNS for this shape, whose medians later
    runs use (best effort: a read-only home is no error)."""
    path = cache_file()
    try:
        cache = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        cache = {}
    old = cache.get(key) if isinstance(cache.get(key), dict) else {}
    if "runs" not in old and "speedup" in old:  # written before the history was kept: one run
        old = {"runs": [[old.get("compile_s", 0.0), old["speedup"]]]}
    runs = [r for r in old.get("runs", []) if isinstance(r, list) and len(r) == 2][-(KEEP_RUNS - 1):]
    runs.append([round(compile_s, 1), round(speedup, 3)])
    cache[key] = {"compile_s": round(median(r[0] for r in runs), 1), "speedup": round(median(r[1] for r in runs), 3),
                  "runs": runs}
    try:
        write_json(path, cache)
    except OSError:
        pass


def settled_pace(step_times: list[float], min_steps: int) -> float | None:
    """The median of `step_times` (seconds) once there are `min_steps` of them covering MIN_TIMED_S
    in all; None before."""
    if len(step_times) < min_steps or sum(step_times) < MIN_TIMED_S:
        return None
    return median(step_times)


class CompileTimer:
    """Measures a compile switched on mid-run: the first compiled step's extra time, then the pace
    (`settled_pace` of the compiled steps after it, against the eager one). A step that changes shape
    later in the run (`train.short_seq_len`) compiles again then: with `reshapes`, the record waits for
    `reshaped()` and the next compile's time, so the cost remembered is every compile the run makes
    (the speed-up is the first shape's)."""

    def __init__(self, eager_step_s: float, key: str, steps: int = 5, reshapes: int = 0):
        self.eager_step_s, self.key, self.steps, self.reshapes = eager_step_s, key, steps, reshapes
        self.times: list[float] = []
        self.compile_s = 0.0
        self.speedup: float | None = None  # once measured
        self.waiting = False  # a shape measured, the next compile still to come
        self.done = False  # recorded, or given up

    def reshaped(self) -> None:
        """The step's shape changed: the next step compiles anew (before a first measurement: given up)."""
        self.done = self.done or self.speedup is None
        self.times, self.waiting = [], False

    def step(self, dt: float) -> str | None:
        """Feed each compiled step's time; returns a log line once a shape's compile is measured."""
        if self.waiting or self.done:
            return None
        self.times.append(dt)
        pace = settled_pace(self.times[1:], self.steps)
        if pace is None:
            return None
        took = max(0.0, self.times[0] - pace)
        self.compile_s += took
        if self.speedup is None:
            self.speedup = self.eager_step_s / pace
            said = (f"compile: took {took:.0f} s; steps {self.speedup:.2f}x faster ({self.eager_step_s:.3f} -> "
                    f"{pace:.3f} s)")
        else:
            said = f"compile: the new shape took {took:.0f} s ({pace:.3f} s a step)"
        if self.reshapes and self.speedup >= 1:
            self.reshapes -= 1
            self.waiting = True
            return said + "; the step changes shape later and compiles again"
        record_cost(self.key, self.compile_s, self.speedup)
        self.done = True
        return (said + f"; remembered in {cache_file()} for the next run"
                + ("; slower than eager here: training on eagerly" if self.speedup < 1 else ""))
