"""One held-out set across stages: a conversation that is also a pretraining document is held out of
both stages or of neither, whatever each stage's split setting."""

import json

import pytest

from tinylm.config import DataConfig
from tinylm.conversations import build_sft_shards, conversation_split, held_out_summary, read_conversations
from tinylm.corpus import conversation_text, record_split, split_documents, split_key


def pretraining_split(cfg: DataConfig) -> tuple[dict[str, set[int]], list[str], list[str]]:
    keys: dict[str, list[int]] = {"train": [], "val": []}
    train, val = [], []
    for doc, held_out in record_split(split_documents(cfg), keys):
        (val if held_out else train).append(doc.text)
    return {k: set(v) for k, v in keys.items()}, train, val


def test_default_corpora_hold_out_no_conversation_that_pretraining_trains_on():
    """data.corpus = sft.corpus = builtin: before, 364 of 377 held-out conversations were inside
    pretraining training documents and 208 of 340 pretraining validation documents were SFT training
    conversations."""
    keys, train_docs, val_docs = pretraining_split(DataConfig(corpus=["builtin"]))
    sft_val, sft_train = [], []
    for conv in read_conversations(["builtin"]):
        split, _ = conversation_split(conv.messages, 0.05, keys)
        assert split == conversation_split(conv.messages, 0.05, None)[0]  # the same key and fraction agree anyway
        (sft_val if split == "val" else sft_train).append(conversation_text(conv.messages))
    assert len(sft_val) > 200 and len(val_docs) > 200
    training_text = "\n" + "\n\0\n".join(train_docs) + "\n"  # inside: as whole turns, not a prefix of one
    assert sum(f"\n{text}\n" in training_text for text in sft_val) == 0
    sft_train_keys = {split_key(t) for t in sft_train}
    assert sum(split_key(t) in sft_train_keys for t in val_docs) == 0


@pytest.mark.parametrize("val_split", ["tail", "hash"])
def test_overlapping_corpora_with_other_split_settings_hold_out_alike(tmp_path, val_split):
    chats = [[{"role": "user", "content": f"Tell me about the number {i}."},
              {"role": "assistant", "content": f"The number {i} comes after {i - 1}  and before {i + 1}."}] for i in range(200)]
    sft_file = tmp_path / "chats.jsonl"
    sft_file.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    book = tmp_path / "book.txt"  # the same conversations as pretraining documents, spaced differently
    book.write_text("\n<|endoftext|>\n".join(conversation_text(c).replace("  ", " ") for c in chats))
    keys, _, val_docs = pretraining_split(DataConfig(corpus=[str(book)], val_split=val_split, val_fraction=0.2))
    splits = [conversation_split(c.messages, 0.05, keys) for c in read_conversations([str(sft_file)])]
    held_out = {split_key(conversation_text(c)) for c, (s, _) in zip(chats, splits) if s == "val"}
    assert held_out == {split_key(t) for t in val_docs}
    assert 30 <= len(held_out) <= 50  # about data.val_fraction of 200, not sft.val_fraction's 10
    assert {why for _, why in splits} == {"pretraining validation document", "pretraining training document"}


def test_sft_shards_say_what_was_held_out_from_what(tokenizer, tmp_path):
    chats = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
             for i in range(60)]
    from tinylm.conversations import Conversation

    pre = {"val": {split_key(conversation_text(c)) for c in chats[:5]},
           "train": {split_key(conversation_text(c)) for c in chats[5:30]}}
    meta = build_sft_shards([Conversation(c, "mem") for c in chats], tokenizer, tmp_path / "sft", 64, 0.5,
                            pretraining=pre)
    h = meta["held_out"]
    assert h["val"]["pretraining validation document"] == 5 and "pretraining training document" not in h["val"]
    assert h["train"]["pretraining training document"] == 25
    assert h["val"].get("not in pretraining", 0) + h["train"].get("not in pretraining", 0) == 30
    summary = held_out_summary(meta)
    assert "5 are pretraining validation documents (held out of both stages)" in summary
    assert "25 are pretraining training documents" in summary
    assert summary.endswith("0 held-out conversations are pretraining training documents")


def test_a_run_fine_tunes_with_the_split_its_pretraining_used(corpus_file, tmp_path):
    """The whole `tinylm run` path: the SFT data stage reads the run's shards/split_keys.npz (and its
    hash keys the stage), then a rerun finds everything up to date."""
    from tinylm.config import load_config
    from tinylm.pipeline import run

    chats = tmp_path / "chats.jsonl"
    turn = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, friend."}]
    chats.write_text("".join(json.dumps({"messages": turn + [{"role": "user", "content": f"n{i}"},
                                                              {"role": "assistant", "content": "ok"}]}) + "\n"
                             for i in range(30)))
    cfg = load_config("tiny", {"data.corpus": [str(corpus_file)], "sft.corpus": [str(chats)], "train.max_steps": 2,
                               "sft.train.max_steps": 2, "eval.enabled": False})
    run(cfg, tmp_path / "run", progress=False)
    meta = json.loads((tmp_path / "run" / "sft" / "data" / "meta.json").read_text())
    assert meta["pretraining_shards"] == str(tmp_path / "run" / "shards")
