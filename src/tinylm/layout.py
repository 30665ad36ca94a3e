"""The run folder: where `tinylm run` puts each stage, known here and nowhere else.

    RUN/config.toml
    RUN/raw/  clean/  tokenizer/  shards/            the data stages
    RUN/pretrain/checkpoints/step-N/                  a training stage's checkpoints
    RUN/sft/data/  sft/checkpoints/step-N/            fine-tuning: its conversations, its checkpoints
    RUN/dpo/data/  dpo/checkpoints/step-N/            preference alignment (`tinylm run --dpo`): its pairs, its checkpoints
    RUN/plan.json                                     the run plan: each stage's planned and actual seconds
    RUN/samples.json  demo_chat.json  report.html  report.md  report/
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TRAINING_STAGES = ("pretrain", "sft", "dpo")  # in the order they run
FILES = {"config": "config.toml", "plan": "plan.json", "samples": "samples.json", "demo_chat": "demo_chat.json",
         "report_html": "report.html", "report_md": "report.md", "report_images": "report"}


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def __getattr__(self, name: str) -> Path:
        """RUN/<name> for every stage folder (raw, clean, tokenizer, shards, pretrain, sft) and file of `FILES`."""
        if name in ("raw", "clean", "tokenizer", "shards", *TRAINING_STAGES):
            return self.root / name
        if name in FILES:
            return self.root / FILES[name]
        raise AttributeError(name)

    @property
    def sft_data(self) -> Path:
        return sft_data(self.root / "sft")

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
