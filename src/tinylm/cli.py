"""`tinylm <verb>`: thin wrappers over the stage functions.

Every verb takes `--config NAME|PATH`, `--out DIR` and any number of `--section.field=value`
overrides, parsed once here for all verbs. `tinylm presets` lists presets; `tinylm <verb> -h`
shows a verb's own flags and `tinylm config-help` every config field.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .config import Config, ConfigError, EvalConfig, help_text, load_config, preset_names, to_toml

VERBS = {
    "run": "tokenizer -> shards -> pretrain -> samples -> SFT -> demo chat -> evaluation -> report (default: the built-in corpus)",
    "collect": "gather text from files, Hugging Face datasets, Wikipedia topics and web pages into DIR",
    "clean": "normalise, filter and deduplicate data.corpus into DIR/clean.jsonl with a report",
    "tokenizer": "train a tokenizer on data.corpus",
    "shards": "tokenize data.corpus into train/val token shards",
    "pretrain": "pretrain a model on token shards",
    "import": "turn a Hugging Face LlamaForCausalLM folder (safetensors) into a tinylm checkpoint in DIR",
    "sft": "fine-tune a checkpoint on conversations (sft.corpus) with the same training loop",
    "dpo": "align a checkpoint with preference pairs (dpo.corpus) by DPO, with the same training loop",
    "merge": "write a LoRA checkpoint's adapters into its weights: a plain checkpoint in DIR",
    "generate": "continue prompts with a trained model",
    "chat": "talk to a model in the terminal",
    "serve": "OpenAI-compatible HTTP API (POST /v1/chat/completions, /v1/completions; GET /v1/models)",
    "web": "Streamlit chat page in the browser",
    "info": "describe a checkpoint (size, config, training state)",
    "export": "write a checkpoint as a Hugging Face LlamaForCausalLM directory or a GGUF file",
    "eval": "bits-per-byte, BLiMP minimal pairs, multiple-choice accuracy and chat loss of a checkpoint -> CKPT/eval.json",
    "report": "one HTML page (and a Markdown twin) with a run's curves, data, scores and samples -> RUN/report.html",
    "presets": "list the config presets",
    "config-help": "list every config field with its meaning",
}


# The config sections each verb reads; an override of any other section is refused, not ignored.
ALL_SECTIONS = ("model", "tokenizer", "data", "collect", "clean", "train", "sft", "dpo", "lora", "sample", "eval", "run")
VERB_SECTIONS = {
    "run": ALL_SECTIONS, "collect": ("collect",), "clean": ("data", "clean"),
    "tokenizer": ("data", "tokenizer", "model"), "shards": ("data",), "pretrain": ("model", "train"),
    "sft": ("train", "sft", "lora"), "dpo": ("train", "dpo", "lora"), "generate": ("sample",), "chat": ("sample",), "eval": ("eval",),
}


# The verbs that write files: only they take --out (a flag a verb would ignore is not offered).
OUT_VERBS = ("run", "collect", "clean", "tokenizer", "shards", "pretrain", "import", "sft", "dpo", "merge", "generate", "chat",
             "export")


def _parser() -> argparse.ArgumentParser:
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", default=None, help="preset name or TOML file (see `tinylm presets`)")
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--out", default=None, help="output directory (new, or an earlier output of this verb)")
    parser = argparse.ArgumentParser(prog="tinylm", description="Train a small language model from scratch and talk to it.",
                                     epilog="Any config field can be set as --section.field=value; see `tinylm config-help`.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = {name: sub.add_parser(name, help=text, description=text, epilog=_settings_help(name),
                              parents=[*([config] if name in VERB_SECTIONS else []), *([out] if name in OUT_VERBS else [])],
                              formatter_class=argparse.RawDescriptionHelpFormatter) for name, text in VERBS.items()}
    p["shards"].add_argument("--tokenizer", required=True, help="tokenizer directory")
    p["pretrain"].add_argument("--shards", required=True, help="shard directory (its meta.json names the tokenizer)")
    for verb in ("generate", "chat", "info", "sft", "dpo", "merge", "serve", "web", "export", "eval"):
        p[verb].add_argument("checkpoint", help="checkpoint, stage or run directory")
    p["run"].add_argument("--dpo", action="store_true",
                          help="after SFT, align the model by DPO on dpo.corpus (default: pairs made from the built-in conversations)")
    p["import"].add_argument("hf_dir", help="a Hugging Face model folder (config.json, safetensors, tokenizer.json)")
    p["import"].add_argument("--context", type=int, default=None,
                             help="context length in tokens (default: the model's max_position_embeddings)")
    p["generate"].add_argument("--prompt", action="append", default=None, help="prompt (repeatable; default: sample.prompts)")
    for verb in ("generate", "chat", "serve", "web", "eval"):
        p[verb].add_argument("--device", default="auto")
    for verb, port in (("serve", 8000), ("web", 8501)):
        p[verb].add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
        p[verb].add_argument("--port", type=int, default=port)
    p["serve"].add_argument("--api-key", default=os.environ.get("TINYLM_API_KEY"), help="require this bearer key (default: $TINYLM_API_KEY)")
    p["serve"].add_argument("--model-name", default="tinylm", help="the model id clients pass")
    p["serve"].add_argument("--timeout", type=float, default=120.0,
                            help="seconds of generation per request; a longer one ends as if max_tokens were reached")
    p["chat"].add_argument("--system", default="", help="system message")
    p["eval"].add_argument("--text", action="append", default=[], help="text corpus (any corpus format) for bits-per-byte")
    p["eval"].add_argument("--blimp", action="append", default=[], help="JSONL of sentence_good / sentence_bad pairs")
    p["eval"].add_argument("--choice", action="append", default=[],
                           help="HellaSwag (ctx, endings, label) or ARC items: a JSONL file or a Hugging Face dataset "
                                "(Rowan/hellaswag, allenai/ai2_arc/ARC-Easy?split=test)")
    p["eval"].add_argument("--chat", action="append", default=[],
                           help="conversation JSONL: loss on the assistant tokens (default for an SFT checkpoint: its held-out split)")
    p["eval"].add_argument("--shards", default=None, help="shard folder: bits-per-byte of its validation split")
    p["eval"].add_argument("--max-items", type=int, default=None,
                           help="score at most this many items per task, spread evenly over it (default: all, or --eval.max_items)")
    p["report"].add_argument("run", help="run directory (the --out of `tinylm run`)")
    p["export"].add_argument("--format", choices=["hf", "gguf"], default="hf",
                             help="hf: transformers LlamaForCausalLM; gguf: llama.cpp / Ollama (needs `pip install gguf`)")
    p["export"].add_argument("--gguf-type", choices=["f32", "f16", "q8_0"], default=None,
                             help="GGUF weights: f32 (exact, the default), f16, or q8_0 (8-bit blocks, ~1/4 of f32)")
    return parser


def _settings_help(verb: str) -> str:
    sections = VERB_SECTIONS.get(verb, ())
    if not sections:
        return "This verb reads no config settings."
    extra = (f"\nIn `tinylm {verb}`, --train.FIELD sets this run's value (it goes over [{verb}.train])."
             if verb in ("sft", "dpo") else "")
    return f"Settings it reads (--section.field=value; [{'], ['.join(sections)}]):\n{help_text(sections)}{extra}"


def _check_sections(verb: str, overrides: list[str]) -> None:
    sections = VERB_SECTIONS.get(verb, ())
    for item in overrides:
        section = item.split("=", 1)[0].split(".", 1)[0]
        if section not in sections:
            reads = f"reads only [{'], ['.join(sections)}]" if sections else "reads no config settings"
            raise ConfigError(f"`tinylm {verb}` {reads}: --{item.split('=', 1)[0]} would do nothing here")


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Known flags to argparse; `--section.field[=value]` pairs to the config (only the verb's sections)."""
    args, rest = _parser().parse_known_args(argv)
    overrides, i = [], 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--") or "." not in item.split("=")[0]:
            raise ConfigError(f"unrecognised argument {item!r}: config overrides look like --section.field=value")
        if "=" not in item:
            if i + 1 >= len(rest):
                raise ConfigError(f"{item} needs a value")
            item, i = f"{item}={rest[i + 1]}", i + 1
        overrides.append(item[2:])
        i += 1
    _check_sections(args.verb, overrides)
    return args, overrides


def _config(args, overrides, base: Config | None = None) -> Config:
    return load_config(args.config, overrides, base=base)


def main(argv: list[str] | None = None) -> int:
    from .files import LockedError

    argv = sys.argv[1:] if argv is None else argv
    args = None
    try:
        args, overrides = parse(argv)
        return COMMANDS[args.verb](args, overrides) or 0
    except (ConfigError, FileNotFoundError, ValueError, FloatingPointError) as e:
        print(f"tinylm: error: {e}", file=sys.stderr)
        return 2
    except LockedError as e:
        print(f"tinylm: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a missing permission: say which file, keep what was complete
        where = e.filename or (f"writing into {args.out}" if getattr(args, "out", None) else "the file is not known")
        print(f"tinylm: error: {e.strerror or e} ({where}); outputs being written were "
              "discarded, complete ones are untouched", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def cmd_run(args, overrides) -> int:
    started = time.monotonic()  # run.max_time counts from here, importing torch included
    from .pipeline import run

    out = Path(args.out or "runs/default")
    # rerunning a run directory without --config continues with the config it was made with
    saved = out / "config.toml"
    cfg = load_config(args.config or (str(saved) if saved.is_file() else "cpu-demo"), overrides)
    return _leave_process_group(_exit_code(run(cfg, out, dpo=args.dpo, started=started)))  # under torchrun, as pretrain and sft do


def _leave_process_group(code: int) -> int:
    """Under torchrun: wait for every rank before tearing the group down, so that no rank closes its
    connections while another is still printing or saving (gloo reports that as a crash), then end
    the process here with `code`.

    Once a DDP wrapper has been made, the gloo group's worker threads keep running after
    `destroy_process_group` (torch 2.13; without DDP they stop), and in two of six CI runs a
    rank that had finished its work aborted during interpreter teardown ("terminate called without
    an active exception", SIGABRT), failing the whole torchrun job. Everything is written and
    flushed by then, so the rank skips the teardown with `os._exit`. Without a process group this
    returns `code`.
    """
    import logging

    import torch.distributed as dist

    if not dist.is_initialized():
        return code
    dist.barrier()
    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_code(summary: dict) -> int:
    """0 when the stage finished; 128 + the signal number when a signal stopped it after a final checkpoint
    (as a shell reports a signalled program, so schedulers see the job did not finish)."""
    import signal

    return 128 + signal.Signals[summary["stopped_by"]].value if summary.get("stopped_by") else 0


def cmd_collect(args, overrides) -> int:
    from .prepare import collect_stage

    out = Path(args.out or "data/raw")
    collect_stage(_config(args, overrides), out)
    print(f"use the collected text with --data.corpus={out}")
    return 0


def cmd_clean(args, overrides) -> int:
    from .prepare import clean_stage

    out = Path(args.out or "data/clean")
    clean_stage(_config(args, overrides), out, force=True)
    print((out / "report.md").read_text(encoding="utf-8"))
    print(f"use the cleaned text with --data.corpus={out / 'clean.jsonl'}")
    return 0


def cmd_tokenizer(args, overrides) -> int:
    from .prepare import tokenizer_stage

    tokenizer_stage(_config(args, overrides), args.out or "runs/default/tokenizer", force=True)
    return 0


def cmd_shards(args, overrides) -> int:
    from .prepare import shards_stage

    shards_stage(_config(args, overrides), args.tokenizer, args.out or "runs/default/shards", force=True)
    return 0


def cmd_pretrain(args, overrides) -> int:
    from .pipeline import pretrain

    import torch.distributed as dist

    summary = pretrain(_config(args, overrides), args.shards, args.out or "runs/default/pretrain")
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(summary, indent=2, default=str))
    return _leave_process_group(_exit_code(summary))


def cmd_sft(args, overrides) -> int:
    import torch.distributed as dist

    from .pipeline import sft

    base = _saved_config(args.checkpoint)  # the pretraining run's settings, then --config and overrides
    # here --train.X is the fine-tuning run's X: it goes over the stage's [sft.train] values
    overrides = [f"sft.{o}" if o.startswith("train.") else o for o in overrides]
    summary = sft(_config(args, overrides, base=base), args.checkpoint, args.out or "runs/default/sft")
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(summary, indent=2, default=str))
    return _leave_process_group(_exit_code(summary))


def cmd_import(args, overrides) -> int:
    from .importer import import_hf

    ckpt = import_hf(args.hf_dir, args.out or "runs/imported", args.context)
    print(f"imported {args.hf_dir} as {ckpt}: `tinylm sft {ckpt.parent.parent} --out DIR` fine-tunes it")
    return 0


def cmd_merge(args, overrides) -> int:
    from .checkpoint import checkpoint_config, find_checkpoint, load_checkpoint, save_checkpoint
    from .config import LoRAConfig
    from .files import claimed_folder, output_lock

    ckpt = find_checkpoint(args.checkpoint)
    model, _, meta = load_checkpoint(ckpt)  # adapters come back merged: W + (alpha / r) B A
    if not meta.get("lora"):
        raise ValueError(f"{ckpt} has no LoRA adapters: there is nothing to merge")
    cfg = dataclasses.replace(checkpoint_config(ckpt), lora=LoRAConfig())  # fine-tuning it further trains every weight unless asked
    out = Path(args.out or f"{ckpt.parent.parent}-merged")
    with output_lock(out), claimed_folder(out, "merge", inputs=(ckpt,), legacy=("checkpoints",)):
        target = save_checkpoint(out, model, cfg, ckpt, {**meta["trainer"], "merged_from": str(ckpt)}, keep_last=1)
    print(f"merged {ckpt} ({meta['lora']}) into {target}: {model.num_params():,} parameters")
    return 0


def cmd_dpo(args, overrides) -> int:
    import torch.distributed as dist

    from .dpo import dpo

    base = _saved_config(args.checkpoint)
    overrides = [f"dpo.{o}" if o.startswith("train.") else o for o in overrides]  # --train.X is this run's X
    summary = dpo(_config(args, overrides, base=base), args.checkpoint, args.out or "runs/default/dpo")
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(summary, indent=2, default=str))
    return _leave_process_group(_exit_code(summary))


def _saved_config(checkpoint: str) -> Config:
    from .checkpoint import checkpoint_config, find_checkpoint

    return checkpoint_config(find_checkpoint(checkpoint))


def cmd_generate(args, overrides) -> int:
    from .api import load
    from .files import claimed_folder, write_json, write_text

    cfg = _config(args, overrides, base=_saved_config(args.checkpoint))
    with claimed_folder(args.out, "generations", legacy=("generations.json",)) if args.out else contextlib.nullcontext():
        lm = load(args.checkpoint, device=args.device)
        sampling = {k: v for k, v in dataclasses.asdict(cfg.sample).items() if k != "prompts"}
        results = []
        for prompt in args.prompt or cfg.sample.prompts:
            print(prompt, end="", flush=True)
            pieces = []
            for piece in lm.stream(prompt, **sampling):
                pieces.append(piece)
                print(piece, end="", flush=True)
            print("\n")
            results.append({"prompt": prompt, "completion": "".join(pieces)})
        if args.out:
            write_json(Path(args.out) / "generations.json", {"checkpoint": lm.meta["path"], "samples": results})
            write_text(Path(args.out) / "config.toml", to_toml(cfg))
    return 0


def cmd_chat(args, overrides) -> int:
    from .chat import chat_loop

    cfg = _config(args, overrides, base=_saved_config(args.checkpoint))
    from .files import claimed_folder

    with claimed_folder(args.out, "chat", legacy=("transcript.json",)) if args.out else contextlib.nullcontext():
        return chat_loop(args.checkpoint, cfg, device=args.device, system=args.system, out_dir=args.out)


def cmd_serve(args, overrides) -> int:
    from .server import serve

    serve(args.checkpoint, args.host, args.port, args.api_key, args.model_name, args.device, args.timeout)
    return 0


def cmd_web(args, overrides) -> int:
    from .checkpoint import find_checkpoint

    ckpt = find_checkpoint(args.checkpoint)  # fail here, with a clear message, not inside the page
    app = Path(__file__).with_name("webapp.py")
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", args.host,
           "--server.port", str(args.port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--", "--checkpoint", str(ckpt), "--device", args.device]
    print(f"web chat for {ckpt} on http://{args.host}:{args.port}", flush=True)
    if os.name == "posix":  # become the Streamlit server, so that signals (Ctrl-C, SIGTERM) reach it
        os.execv(sys.executable, cmd)
    return subprocess.call(cmd)


def cmd_export(args, overrides) -> int:
    from .export import export_gguf, export_hf

    if args.gguf_type and args.format != "gguf":
        print("--gguf-type applies to --format gguf only", file=sys.stderr)
        return 2
    if args.format == "gguf":
        out = export_gguf(args.checkpoint, args.out or "export/gguf", args.gguf_type or "f32")
        print(f"exported to {out / 'model.gguf'}; `ollama create mymodel -f {out / 'Modelfile'}` makes an Ollama model")
        return 0
    out = export_hf(args.checkpoint, args.out or "export/hf")
    print(f"exported to {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def cmd_eval(args, overrides) -> int:
    from .evaluate import evaluate_checkpoint, format_score, score_table

    cfg = _config(args, overrides)  # [eval]: task files add to the flags' ones, as in `tinylm run`
    max_items = args.max_items
    if max_items is None:  # all items, unless --eval.max_items (or a --config file) bounds them
        set_here = any(o.split("=", 1)[0] == "eval.max_items" for o in overrides)
        max_items = cfg.eval.max_items if set_here or (args.config and cfg.eval.max_items != EvalConfig().max_items) else 0
    results = evaluate_checkpoint(args.checkpoint, args.text, [*args.blimp, *cfg.eval.blimp],
                                  [*args.choice, *cfg.eval.choice], args.shards, max_items, args.chat, device=args.device)
    for row in score_table(results):
        print(format_score(row))
    return 0


def cmd_report(args, overrides) -> int:
    from .report import write_report

    html_path, md_path = write_report(args.run)
    print(f"report: {html_path} (open it in a browser; no network needed) and {md_path}")
    return 0


def cmd_info(args, overrides) -> int:
    from .checkpoint import checkpoint_model_config, find_checkpoint, read_meta

    ckpt = find_checkpoint(args.checkpoint)
    meta = read_meta(ckpt)
    checkpoint_model_config(ckpt, meta)  # a hand-edited model field is named here, not met later
    trainer = meta.get("trainer", {})
    print(f"checkpoint: {ckpt}")
    print(f"parameters: {meta['params']:,}")
    print(f"model: {json.dumps(meta['model'])}")
    print(f"trained: {trainer.get('stage')} step {trainer.get('step')}, {trainer.get('tokens', 0):,} tokens, "
          f"best val loss {trainer.get('best_val_loss')}")
    print(f"tokenizer: {meta['tokenizer_fingerprint']}")
    return 0


def cmd_presets(args, overrides) -> int:
    from .config import PRESET_ALIASES

    for name in preset_names():
        aliases = [old for old, new in PRESET_ALIASES.items() if new == name]
        print(name + (f" (also: {', '.join(aliases)})" if aliases else ""))
    return 0


def cmd_config_help(args, overrides) -> int:
    print(help_text())
    return 0


COMMANDS = {"run": cmd_run, "collect": cmd_collect, "clean": cmd_clean, "tokenizer": cmd_tokenizer, "shards": cmd_shards, "pretrain": cmd_pretrain, "import": cmd_import, "sft": cmd_sft, "dpo": cmd_dpo, "merge": cmd_merge,
            "generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve, "web": cmd_web, "info": cmd_info, "export": cmd_export, "eval": cmd_eval, "report": cmd_report, "presets": cmd_presets,
            "config-help": cmd_config_help}

if __name__ == "__main__":
    sys.exit(main())
