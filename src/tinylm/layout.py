"""The run folder: where `tinylm run` puts each stage, known here and nowhere else.

    RUN/config.toml
    RUN/raw/  clean/  tokenizer/  shards/            the data stages
    RUN/pretrain/checkpoints/step-N/                  a training stage's checkpoints
    RUN/sft/data/  sft/checkpoints/step-N/            fine-tuning: its conversations, its checkpoints
    RUN/samples.json  demo_chat.json  report.html  report.md  report/
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TRAINING_STAGES = ("pretrain", "sft")  # in the order they run


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def __getattr__(self, stage: str) -> Path:
        """RUN/<stage> for every stage folder: raw, clean, tokenizer, shards, pretrain, sft."""
        if stage in ("raw", "clean", "tokenizer", "shards", *TRAINING_STAGES):
            return self.root / stage
        raise AttributeError(stage)

    @property
    def sft_data(self) -> Path:
        return sft_data(self.root / "sft")

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def samples(self) -> Path:
        return self.root / "samples.json"

    @property
    def demo_chat(self) -> Path:
        return self.root / "demo_chat.json"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_images(self) -> Path:
        return self.root / "report"

    @classmethod
    def of_checkpoint(cls, ckpt: Path) -> "RunLayout | None":
        """The run a checkpoint RUN/<stage>/checkpoints/step-N belongs to; None outside a run folder."""
        stage = stage_dir(ckpt)
        return cls(stage.parent) if stage is not None and stage.name in TRAINING_STAGES else None


def stage_dir(ckpt: Path) -> Path | None:
    """The training stage folder of a checkpoint (the --out of `tinylm pretrain` or `tinylm sft`)."""
    ckpt = Path(ckpt)
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def sft_data(sft_stage: Path) -> Path:
    """Where a fine-tuning stage keeps the conversations it trains on (rendered, split, tokenized)."""
    return Path(sft_stage) / "data"


def checkpoint_name(ckpt: Path) -> str:
    """`<stage folder>/<step-N>` ("sft/step-0000420"), the name a checkpoint goes by in a UI or an export."""
    stage = stage_dir(ckpt)
    return f"{stage.name}/{Path(ckpt).name}" if stage is not None else Path(ckpt).name
