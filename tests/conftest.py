"""Shared fixtures: a small real-English corpus, a tokenizer trained on it, tiny configs."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from tinylm.config import Config, load_config
from tinylm.prepare import shards_stage, tokenizer_stage

DATA = Path(__file__).resolve().parent / "data"  # small real text, committed (see data/README.md)
STORIES = DATA / "tinystories_450.txt"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (the folder is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory):
    """Measured compile costs and CPU peaks go to a cache of the test session, not the user's."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """~400 TinyStories as JSON Lines (the first seed's format)."""
    stories = STORIES.read_text(encoding="utf-8").split("<|endoftext|>")
    path = tmp_path_factory.mktemp("corpus") / "stories.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for story in stories[:400]:
            if story.strip():
                f.write(json.dumps({"text": story.strip()}) + "\n")
    return path


def tiny_config(corpus: Path | str, **overrides) -> Config:
    cfg = load_config("tiny", {"data.corpus": [str(corpus)], "data.val_fraction": 0.1, **overrides})
    return cfg


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, corpus_file):
    """A tokenizer and token shards for the tiny preset, built once per session."""
    root = tmp_path_factory.mktemp("prepared")
    cfg = tiny_config(corpus_file)
    tokenizer_stage(cfg, root / "tokenizer", progress=False)
    shards_stage(cfg, root / "tokenizer", root / "shards", progress=False)
    return {"cfg": cfg, "tokenizer": root / "tokenizer", "shards": root / "shards", "root": root}


@pytest.fixture(scope="session")
def tokenizer(prepared):
    from tinylm.tokenizer import Tokenizer

    return Tokenizer.load(prepared["tokenizer"])


@pytest.fixture(scope="module")
def lm(prepared, tmp_path_factory):
    """A `LanguageModel` pretrained for 20 steps on the tiny corpus (one per test module)."""
    from tinylm.api import load
    from tinylm.pipeline import pretrain

    out = tmp_path_factory.mktemp("served")
    cfg = tiny_config(prepared["cfg"].data.corpus[0], **{"train.max_steps": 20})
    return load(pretrain(cfg, prepared["shards"], out)["checkpoint"])
