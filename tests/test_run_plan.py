"""The promised time holds: the run plan's arithmetic, a whole `tinylm run` within run.max_time, and a
training stage whose validations and saves count against its train.max_time."""

import json
import re
import time

import pytest

from tinylm.cli import main
from tinylm.config import load_config
from tinylm.plan import BUILTIN_BYTES, MARGIN, MIN_SECONDS, TRAIN_SETUP_S, RunPlan

from conftest import tiny_config


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _plan(overrides: dict | None = None, dpo: bool = False, clock=None, said=None) -> RunPlan:
    cfg = load_config("cpu-demo", {"run.max_time": 900, **(overrides or {})})
    return RunPlan.make(cfg, BUILTIN_BYTES, dpo, clock=clock or Clock(), say=(said if said is not None else []).append)


def _run_through(plan: RunPlan, clock: Clock, first: str, until: str, late: float = 0.0) -> None:
    """Run the stages from `first` up to `until` (not included), each taking the time it was given (the
    first `late` seconds longer)."""
    names = [s.name for s in plan.stages]
    for stage in plan.stages[names.index(first):names.index(until)]:
        plan.begin(stage.name)
        clock.now += (stage.max_time + TRAIN_SETUP_S if stage.training else stage.planned) + late
        late = 0.0


def test_budgets_add_up_to_the_run_less_the_margin():
    plan = _plan()
    names = [s.name for s in plan.stages]
    assert names == ["tokenizer", "shards", "pretrain", "samples", "eval pretrain", "sft data", "sft", "demo chat",
                     "eval sft", "report"]
    assert sum(s.planned for s in plan.stages) == pytest.approx(900 * (1 - MARGIN))
    assert all(s.planned > 0 for s in plan.stages)
    pre, sft = plan.stage("pretrain"), plan.stage("sft")
    assert pre.max_time / sft.max_time == pytest.approx(600 / 240)  # the stages' own max_time are the weights
    table = plan.table()
    assert "15:00" in table and "pretrain" in table and "margin" in table and "done by" in table


def test_shares_follow_the_weights_and_a_stage_without_one_weighs_as_the_mean():
    plan = _plan({"train.max_time": 300, "sft.train.max_time": 100, "dpo.train.max_time": 0}, dpo=True)
    pre, sft, dpo = (plan.stage(n) for n in ("pretrain", "sft", "dpo"))
    assert pre.max_time / sft.max_time == pytest.approx(3.0)
    assert dpo.max_time == pytest.approx((pre.max_time + sft.max_time) / 2)  # weight (300 + 100) / 2 = 200


def test_replanning_gives_what_the_plan_promised_and_less_after_a_slow_stage():
    on_time, slow = Clock(), Clock()
    plans = {clock: _plan(clock=clock) for clock in (on_time, slow)}
    _run_through(plans[on_time], on_time, "tokenizer", "pretrain")
    _run_through(plans[slow], slow, "tokenizer", "pretrain", late=60.0)  # the tokenizer took a minute more
    planned = plans[on_time].stage("pretrain").max_time
    assert plans[on_time].budget("pretrain") == pytest.approx(planned)
    shorter = plans[slow].budget("pretrain")
    assert shorter == pytest.approx(planned - 60.0 * 600 / 840)  # pretraining pays its share of the minute
    # and fine-tuning, after a pretraining that ran exactly its shorter budget, pays the rest
    _run_through(plans[slow], slow, "pretrain", "sft")
    assert plans[slow].budget("sft") == pytest.approx(plans[on_time].stage("sft").max_time - 60.0 * 240 / 840)


def test_a_stage_left_without_time_trains_its_minimum_and_says_the_run_ends_late():
    clock, said = Clock(), []
    plan = _plan(clock=clock, said=said)
    _run_through(plan, clock, "tokenizer", "pretrain", late=900.0)  # past the deadline before pretraining
    assert plan.budget("pretrain") == MIN_SECONDS
    assert any(line.startswith("WARNING plan: pretrain") and "late" in line for line in said)


def test_without_a_run_limit_the_plan_only_records():
    plan = RunPlan.make(load_config("tiny"), 1e6, clock=Clock(), say=lambda text: None)
    assert plan.max_time == 0 and plan.stage("pretrain").planned is None  # tiny trains by steps
    assert "no whole-run limit" in plan.table()


def test_other_verbs_refuse_the_run_section(capsys):
    assert main(["pretrain", "--shards", "x", "--run.max_time=60"]) == 2
    assert "reads only [model], [train]: --run.max_time would do nothing" in capsys.readouterr().err
    assert main(["run", "--config", "tiny", "--run.max_time=-5"]) == 2
    assert "run.max_time" in capsys.readouterr().err


def test_a_whole_run_keeps_to_run_max_time(corpus_file, tmp_path, capsys):
    """Pretraining and fine-tuning limited by time alone: the budget ends them, and the run, every
    stage included, ends within run.max_time."""
    chats = tmp_path / "chats.jsonl"
    turn = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, friend."}]
    chats.write_text("".join(json.dumps({"messages": turn + [{"role": "user", "content": f"n{i}"},
                                                              {"role": "assistant", "content": "ok"}]}) + "\n"
                             for i in range(40)))
    run, max_time = tmp_path / "run", 30.0
    t0 = time.monotonic()
    assert main(["run", "--config", "tiny", "--out", str(run), f"--data.corpus={corpus_file}", "--data.val_fraction=0.1",
                 f"--sft.corpus={chats}", "--sft.val_fraction=0.2", f"--run.max_time={max_time}",
                 "--train.max_steps=0", "--train.max_time=3", "--sft.train.max_steps=0", "--sft.train.max_time=1"]) == 0
    wall = time.monotonic() - t0
    assert wall <= max_time + 3.0
    plan = json.loads((run / "plan.json").read_text())
    stages = {s["stage"]: s for s in plan["stages"]}
    assert plan["max_time"] == max_time and plan["elapsed"] <= wall
    assert {"tokenizer", "shards", "pretrain", "samples", "eval pretrain", "sft data", "sft", "demo chat", "eval sft",
            "report"} == set(stages)
    assert all(s["planned"] is not None and s["actual"] is not None for s in stages.values())
    assert sum(s["actual"] for s in stages.values()) <= plan["elapsed"] + 0.5  # every second in one stage, rounded
    for name in ("pretrain", "sft"):  # trained by time alone, for what the plan gave at its start
        trained = json.loads((run / name / "checkpoints" / _latest(run / name) / "meta.json").read_text())
        given = stages[name]["max_time"]
        assert trained["config"]["train"]["max_time"] == pytest.approx(given, abs=0.06)  # plan.json rounds
        assert trained["trainer"]["elapsed"] + trained["trainer"]["reserve"] >= given - 0.06
    out = capsys.readouterr().out
    assert out.startswith("run plan: 0:30 in all") and "plan: pretrain gets" in out and "plan: sft gets" in out
    assert re.search(r"^run: \d+s of the 30s planned$", out, flags=re.M)  # on time: no ", ... late"


def _latest(stage_dir) -> str:
    return (stage_dir / "checkpoints" / "latest").read_text().strip()


def test_validations_count_against_the_time_limit(prepared, tmp_path):
    """A validation after every step (each several times a step's work: counted apart, they would
    make the stage last four times its limit) and the final save fit in train.max_time, as the steps do."""
    from tinylm.pipeline import pretrain

    max_time = 3.0
    cfg = tiny_config(prepared["cfg"].data.corpus[0], **{"train.max_steps": 0, "train.max_time": max_time,
                                                         "train.eval_every": 1, "train.eval_batches": 20,
                                                         "train.save_every": 0})
    t0 = time.monotonic()
    summary = pretrain(cfg, prepared["shards"], tmp_path)
    wall = time.monotonic() - t0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed"] for r in records if "loss" in r]
    assert all("val_loss" in r for r in records if "loss" in r) and summary["steps"] == len(elapsed) >= 2
    lap = max(b - a for a, b in zip([0.0, *elapsed], elapsed))  # the longest step with its validation
    assert summary["elapsed"] <= max_time + lap + 0.1  # within a lap of its limit (+ the final save, rounding) ...
    # ... its setup on top (model, data; a process's first measures the CPU): a bound of 2.5 s failed once on a
    # busy machine; validations counted apart would add ~9 s, so 5 s still tells them
    assert wall <= max_time + lap + 5.0


def test_a_resumed_stage_keeps_the_max_time_it_was_trained_with(prepared, tmp_path):
    """Its schedule is in units of that max_time; a fresh stage gets its budget from the plan."""
    from tinylm.pipeline import budgeted, pretrain
    from tinylm.train import setup_runtime

    cfg = tiny_config(prepared["cfg"].data.corpus[0], **{"train.max_steps": 3, "train.max_time": 50.0})
    pretrain(cfg, prepared["shards"], tmp_path / "pretrain")  # 3 steps; the 50 s never ran out
    said, rt = [], setup_runtime(cfg.train)
    plan = _plan(said=said)
    resumed = budgeted(plan, "pretrain", cfg.train, tmp_path / "pretrain", rt)
    assert resumed.max_time == 50.0 and any("resumes with the train.max_time=50s" in line for line in said)
    fresh = budgeted(plan, "pretrain", cfg.train, tmp_path / "elsewhere", rt)
    assert fresh.max_time > 60 and any(line.startswith("plan: pretrain gets") for line in said)
