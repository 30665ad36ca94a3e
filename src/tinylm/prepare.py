"""The data stages: [collect -> clean ->] tokenizer -> shards. They need no torch.

Each writes its output directory atomically with a `meta.json` holding an `inputs_hash` (what the
stage read and the settings it used); a stage whose hash is unchanged is skipped. Collection and
cleaning run only when a `[collect]` source is configured; the cleaned corpus then replaces
`data.corpus` for the stages after it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from .config import Config, to_toml
from .corpus import (CorpusError, corpus_files, corpus_fingerprint, files_fingerprint, read_documents, record_split,
                     save_split_keys, split_documents)
from .files import check_output, claimed_folder, hash_json, output_complete, output_lock, read_json, write_json, write_text
from .layout import RunLayout
from .shards import build_shards
from .tokenizer import Tokenizer, bytes_per_token, train_tokenizer


def _fresh(out_dir: Path, inputs_hash: str) -> bool:
    """An output made from the same inputs and settings, every file of it there at its full size."""
    meta = out_dir / "meta.json"
    if not (meta.is_file() and read_json(meta).get("inputs_hash") == inputs_hash):
        return False
    if not output_complete(out_dir):
        say(f"{out_dir}: damaged or incomplete (a file is missing or has the wrong size): rebuilding it")
        return False
    return True


def say(text: str) -> None:
    print(text, flush=True)


# --- tokenizer -------------------------------------------------------------------------------------
def tokenizer_stage(cfg: Config, out_dir: str | Path, force: bool = False, progress: bool = True) -> Path:
    """Train the tokenizer on the training documents; report compression on held-out ones."""
    out_dir = Path(out_dir)
    inputs_hash = hash_json({"corpus": corpus_fingerprint(cfg.data), "tokenizer": dataclasses.asdict(cfg.tokenizer)})
    if not force and _fresh(out_dir, inputs_hash):
        say(f"tokenizer: up to date in {out_dir}")
        return out_dir
    check_output(out_dir, "tokenizer", inputs=corpus_files(cfg.data.corpus), legacy=("tokenizer.json",))
    say(f"tokenizer: training {cfg.tokenizer.kind} with {cfg.tokenizer.vocab_size} tokens on {', '.join(cfg.data.corpus)}")
    t0 = time.perf_counter()
    counted = {"docs": 0}

    def train_texts():
        for d, held_out in split_documents(cfg.data):
            if not held_out:
                counted["docs"] += 1
                yield d.text

    tok = train_tokenizer(train_texts(), cfg.tokenizer, show_progress=progress)
    if counted["docs"] == 0:
        raise CorpusError(f"no training documents in {', '.join(cfg.data.corpus)}: the files are empty, "
                          "hold only blank text, or every document went to validation (data.val_fraction)")
    held_out = []
    for d, is_held_out in split_documents(cfg.data):
        if len(held_out) >= cfg.tokenizer.held_out_docs:
            break
        if is_held_out:
            held_out.append(d.text)
    compression = bytes_per_token(tok, held_out)
    tok.save(out_dir, model_max_length=cfg.model.max_seq_len,
             extra_meta={"inputs_hash": inputs_hash, "held_out_compression": compression,
                         "config": dataclasses.asdict(cfg.tokenizer)})
    write_text(out_dir / "config.toml", to_toml(cfg))
    _record_seconds(out_dir, t0)
    say(f"tokenizer: {tok.vocab_size} tokens -> {out_dir}; held-out compression "
        f"{compression['bytes_per_token']} bytes/token over {compression['docs']} documents")
    return out_dir


def _record_seconds(out_dir: Path, t0: float) -> None:
    """Add the stage's wall time to its meta.json (for the run report)."""
    meta = read_json(out_dir / "meta.json")
    write_json(out_dir / "meta.json", {**meta, "seconds": round(time.perf_counter() - t0, 1)})


# --- shards ----------------------------------------------------------------------------------------
def shards_stage(cfg: Config, tokenizer_dir: str | Path, out_dir: str | Path, force: bool = False,
                 progress: bool = True) -> Path:
    out_dir, tokenizer_dir = Path(out_dir), Path(tokenizer_dir)
    tok = Tokenizer.load(tokenizer_dir)
    data_settings = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "workers"}
    inputs_hash = hash_json({"corpus": corpus_fingerprint(cfg.data), "data": data_settings, "tokenizer": tok.fingerprint})
    if not force and _fresh(out_dir, inputs_hash):
        say(f"shards: up to date in {out_dir}")
        return out_dir
    check_output(out_dir, "shards", inputs=(*corpus_files(cfg.data.corpus), tokenizer_dir), legacy=("meta.json",))
    say(f"shards: tokenizing {', '.join(cfg.data.corpus)}")
    t0 = time.perf_counter()
    keys: dict[str, list[int]] = {"train": [], "val": []}
    meta = build_shards(record_split(split_documents(cfg.data), keys), tokenizer_dir, out_dir, cfg.data, progress=progress,
                        extra_meta={"inputs_hash": inputs_hash, "tokenizer_dir": str(tokenizer_dir.resolve()),
                                    "config": data_settings})
    save_split_keys(out_dir, keys)  # fine-tuning holds out what pretraining held out (conversations.py)
    write_text(out_dir / "config.toml", to_toml(cfg))
    _record_seconds(out_dir, t0)
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    say(f"shards: train {tr['tokens']:,} tokens / {tr['docs']:,} docs, val {va['tokens']:,} tokens / "
        f"{va['docs']:,} docs ({meta['dtype']}) -> {out_dir}")
    cut = meta["cut_documents"]
    if cut["documents"]:
        say(f"shards: {cut['documents']:,} documents longer than data.max_doc_chars={cut['max_doc_chars']:,} "
            f"were cut into {cut['pieces']:,} pieces")
    return out_dir


# --- collect and clean -----------------------------------------------------------------------------
def has_sources(cfg: Config) -> bool:
    c = cfg.collect
    return bool(c.files or c.hf_datasets or c.wikipedia_topics or c.urls or c.builtin)


def collect_stage(cfg: Config, out_dir: str | Path) -> list[str]:
    """Collect every configured source (those already collected are skipped); returns their files."""
    from .collect import collect

    out_dir = Path(out_dir)
    with output_lock(out_dir), claimed_folder(out_dir, "raw", inputs=corpus_files(cfg.collect.files), legacy=("manifest.json",)):
        manifest = collect(cfg.collect, out_dir)
    write_text(out_dir / "config.toml", to_toml(cfg))
    total = sum(s["documents"] for s in manifest["sources"].values())
    say(f"collect: {total:,} documents in {out_dir}")
    return [str(out_dir / manifest["sources"][name]["file"]) for name in manifest["plan"]]


def clean_stage(cfg: Config, out_dir: str | Path, force: bool = False, progress: bool = True) -> dict:
    """Clean data.corpus into out_dir/clean.jsonl with report.json, report.md and meta.json."""
    from .clean import check_contamination, clean_corpus

    out_dir = Path(out_dir)
    inputs_hash = hash_json({"corpus": corpus_fingerprint(cfg.data), "clean": dataclasses.asdict(cfg.clean),
                             "contamination": files_fingerprint(cfg.clean.contamination)})
    if not force and _fresh(out_dir, inputs_hash):
        say(f"clean: up to date in {out_dir}")
        return read_json(out_dir / "report.json")
    check_output(out_dir, "clean", inputs=corpus_files(cfg.data.corpus), legacy=("clean.jsonl",))
    say(f"clean: {', '.join(cfg.data.corpus)}")
    t0 = time.perf_counter()
    report = clean_corpus(read_documents(cfg.data), out_dir, cfg.clean, cfg.data.workers, progress=progress)
    if cfg.clean.contamination:
        report["contamination"] = check_contamination(out_dir / "clean.jsonl", cfg.clean, cfg.data.val_fraction)
        write_json(out_dir / "report.json", report)
        for name, r in report["contamination"].items():
            say(f"contamination: {r['contaminated']:,} of {r['docs']:,} {name} documents share a "
                f"{cfg.clean.contamination_ngram}-word sequence with the training documents")
    write_text(out_dir / "config.toml", to_toml(cfg))
    write_json(out_dir / "meta.json", {"inputs_hash": inputs_hash, "docs": report["docs_out"], "bytes": report["bytes_out"],
                                       "seconds": round(time.perf_counter() - t0, 1)})
    say(f"clean: kept {report['docs_out']:,} of {report['docs_in']:,} documents -> {out_dir / 'clean.jsonl'}")
    return report


def prepare_data(cfg: Config, run_dir: Path, progress: bool = True,
                 begin: Callable[[str], None] = lambda stage: None) -> Config:
    """Every data stage into run_dir; returns the config the training stages should use. `begin` is
    told the name of each stage as it starts (the run plan times them)."""
    run = RunLayout(run_dir)
    if has_sources(cfg):
        begin("collect")
        raw_files = collect_stage(cfg, run.raw)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, corpus=raw_files))
        begin("clean")
        clean_stage(cfg, run.clean, progress=progress)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, corpus=[str(run.clean / "clean.jsonl")]))
    begin("tokenizer")
    tokenizer_stage(cfg, run.tokenizer, progress=progress)
    begin("shards")
    shards_stage(cfg, run.tokenizer, run.shards, progress=progress)
    return cfg
