"""The run folder's layout is known in one module, and what it says matches what a run writes."""

from tinylm.checkpoint import find_checkpoint
from tinylm.layout import RunLayout, checkpoint_name, stage_dir


def test_a_checkpoint_knows_its_stage_and_run(prepared, tmp_path):
    from conftest import tiny_config
    from tinylm.pipeline import pretrain

    run = RunLayout(tmp_path / "run")
    cfg = tiny_config(prepared["cfg"].data.corpus[0], **{"train.max_steps": 2})
    ckpt = find_checkpoint(pretrain(cfg, prepared["shards"], run.pretrain)["checkpoint"])
    assert stage_dir(ckpt) == run.pretrain and RunLayout.of_checkpoint(ckpt) == run
    assert checkpoint_name(ckpt) == "pretrain/step-0000002"
    assert find_checkpoint(run.root) == ckpt  # a run folder leads to its newest stage's checkpoint
    assert RunLayout.of_checkpoint(tmp_path / "elsewhere" / "step-1") is None
