"""The training stages and the one command that chains every stage.

    [raw/ -> clean/ ->] tokenizer/ -> shards/ -> pretrain/checkpoints/ -> samples
                        conversations -> sft/data/ -> sft/checkpoints/ -> demo chat

Every stage writes its outputs with a `meta.json` that records an `inputs_hash` (what the stage
read and the settings it used). `tinylm run` skips a stage whose hash is unchanged, resumes a
training stage from its newest checkpoint, and redoes anything half-written. With run.max_time set,
it keeps to that time, every stage included (plan.py: the budgets, RUN/plan.json).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from .config import Config, ConfigError, TrainConfig, to_toml
from .corpus import SPLIT_KEYS, corpus_files, files_fingerprint, load_split_keys
from .data import GrowingBatches, PackedBatches
from .files import claimed_folder, hash_json, output_lock, read_json, sha256_file, write_json, write_text
from .layout import RunLayout, sft_data
from .plan import RunPlan, corpus_bytes
from .prepare import _fresh, has_sources, prepare_data, say
from .conversations import SFTBatches, SFTRows, build_sft_shards, held_out_summary, read_conversations
from .shards import load_split
from .tokenizer import Tokenizer
from .train import Runtime, setup_runtime, train

# Validation batches come in one fixed shuffled order: every validation of a run scores the same
# sample, spread over the whole held-out split rather than its first rows (documents in file
# order would make that sample the first few sources only).
VAL_SEED = 1234


# --- pretraining -----------------------------------------------------------------------------------
def pretrain(cfg: Config, shards_dir: str | Path, out_dir: str | Path, rt: Runtime | None = None,
             tokenizer_dir: str | Path | None = None) -> dict:
    """Train on the token shards; resumes from out_dir's newest checkpoint when there is one."""
    shards_dir = Path(shards_dir)
    rt = rt or setup_runtime(cfg.train)
    meta = read_json(shards_dir / "meta.json")
    tokenizer_dir = Path(tokenizer_dir or meta["tokenizer_dir"])
    tok = Tokenizer.load(tokenizer_dir)
    if tok.fingerprint != meta["tokenizer_fingerprint"]:
        raise ValueError(f"{shards_dir} was made with another tokenizer than {tokenizer_dir}")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or tok.vocab_size))
    if cfg.model.vocab_size < tok.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
    tc, seq = cfg.train, cfg.model.max_seq_len
    val_tokens = tc.batch_size * seq  # a validation batch's, as set, whatever batch and context model.size = "auto" trains at
    train_arrays, train_info = load_split(shards_dir, "train")
    if cfg.model.size:
        model_cfg, batch_size, choosing_s = model_for_budget(cfg, Path(out_dir), rt, train_info["tokens"])
        tc = dataclasses.replace(tc, batch_size=batch_size)
        if choosing_s:  # choosing is part of the stage's time
            tc = dataclasses.replace(tc, max_time=max(1.0, round(tc.max_time - choosing_s, 1)))
        cfg = dataclasses.replace(cfg, model=model_cfg, train=tc)
        seq = model_cfg.max_seq_len
    val_batch = max(1, val_tokens // seq)
    if tc.short_seq_len:  # a short context first, then the full one (sequence-length warm-up)
        if seq % tc.short_seq_len or tc.short_seq_len >= seq:
            raise ConfigError(f"train.short_seq_len={tc.short_seq_len} must be shorter than the model's context of "
                              f"{seq} tokens and divide it")
        batches = GrowingBatches(train_arrays, tc.short_seq_len, seq, tc.batch_size, tc.seed, rt.rank, rt.world)
    else:
        batches = PackedBatches(train_arrays, seq, tc.batch_size, tc.seed, rt.rank, rt.world)
    val_arrays, val_info = load_split(shards_dir, "val")
    bpt = None
    # Validation never recuts: every full window, each scored at most once. Its batches are counted
    # from the loader itself, so the count and the windows it hands out cannot disagree.
    make_val = lambda: PackedBatches(val_arrays, seq, val_batch, VAL_SEED, rt.rank, rt.world, recut=False)  # noqa: E731
    try:
        n_val = min(tc.eval_batches, make_val().steps_per_epoch)
    except ValueError:  # fewer full windows than one validation batch
        make_val = None
        if rt.is_main:
            say(f"pretrain: validation split too small for one batch ({val_info['tokens']} tokens): no validation loss")
    else:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(tc, eval_batches=n_val))
        bpt = val_info["bytes"] / val_info["tokens"]
    return train(cfg, out_dir, rt, batches, make_val, tokenizer_dir, bytes_per_token=bpt, stage="pretrain")


def model_for_budget(cfg: Config, out_dir: Path, rt: Runtime, unique_tokens: int):
    """(model shape, train.batch_size, seconds spent choosing) for `model.size`: a ladder entry at the
    batch and context as set, or for "auto" the shape, context and batch with the lowest predicted loss
    in train.max_time on this machine (sizing.py; the same on every rank). A resumed run keeps its
    checkpoint's shape, context and batch."""
    from . import sizing
    from .checkpoint import checkpoint_config, checkpoint_model_config, latest_checkpoint

    size, tc = cfg.model.size, cfg.train
    if size in sizing.LADDER:
        return sizing.shaped(cfg.model, size), tc.batch_size, 0.0
    if not tc.max_time:
        raise ConfigError("model.size = 'auto' chooses the model for a time budget: set train.max_time "
                          "(or a ladder size such as --model.size=m)")
    previous = latest_checkpoint(out_dir) if tc.resume else None
    if previous is not None:
        return checkpoint_model_config(previous), checkpoint_config(previous).train.batch_size, 0.0
    t0 = time.perf_counter()
    name = [None, tc.batch_size, 0.0, cfg.model.max_seq_len]
    if rt.is_main:
        tokens_per_step = tc.batch_size * tc.grad_accum * cfg.model.max_seq_len * rt.world
        limits = [tc.max_epochs * unique_tokens if tc.max_epochs else 0, tc.max_tokens]
        chosen = sizing.choose_size(cfg.model, tc, rt, cfg.model.max_seq_len, tc.max_time, unique_tokens,
                                    tokens_per_step, min([x for x in limits if x], default=None), say=say)
        name = [chosen.name, chosen.batch_size, time.perf_counter() - t0, chosen.model.max_seq_len]
    if rt.distributed:  # every rank trains what rank 0 measured, for as long
        dist.broadcast_object_list(name, src=0)
    return dataclasses.replace(sizing.shaped(cfg.model, name[0]), max_seq_len=name[3]), name[1], name[2]


# --- supervised fine-tuning ----------------------------------------------------------------------
def pretraining_shards(checkpoint: Path) -> Path | None:
    """The shard folder a pretrained checkpoint learned from: its run's shards/, if it is in a run folder."""
    run = RunLayout.of_checkpoint(checkpoint)
    return run.shards if run is not None and (run.shards / SPLIT_KEYS).is_file() else None


def sft_data_stage(cfg: Config, checkpoint: Path, out_dir: Path, progress: bool = True,
                   pretraining: Path | None = None) -> Path:
    """Tokenize cfg.sft.corpus with the checkpoint's tokenizer into SFT shards (skipped when up to date).

    A conversation that is also a pretraining document of `pretraining` (a shard folder; by default
    the checkpoint run's) keeps the split it had there: held out in both stages or in neither."""
    from .checkpoint import checkpoint_model_config

    tok = Tokenizer.load(checkpoint)
    max_tokens = checkpoint_model_config(checkpoint).max_seq_len + 1  # inputs and shifted targets
    pretraining = pretraining or pretraining_shards(checkpoint)
    inputs_hash = hash_json({"corpus": files_fingerprint(cfg.sft.corpus), "val_fraction": cfg.sft.val_fraction,
                             "tokenizer": tok.fingerprint, "max_tokens": max_tokens,
                             "pretraining_split": sha256_file(pretraining / SPLIT_KEYS) if pretraining else None})
    if _fresh(out_dir, inputs_hash):
        say(f"sft data: up to date in {out_dir}")
        return out_dir
    say(f"sft data: rendering conversations from {', '.join(cfg.sft.corpus)}")
    meta = build_sft_shards(read_conversations(cfg.sft.corpus), tok, out_dir, max_tokens, cfg.sft.val_fraction,
                            extra_meta={"inputs_hash": inputs_hash, "config": dataclasses.asdict(cfg.sft),
                                        "pretraining_shards": str(pretraining) if pretraining else None},
                            pretraining=load_split_keys(pretraining) if pretraining else None)
    for split, st in meta["splits"].items():
        say(f"sft data: {split} {st['conversations']:,} conversations -> {st['rows']:,} rows "
            f"({st['split']} split to fit the context, {st['truncated']} cut, {st['dropped']} without answers dropped), "
            f"{st['assistant_tokens']:,} assistant tokens")
    say(f"sft data: {held_out_summary(meta)}")
    return out_dir


def sft(cfg: Config, init_checkpoint: str | Path, out_dir: str | Path, rt: Runtime | None = None,
        plan: RunPlan | None = None) -> dict:
    """Fine-tune a checkpoint on conversations with the same training loop; resumes like pretraining.
    Within `tinylm run`, `plan` times the stage and gives it its max_time."""
    from .checkpoint import find_checkpoint

    init_checkpoint, out_dir = find_checkpoint(init_checkpoint), Path(out_dir)
    rt = rt or setup_runtime(cfg.stage_train("sft"))
    data_dir = sft_data(out_dir)
    cfg = fine_tuning_start(cfg, "sft", init_checkpoint, out_dir, rt,
                            lambda: sft_data_stage(cfg, init_checkpoint, data_dir), plan)
    tc, tok = cfg.train, Tokenizer.load(init_checkpoint)
    seq, batch = cfg.model.max_seq_len, tc.batch_size
    batches = SFTBatches(SFTRows.load(data_dir, "train"), seq, batch, tok.pad_id, tc.seed, rt.rank, rt.world)
    val_rows = SFTRows.load(data_dir, "val")
    make_val = None
    if len(val_rows) >= rt.world * batch:
        n_val = min(tc.eval_batches, len(val_rows) // (rt.world * batch))
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(tc, eval_batches=n_val))
        make_val = lambda: SFTBatches(val_rows, seq, batch, tok.pad_id, VAL_SEED, rt.rank, rt.world)  # noqa: E731
    elif rt.is_main:
        say(f"sft: only {len(val_rows)} held-out conversation rows: no validation loss")
    return train(cfg, out_dir, rt, batches, make_val, init_checkpoint, stage="sft")


def fine_tuning_start(cfg: Config, stage: str, init_checkpoint: Path, out_dir: Path, rt: Runtime,
                      build_data: Callable[[], object], plan: RunPlan | None = None) -> Config:
    """What every fine-tuning stage (SFT, DPO) does before training: claim its folder (before its data
    goes in), set aside checkpoints fine-tuned from another base, build its data on rank 0 while the
    others wait; returns the config it trains with (the base's model, the stage's [STAGE.train], with
    the max_time the run plan gives it once its data is built)."""
    from .checkpoint import checkpoint_model_config

    if plan is not None:
        plan.begin(f"{stage} data")
    if rt.is_main:
        with claimed_folder(out_dir, stage, inputs=(init_checkpoint,), legacy=("checkpoints",)):
            _set_aside_if_base_changed(out_dir, init_checkpoint)
            build_data()
    if rt.distributed:
        dist.barrier()
    tc = dataclasses.replace(cfg.stage_train(stage), init_from=str(init_checkpoint))
    tc = budgeted(plan, stage, tc, out_dir, rt)
    return dataclasses.replace(cfg, model=checkpoint_model_config(init_checkpoint), train=tc)


def budgeted(plan: RunPlan | None, stage: str, tc: TrainConfig, out_dir: Path, rt: Runtime) -> TrainConfig:
    """The training stage's settings with the max_time the run plan gives it now, from the real clock
    (the same on every rank); unchanged without a whole-run limit (run.max_time = 0).

    A stage that resumes keeps the max_time its checkpoint was trained with: train._restore takes the
    step and the elapsed time from the checkpoint but max_time from the config, and the learning-rate
    schedule is in units of max_time, so another value would move the run to another point of it."""
    from .checkpoint import latest_checkpoint, read_meta

    if plan is None:
        return tc
    plan.begin(stage)
    if not plan.max_time:
        return tc
    seconds = 0.0
    if rt.is_main:
        ckpt = latest_checkpoint(out_dir) if tc.resume else None
        if ckpt is None:
            seconds = plan.budget(stage)
        else:
            meta = read_meta(ckpt)
            seconds = float(meta["config"]["train"]["max_time"])
            plan.resumed(stage, seconds, meta["trainer"]["elapsed"])
    if rt.distributed:
        agreed = torch.tensor([seconds], dtype=torch.float64, device=rt.device)
        dist.broadcast(agreed, src=0)
        seconds = agreed.item()
    return dataclasses.replace(tc, max_time=seconds)


def _set_aside_if_base_changed(out_dir: Path, init_checkpoint: Path) -> None:
    """SFT checkpoints fine-tuned from another base are moved to checkpoints.superseded/, not resumed."""
    from .checkpoint import checkpoint_config, latest_checkpoint

    previous = latest_checkpoint(out_dir)
    if previous is None:
        return
    base = checkpoint_config(previous).train.init_from
    if Path(base).resolve() != init_checkpoint.resolve():
        aside = out_dir / "checkpoints.superseded"
        if aside.exists():
            shutil.rmtree(aside)
        (out_dir / "checkpoints").rename(aside)
        say(f"sft: the base model changed ({base} -> {init_checkpoint}); fine-tuning starts over "
            f"(the old checkpoints are in {aside})")


# --- samples and the whole run -------------------------------------------------------------------
def print_samples(checkpoint: str | Path, cfg: Config, out_file: Path | None = None) -> list[dict]:
    from .api import load

    lm = load(checkpoint, device=cfg.train.device)
    samples = []
    for prompt in cfg.sample.prompts:
        text = lm.generate(prompt, **{k: v for k, v in dataclasses.asdict(cfg.sample).items() if k != "prompts"})
        samples.append({"prompt": prompt, "completion": text})
        say(f"\n>>> {prompt}{text}")
    if out_file:
        write_json(out_file, {"checkpoint": str(checkpoint), "sample": dataclasses.asdict(cfg.sample), "samples": samples})
    return samples


def run(cfg: Config, run_dir: str | Path, progress: bool = True, dpo: bool = False,
        started: float | None = None) -> dict:
    """[collect -> clean ->] tokenizer -> shards -> pretrain -> samples -> SFT -> demo chat [-> DPO] under run_dir.

    Up-to-date stages are skipped; training stages resume from their newest checkpoint. run.max_time
    counts from `started` (a time.monotonic() reading: the command's start) or from now.
    """
    run_dir = Path(run_dir)
    runtime_fields = ("device", "dtype", "deterministic", "parallel")
    differ = [f for f in runtime_fields if cfg.sft.corpus and cfg.sft.train.get(f, getattr(cfg.train, f)) != getattr(cfg.train, f)]
    if differ:  # one process, one runtime: both stages run on what it was set up for
        raise ConfigError(f"sft.train.{differ[0]} differs from train.{differ[0]}: `tinylm run` runs both stages on one "
                          f"runtime ({', '.join(runtime_fields)}); fine-tune apart with `tinylm sft` to change it")
    differ = [f"dpo.train.{f}" for f in runtime_fields if dpo and cfg.dpo.train.get(f, getattr(cfg.train, f)) != getattr(cfg.train, f)]
    if differ:
        raise ConfigError(f"{differ[0]} differs from train: `tinylm run` runs every stage on one runtime; align apart with `tinylm dpo`")
    check_inputs(cfg, dpo)  # every file the run will read, before its first stage
    rt = setup_runtime(cfg.train)
    if not rt.is_main:
        return _run(cfg, run_dir, rt, progress, dpo, started)
    with output_lock(run_dir), claimed_folder(run_dir, "run", legacy=("config.toml", "tokenizer")):
        return _run(cfg, run_dir, rt, progress, dpo, started)


def check_inputs(cfg: Config, dpo: bool = False) -> None:
    """Raise (CorpusError or ConfigError, naming the setting) for any input of a run that is missing or
    unreadable, so that a wrong path stops the run before its first stage, not after pretraining."""
    from .corpus import CorpusError

    data = [] if has_sources(cfg) else cfg.data.corpus  # collected sources replace data.corpus
    for setting, paths in (("data.corpus", data), ("sft.corpus", cfg.sft.corpus), ("dpo.corpus", cfg.dpo.corpus if dpo else []),
                           ("collect.files", cfg.collect.files), ("eval.blimp", cfg.eval.blimp)):
        try:
            corpus_files(paths)
        except CorpusError as e:
            raise CorpusError(f"{setting}: {e}") from None
    for spec in cfg.eval.choice:  # a local file, or a Hugging Face dataset name
        if spec.endswith((".jsonl", ".json")) and not Path(spec).is_file():
            raise ConfigError(f"eval.choice: {spec}: no such file")


def _run(cfg: Config, run_dir: Path, rt: Runtime, progress: bool, dpo: bool = False,
         started: float | None = None) -> dict:
    """The plan first (printed, and into RUN/plan.json), then every stage; the actual seconds of each
    stage go into plan.json beside the planned ones, and one line compares the run's wall time with the plan."""
    run_ = RunLayout(run_dir)
    data_bytes = corpus_bytes([] if has_sources(cfg) else cfg.data.corpus)
    plan = RunPlan.make(cfg, data_bytes, dpo, say=say if rt.is_main else lambda text: None,
                        out_file=run_.plan if rt.is_main else None, started=started)
    if rt.is_main:
        write_text(run_.config, to_toml(cfg))
        say(plan.table())
    try:
        summary = _stages(cfg, run_, rt, progress, dpo, plan)
    finally:
        plan.finish()
    if rt.is_main and not summary["stopped_by"]:
        say(plan.verdict())
        say(_next_steps(run_dir, summary))
    return summary


def _stages(cfg: Config, run_: RunLayout, rt: Runtime, progress: bool, dpo: bool, plan: RunPlan) -> dict:
    if rt.is_main:
        prepare_data(cfg, run_.root, progress=progress, begin=plan.begin)
    if rt.distributed:
        dist.barrier()  # other ranks wait for the data
    budget = dataclasses.replace(cfg, train=budgeted(plan, "pretrain", cfg.train, run_.pretrain, rt))
    summary = pretrain(budget, run_.shards, run_.pretrain, rt, run_.tokenizer)
    if summary["stopped_by"]:
        return summary  # preempted: the next `tinylm run` resumes here
    if rt.is_main:
        plan.begin("samples")
        print_samples(summary["checkpoint"], cfg, run_.samples)
        _evaluate(plan, "pretrain", summary["checkpoint"], cfg)
    if cfg.sft.corpus:
        summary = sft(cfg, summary["checkpoint"], run_.sft, rt, plan)
        if summary["stopped_by"]:
            return summary
        if rt.is_main:
            plan.begin("demo chat")
            demo_exchange(summary["checkpoint"], cfg, run_.demo_chat)
            _evaluate(plan, "sft", summary["checkpoint"], cfg)
    if dpo:
        from .dpo import dpo as align

        summary = align(cfg, summary["checkpoint"], run_.dpo, rt, plan)
        if summary["stopped_by"]:
            return summary
        if rt.is_main:
            _evaluate(plan, "dpo", summary["checkpoint"], cfg)
    if rt.is_main and cfg.eval.enabled:
        from .report import write_report

        plan.begin("report")
        html_path, _ = write_report(run_.root)
        say(f"\nreport: {html_path} (and report.md beside it)")
    return summary


def _evaluate(plan: RunPlan, stage: str, checkpoint: str | Path, cfg: Config) -> None:
    if cfg.eval.enabled:
        plan.begin(f"eval {stage}")
        evaluate_stage(checkpoint, cfg)


def evaluate_stage(checkpoint: str | Path, cfg: Config) -> dict:
    """The run's own evaluation of a trained stage: validation bits/byte (and held-out chat loss after
    SFT) plus the configured task files, each bounded by eval.max_items; into CKPT/eval.json."""
    if not cfg.eval.enabled:
        return {}
    from .evaluate import evaluate_checkpoint, format_score, score_table

    results = evaluate_checkpoint(checkpoint, blimp=cfg.eval.blimp, choice=cfg.eval.choice,
                                  max_items=cfg.eval.max_items, defaults=True, device=cfg.train.device)
    for row in score_table(results):
        say(f"eval: {format_score(row)}")
    return results


def demo_exchange(checkpoint: str | Path, cfg: Config, out_file: Path | None = None) -> list[dict]:
    """A short conversation with the fine-tuned model: each demo message in turn, history kept."""
    from .api import load

    lm = load(checkpoint, device=cfg.train.device)
    sampling = {k: v for k, v in dataclasses.asdict(cfg.sample).items() if k != "prompts"}
    messages: list[dict] = []
    say("\nA short chat with the fine-tuned model:")
    for text in cfg.sft.demo:
        messages.append({"role": "user", "content": text})
        reply = lm.chat(messages, **sampling).strip()
        messages.append({"role": "assistant", "content": reply})
        say(f"  you> {text}\n  bot> {reply}")
    if out_file:
        write_json(out_file, {"checkpoint": str(checkpoint), "messages": messages})
    return messages


def _next_steps(run_dir: Path, summary: dict) -> str:
    loss = summary["best_val_loss"]
    shown = f"best validation loss {loss:.3f}" if math.isfinite(loss) else "no validation loss"
    return (f"\nDone: {summary['params']:,} parameters, {summary['steps']} {summary['stage']} steps, {shown}.\n"
            f"Next:\n"
            f"  tinylm chat {run_dir}                       # talk to it in the terminal\n"
            f"  tinylm web {run_dir}                        # ... in the browser (http://127.0.0.1:8501)\n"
            f"  tinylm serve {run_dir}                      # ... through an OpenAI-compatible API\n"
            f"  tinylm generate {run_dir} --prompt \"Hello\"  # continue a prompt\n"
            f"  tinylm run --out {run_dir} --run.max_time=0 --train.max_time=1200   # pretrain longer (resumes)\n")


def train_on_documents(documents: list[dict], out_dir: str | Path, config: str | Config = "cpu-demo",
                       overrides: dict | list | None = None, text_field: str | None = None) -> dict:
    """Train from in-memory documents, e.g. the second seed's `[{"content": ..., "source": ...}]`.

    The documents are written to `out_dir/corpus.jsonl` and the usual pipeline runs on that file.
    """
    from .config import load_config

    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    fields = [text_field] if text_field else cfg.data.text_fields
    lines = []
    for n, doc in enumerate(documents):
        text = doc if isinstance(doc, str) else next((doc[f] for f in fields if f in doc), None)
        if not isinstance(text, str):
            raise ValueError(f"document {n}: no text field {' or '.join(map(repr, fields))}")
        lines.append({"text": text, "source": doc.get("source", "memory") if isinstance(doc, dict) else "memory"})
    with claimed_folder(out_dir, "run", legacy=("config.toml", "tokenizer")):  # before corpus.jsonl goes in
        corpus = Path(out_dir) / "corpus.jsonl"
        new_content = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines)
        if not corpus.is_file() or corpus.read_text(encoding="utf-8") != new_content:
            write_text(corpus, new_content)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, corpus=[str(corpus)], text_fields=["text"]))
    return run(cfg, out_dir)
