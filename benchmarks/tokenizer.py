"""Tokenizer speed: tinylm's BPE training vs raw Hugging Face `tokenizers` on the same text; encoding MB/s.

    python benchmarks/tokenizer.py --vocab 4096

Text: the built-in corpus (chitchat-dataset + chatterbot-corpus, ~13 MB), repeated --repeat times.
  - training: `tinylm.tokenizer.train_tokenizer` vs a bare `tokenizers` ByteLevel BPE trainer with
    the same vocabulary, specials and alphabet (the floor: tinylm adds only its setup around it);
  - encoding: one process (`encode_batch`, which threads inside Rust), and the shard stage's pool
    with one worker per core (`build_shards`, which also writes the token files).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tinylm.config import DataConfig, TokenizerConfig
from tinylm.corpus import Document, builtin_documents
from tinylm.shards import build_shards
from tinylm.tokenizer import SPECIAL_TOKENS, train_tokenizer


def raw_tokenizers(texts: list[str], vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.processor())
    texts = [d.text for d in builtin_documents()] * args.repeat
    mb = sum(len(t.encode("utf-8")) for t in texts) / 2**20
    print(f"machine: {cpu}, {os.cpu_count()} cores; text: built-in corpus x{args.repeat}, {mb:.1f} MB, {len(texts):,} documents")

    theirs, t_raw = timed(raw_tokenizers, texts, args.vocab)
    ours, t_ours = timed(train_tokenizer, iter(texts), TokenizerConfig(vocab_size=args.vocab))
    same = ours.backend.get_vocab() == theirs.get_vocab()
    print(f"training ({args.vocab} tokens): tinylm {t_ours:.1f} s ({mb / t_ours:.1f} MB/s), raw tokenizers {t_raw:.1f} s "
          f"({mb / t_raw:.1f} MB/s): {t_ours / t_raw:.2f}x the time | same vocabulary: {same}")

    _, t_enc = timed(ours.encode_batch, texts)
    print(f"encoding, one process (encode_batch): {mb / t_enc:.1f} MB/s")
    with tempfile.TemporaryDirectory() as tmp:
        ours.save(f"{tmp}/tok")
        docs = [Document(t, "bench") for t in texts]
        for workers in (1, os.cpu_count() or 1):
            cfg = DataConfig(workers=workers)
            meta, t_sh = timed(build_shards, ((d, False) for d in docs), f"{tmp}/tok", f"{tmp}/shards-{workers}", cfg, None, False)
            print(f"encoding + writing shards, {workers} worker(s): {mb / t_sh:.1f} MB/s "
                  f"({meta['splits']['train']['tokens'] / t_sh:,.0f} tokens/s)")


if __name__ == "__main__":
    main()
