"""Logging for the training loop: one greppable line per step, metrics.jsonl, optional trackers."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from tqdm import tqdm

from .config import TrainConfig


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _si(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


class MetricsLog:
    """Rank 0 writes `train.log` (the lines it prints) and `metrics.jsonl` (one record per logged step)."""

    def __init__(self, out_dir: Path, enabled: bool = True):
        self.enabled = enabled
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(out_dir / "train.log", "a", encoding="utf-8")
            self._metrics = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}"
        tqdm.write(text)
        self._log.write(stamped + "\n")
        self._log.flush()

    def step(self, record: dict, total_steps: int | None, eta: float, show: bool = True) -> None:
        """Append every step to metrics.jsonl; print (and log) it when `show`."""
        if not self.enabled:
            return
        self._metrics.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")
        self._metrics.flush()
        if not show:
            return
        total = f"/{total_steps}" if total_steps else ""
        text = (f"step {record['step']:>6}{total} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                f"gnorm {record['grad_norm']:.3f} | {_si(record['tok_per_s'])} tok/s | "
                + (f"{record['tflops']:.3g} TFLOP/s" if "tflops" in record else "")
                + (f" MFU {record['mfu']:.0%}" if "mfu" in record else "") + f" | eta {format_duration(eta)}")
        if "val_loss" in record:
            text += f" | val {record['val_loss']:.4f}"
            if "val_bpb" in record:
                text += f" ({record['val_bpb']:.3f} bpb)"
        self.line(text)


class Tracker:
    """Optional experiment trackers (wandb, TensorBoard); a no-op when none is configured."""

    def __init__(self, tc: TrainConfig, out_dir: Path, config: dict):
        self._wandb = self._tb = None
        if tc.wandb_project:
            try:
                import wandb
            except ImportError:
                raise ImportError("train.wandb_project is set but wandb is not installed: pip install wandb") from None
            self._wandb = wandb.init(project=tc.wandb_project, config=config, dir=str(out_dir))
        if tc.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("train.tensorboard is set but tensorboard is not installed: pip install tensorboard") from None
            self._tb = SummaryWriter(str(out_dir / "tensorboard"))

    def log(self, record: dict) -> None:
        if self._wandb:
            self._wandb.log(record, step=record["step"])
        if self._tb:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self._wandb:
            self._wandb.finish()
        if self._tb:
            self._tb.close()
