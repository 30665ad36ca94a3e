"""The run plan: how `tinylm run` spends `run.max_time`, every stage included.

    plan = RunPlan.make(cfg, corpus_bytes(cfg.data.corpus), dpo=False)
    print(plan.table())                # the stages and their budgets, the promised end
    plan.begin("tokenizer")            # each stage as it starts: the one before it is done
    seconds = plan.budget("pretrain")  # a training stage's train.max_time, from the real clock
    plan.finish()                      # the actual seconds beside the planned ones, in plan.json

A stage that does not train gets an estimate from the rates below; the training stages share what
is left, less a safety margin, in the ratio of their own train.max_time settings (a stage that has
none weighs as the mean of those that do). The plan is made again from the real clock as each
training stage starts, so a data stage that ran long shortens training, not the run: what an estimate
gets wrong is only what the stages after the last training stage get wrong. With run.max_time = 0
there is no whole-run limit: the plan only estimates and records, each stage keeps its own limits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import Config, ModelConfig
from .corpus import BUILTIN, corpus_files
from .files import write_json
from .logs import format_duration
from .prepare import has_sources

# Rates measured on the 2-core AMD EPYC with AVX512-BF16 that the cpu-demo preset was tuned on
# (2026-12-01: `tinylm run --config cpu-demo` with short training, the built-in corpus; the tiny preset
# for the fixed costs), taken on the slow side: a slower machine takes longer on the stages that do not
# train, and the margin is for what that adds after the last training stage.
BUILTIN_BYTES = 12.3e6  # UTF-8 bytes of the built-in corpus (its text, not the 39 MB of JSON it comes in)
GZIP_RATIO = 4.0  # text bytes per byte of a .gz corpus file
TOKENIZE_BYTES_PER_S = 3e6  # tokenizer training, and sharding, each: 2.7 s and 2.6 s for the built-in corpus (4.6 MB/s)
CLEAN_BYTES_PER_S = 1e6  # filters, exact and near-duplicate removal
COPY_BYTES_PER_S = 20e6  # collecting local files
NETWORK_S = 2.0  # one collected web page or Wikipedia article (collect.per_host_delay is added)
HF_ROWS_PER_S = 500  # rows streamed from a Hugging Face dataset
SFT_BYTES_PER_S = 0.6e6  # rendering and tokenizing conversations: 15.5 s for the built-in ones (0.8 MB/s)
LOAD_S = 0.5  # loading a checkpoint (weights, tokenizer, hashes checked): 0.2-0.3 s for cpu-demo
FORWARD_TOKEN_S = 2e-5  # evaluation: a token's fixed cost of a forward pass (the tiny preset) ...
FORWARD_PARAMS_PER_S = 7e10  # ... and its cost per weight: cpu-demo's 200 validation windows, 51,200 tokens, took 3.4 s
DECODE_TOKEN_S = 1e-3  # sampling with the KV cache: a token's fixed cost ...
DECODE_PARAMS_PER_S = 1e10  # ... and its cost per weight: cpu-demo's 3 samples of 120 tokens took 0.6 s, loading included
EVAL_TASK_TOKENS = 60  # tokens scored per BLiMP pair or multiple-choice ending
REPORT_S = 3.0  # the report page (plots drawn by matplotlib): 0.6 s for a run with two training stages
TRAIN_SETUP_S = 2.0  # a training stage outside its loop (data, model, optimizer; DPO's reference model): 0.3-0.9 s
MARGIN = 0.03  # of run.max_time, kept for what the estimates miss
# A training stage left with less than min(10% of its planned time, 20 s) trains that long and the run
# ends late; never less than a second (a max_time of 0 would mean no limit at all).
MIN_SHARE, MIN_SECONDS, MIN_FLOOR = 0.1, 20.0, 1.0


@dataclass
class Stage:
    name: str
    planned: float | None  # seconds in the plan (a training stage: max_time and setup); None: unknown (no time limit)
    weight: float = 0.0  # training stages: their share of the training time (their own train.max_time)
    max_time: float | None = None  # training stages: the train.max_time of the plan, then of the stage's start
    actual: float | None = None  # seconds it took

    @property
    def training(self) -> bool:
        return self.weight > 0


def corpus_bytes(paths: list[str]) -> float:
    """Bytes of text in a corpus setting (data.corpus, sft.corpus): file sizes, unpacked .gz estimated."""
    size = BUILTIN_BYTES * paths.count(BUILTIN)
    for f in corpus_files(paths):
        size += f.stat().st_size * (GZIP_RATIO if f.name.endswith(".gz") else 1.0)
    return size


class RunPlan:
    """The stages of one `tinylm run` in order, with their planned and actual seconds."""

    def __init__(self, stages: list[Stage], max_time: float, clock: Callable[[], float] = time.monotonic,
                 say: Callable[[str], None] = print, out_file: Path | None = None, started: float | None = None):
        """`max_time` seconds from `started` (a `clock` reading; default: now); `say` prints, `out_file` is
        plan.json (None: not written)."""
        self.stages, self.max_time, self.clock, self.say, self.out_file = stages, max_time, clock, say, out_file
        self.margin = MARGIN * max_time
        self.started = clock() if started is None else started
        self.started_at = time.time() - (clock() - self.started)  # the same moment on the calendar
        self.deadline = self.started + max_time
        self.current: Stage | None = None
        self.current_since = self.started
        self.took: float | None = None  # seconds the whole run took, once finished
        self.overbooked = False
        if max_time:
            self._split(max_time - self.margin)

    @classmethod
    def make(cls, cfg: Config, data_bytes: float, dpo: bool = False, **kwargs) -> "RunPlan":
        """The plan of `tinylm run` for `cfg` on a pretraining corpus of `data_bytes` bytes of text;
        `kwargs` as the constructor's (clock, say, out_file)."""
        return cls(estimate_stages(cfg, data_bytes, dpo), cfg.run.max_time, **kwargs)

    def _split(self, seconds: float) -> None:
        """Give the training stages `seconds` less the estimates of the others, by weight."""
        training = [s for s in self.stages if s.training]
        left = seconds - sum(s.planned for s in self.stages if not s.training) - TRAIN_SETUP_S * len(training)
        weights = sum(s.weight for s in training)
        for s in training:
            s.max_time = max(0.0, left * s.weight / weights)
            s.planned = s.max_time + TRAIN_SETUP_S
        self.overbooked = left <= 0  # the stages that do not train need the whole run

    def stage(self, name: str) -> Stage:
        found = next((s for s in self.stages if s.name == name), None)
        if found is None:  # a stage the plan did not foresee: it counts, unplanned
            found = Stage(name, 0.0)
            self.stages.append(found)
        return found

    def begin(self, name: str) -> None:
        """Stage `name` starts now; the one before it ends."""
        now = self.clock()
        self._close(now)
        self.current, self.current_since = self.stage(name), now
        self._write()

    def _close(self, now: float) -> None:
        if self.current is not None:
            self.current.actual = (self.current.actual or 0.0) + now - self.current_since
            self.current = None

    def budget(self, name: str) -> float:
        """Seconds of train.max_time for training stage `name`, starting now: the time left until the
        deadline, less the margin, the estimates of the stages after it that do not train and the setup
        of the training stages still to come, times the stage's share of the weight still to come."""
        now, stage = self.clock(), self.stage(name)
        later = self.stages[self.stages.index(stage):]
        training = [s for s in later if s.training]
        others = sum(s.planned for s in later if not s.training) + TRAIN_SETUP_S * len(training)
        left = self.deadline - self.margin - now - others
        seconds = left * stage.weight / sum(s.weight for s in training)
        floor = max(min(MIN_SHARE * (stage.max_time or 0.0), MIN_SECONDS), MIN_FLOOR)
        self.say(f"plan: {name} gets {format_duration(max(seconds, floor))} of training "
                 f"({format_duration(self.deadline - now)} left of the run, ~{format_duration(others)} for what follows"
                 + (f", {stage.weight / sum(s.weight for s in training):.0%} of the rest)" if len(training) > 1 else ")"))
        if seconds < floor:
            self.say(f"WARNING plan: {name} has {format_duration(max(0.0, seconds))} left, less than its minimum; it trains "
                     f"for {format_duration(floor)} and the run will end about {format_duration(floor - seconds)} late")
            seconds = floor
        stage.max_time = seconds
        self._write()
        return seconds

    def resumed(self, name: str, max_time: float, elapsed: float) -> None:
        """Training stage `name` resumes from a checkpoint trained with `max_time` (0: none), `elapsed` of it spent."""
        self.stage(name).max_time = max_time
        if max_time:
            self.say(f"plan: {name} resumes with the train.max_time={format_duration(max_time)} it was trained with "
                     f"(its schedule is in units of it): {format_duration(max(0.0, max_time - elapsed))} left")
        else:
            self.say(f"plan: {name} resumes without a time limit, as it was trained: the run may end late")
        self._write()

    def table(self) -> str:
        """The plan as printed at the start of the run: stage, budget (m:ss), total and the promised end."""
        if self.max_time:
            end = time.strftime("%H:%M:%S", time.localtime(self.started_at + self.max_time))
            head = f"run plan: {_clock(self.max_time)} in all (run.max_time), done by {end}"
        else:
            head = "run plan (no whole-run limit: run.max_time = 0; each stage keeps its own limits)"
        lines = [head]
        for s in self.stages:
            note = ""
            if s.training and s.max_time is not None:
                note = f"  train.max_time {_clock(s.max_time)}" + (f", weight {s.weight:g}" if self.max_time else "")
            lines.append(f"  {s.name:<14}{_clock(s.planned) if s.planned is not None else 'its steps':>10}{note}")
        if self.max_time:
            lines.append(f"  {'margin':<14}{_clock(self.margin):>10}")
            lines.append(f"  {'total':<14}{_clock(self.max_time):>10}")
        if self.overbooked:
            lines.append("WARNING plan: the stages that do not train need the whole run.max_time: the training stages "
                         "will get their minimum and the run will end late")
        return "\n".join(lines)

    def finish(self) -> float:
        """End the last stage; returns the run's wall time (seconds)."""
        now = self.clock()
        self._close(now)
        self._write(now)
        self.took = now - self.started
        return self.took

    def verdict(self) -> str:
        """One line, after finish(): the run's wall time against the plan."""
        wall = self.took
        if not self.max_time:
            return f"run: {format_duration(wall)} (no whole-run limit)"
        late = f", {format_duration(wall - self.max_time)} late" if wall > self.max_time else ""
        return f"run: {format_duration(wall)} of the {format_duration(self.max_time)} planned{late}"

    def to_json(self, now: float | None = None) -> dict:
        now = self.clock() if now is None else now
        return {"max_time": self.max_time, "margin": round(self.margin, 1),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started_at)),
                "elapsed": round(now - self.started, 1),
                "stages": [{"stage": s.name, "planned": _round(s.planned), "actual": _round(s.actual),
                            **({"weight": s.weight, "max_time": _round(s.max_time)} if s.training else {})}
                           for s in self.stages]}

    def _write(self, now: float | None = None) -> None:
        if self.out_file is not None:
            write_json(self.out_file, self.to_json(now))


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def _clock(seconds: float) -> str:
    """m:ss (h:mm:ss from an hour)."""
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# --- the estimates ----------------------------------------------------------------------------------
def estimate_stages(cfg: Config, data_bytes: float, dpo: bool = False) -> list[Stage]:
    """Every stage of `tinylm run` in order: estimated seconds for those that do not train; for the
    training stages their weight (and, without a whole-run limit, their own max_time)."""
    stages = []
    if has_sources(cfg):
        data_bytes = _collected_bytes(cfg)
        stages += [Stage("collect", _collect_seconds(cfg)), Stage("clean", data_bytes / CLEAN_BYTES_PER_S)]
    stages += [Stage("tokenizer", min(data_bytes, cfg.tokenizer.max_train_chars) / TOKENIZE_BYTES_PER_S),
               Stage("shards", data_bytes / TOKENIZE_BYTES_PER_S)]
    vocab = cfg.model.vocab_size or cfg.tokenizer.vocab_size
    params = matmul_params(cfg.model, vocab)
    reply = cfg.sample.max_new_tokens
    after = {"pretrain": [Stage("samples", LOAD_S + _decode_seconds(params, len(cfg.sample.prompts) * reply))]}
    if cfg.sft.corpus:
        after["sft"] = [Stage("demo chat", LOAD_S + _decode_seconds(params, len(cfg.sft.demo) * reply))]
    if dpo:
        after["dpo"] = []
    training = [name for name in ("pretrain", "sft", "dpo") if name in after]
    for name in training:
        tc = cfg.stage_train(name)
        if name != "pretrain":  # conversations or preference pairs, rendered and tokenized
            stages.append(Stage(f"{name} data", LOAD_S + corpus_bytes(getattr(cfg, name).corpus) / SFT_BYTES_PER_S))
        stages.append(Stage(name, (tc.max_time + TRAIN_SETUP_S) if tc.max_time else None, weight=tc.max_time,
                            max_time=tc.max_time or None))
        stages += after[name]
        if cfg.eval.enabled:
            stages.append(Stage(f"eval {name}", _eval_seconds(cfg, params, chats=name != "pretrain")))
    if cfg.eval.enabled:
        stages.append(Stage("report", REPORT_S))
    set_weights = [s.weight for s in stages if s.name in training and s.weight > 0]
    for s in stages:  # a stage without its own max_time weighs as the mean of those that have one
        if s.name in training and not s.weight:
            s.weight = sum(set_weights) / len(set_weights) if set_weights else 1.0
    return stages


def matmul_params(m: ModelConfig, vocab: int) -> int:
    """Weights a token is multiplied by in a forward pass: the blocks' projections and the output head."""
    kv = m.kv_heads * m.head_dim
    return m.n_layers * (2 * m.dim * m.dim + 2 * m.dim * kv + 3 * m.dim * m.hidden_dim) + vocab * m.dim


def _forward_seconds(params: int, tokens: float) -> float:
    return tokens * (FORWARD_TOKEN_S + params / FORWARD_PARAMS_PER_S)


def _decode_seconds(params: int, tokens: float) -> float:
    return tokens * (DECODE_TOKEN_S + params / DECODE_PARAMS_PER_S)


def _eval_seconds(cfg: Config, params: int, chats: bool) -> float:
    """The evaluation of a trained stage: validation windows (and held-out conversations after
    fine-tuning), each of eval.max_items items of up to a context; the BLiMP pairs and multiple-choice
    items (four endings) of the configured task files."""
    items = cfg.eval.max_items or 1000  # 0 = all: a thousand, as a guess
    tokens = items * cfg.model.max_seq_len * (2 if chats else 1)
    tokens += items * EVAL_TASK_TOKENS * (2 * len(cfg.eval.blimp) + 4 * len(cfg.eval.choice))
    return LOAD_S + _forward_seconds(params, tokens)


def _collected_bytes(cfg: Config) -> float:
    c = cfg.collect
    pages = len(c.wikipedia_topics) * c.wikipedia_articles + len(c.urls)
    return (corpus_bytes(c.files + ([BUILTIN] if c.builtin else [])) + len(c.hf_datasets) * c.hf_max_rows * 2000
            + pages * 20_000)  # ~2 kB per dataset row, ~20 kB per page: rough, the plan is redone after it


def _collect_seconds(cfg: Config) -> float:
    c = cfg.collect
    pages = len(c.wikipedia_topics) * (c.wikipedia_articles + 1) + len(c.urls)  # a search per topic, a request per page
    return (corpus_bytes(c.files + ([BUILTIN] if c.builtin else [])) / COPY_BYTES_PER_S
            + len(c.hf_datasets) * c.hf_max_rows / HF_ROWS_PER_S + pages * (NETWORK_S + c.per_host_delay))
