"""Conversations for supervised fine-tuning: reading, fitting to the context, shards, batches.

Formats (JSON Lines, optionally .gz), one conversation per line:
    {"conversations": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}   (first seed)
    {"messages": [{"role": "system", ...}, {"role": "user", ...}, ...]}                      (OpenAI)
and `builtin` (chitchat-dataset dialogues and chatterbot-corpus pairs).

Rule for conversations longer than the context: they are split into pieces of whole exchanges (a
user message and the replies to it), each piece starting with the system message (if any), packed
greedily so that each fits the context; an exchange that alone does not fit is cut at the context length. Every split and cut is
counted in the shards' meta.json. Each piece becomes one row of a batch, padded at the end; with
causal attention no real token sees the padding, and padding never carries loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .corpus import BUILTIN, CorpusError, builtin_conversations, conversation_text, corpus_files, jsonl_records, split_key
from .data import EpochBatches
from .files import atomic_dir, read_json, write_json
from .shards import token_dtype
from .tokenizer import ROLES, Tokenizer


@dataclass
class Conversation:
    messages: list[dict]
    source: str


def validate_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise CorpusError(f"{where}: expected a non-empty list of messages")
    clean = []
    for n, m in enumerate(messages):
        if not isinstance(m, dict):
            raise CorpusError(f"{where}: message {n} must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise CorpusError(f"{where}: message {n}: field 'role' is {role!r}, expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise CorpusError(f"{where}: message {n}: field 'content' must be a string")
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        raise CorpusError(f"{where}: no assistant message, so nothing to learn from")
    return clean


def read_conversation_file(path: Path) -> Iterator[Conversation]:
    for lineno, record in jsonl_records(path):
        where = f"{path}:{lineno}"
        if not isinstance(record, dict):
            raise CorpusError(f"{where}: expected an object with 'conversations' or 'messages'")
        key = "conversations" if "conversations" in record else "messages" if "messages" in record else None
        if key is None:
            raise CorpusError(f"{where}: no field 'conversations' or 'messages' (fields present: {', '.join(record) or 'none'})")
        yield Conversation(validate_messages(record[key], f"{where}: field '{key}'"), where)


def read_conversations(paths: Iterable[str]) -> Iterator[Conversation]:
    paths = list(paths)
    for p in paths:
        if p == BUILTIN:
            for source, messages in builtin_conversations():
                if any(m["role"] == "assistant" for m in messages):
                    yield Conversation(messages, source)
    for path in corpus_files(paths):
        if ".jsonl" not in path.name.lower():
            raise CorpusError(f"{path}: conversations must be JSON Lines (.jsonl or .jsonl.gz), one conversation a line")
        yield from read_conversation_file(path)


def conversation_split(messages: list[dict], val_fraction: float, pretraining: dict[str, set[int]] | None) -> tuple[str, str]:
    """("val" or "train", why) for a conversation. A conversation that is a pretraining document
    (same split_key: the same text up to spacing) takes that document's split, so what one stage
    held out the other never trains on; any other is held out when its key falls under
    val_fraction, the rule pretraining's "hash" split follows."""
    key = split_key(conversation_text(messages))
    if pretraining is not None:
        if key in pretraining["val"]:
            return "val", "pretraining validation document"
        if key in pretraining["train"]:
            return "train", "pretraining training document"
    return ("val" if val_fraction > 0 and key / 2**64 < val_fraction else "train"), "not in pretraining"


@dataclass
class FitStats:
    conversations: int = 0
    rows: int = 0
    split: int = 0  # conversations split into several rows
    truncated: int = 0  # rows cut at the context length
    dropped: int = 0  # pieces with no assistant tokens left after fitting
    assistant_tokens: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def fit_to_context(tok: Tokenizer, messages: list[dict], max_tokens: int, stats: FitStats) -> list[tuple[list[int], list[int]]]:
    """Render a conversation as rows of at most `max_tokens` tokens (see the module docstring)."""
    ids, mask = tok.render_chat(messages)
    if len(ids) <= max_tokens:
        return [(ids, mask)]
    system = messages[:1] if messages[0]["role"] == "system" else []
    exchanges: list[list[dict]] = []  # a user message and the replies to it
    for m in messages[len(system):]:
        if m["role"] == "user" or not exchanges:
            exchanges.append([m])
        else:
            exchanges[-1].append(m)
    pieces, current = [], []
    for exchange in exchanges:  # pack whole exchanges; start a new piece when the next one does not fit
        if current and len(tok.render_chat(system + current + exchange)[0]) > max_tokens:
            pieces.append(current)
            current = []
        current += exchange
    pieces.append(current)
    stats.split += len(pieces) > 1
    rows = []
    for piece in pieces:
        ids, mask = tok.render_chat(system + piece)
        if len(ids) > max_tokens:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
            stats.truncated += 1
        rows.append((ids, mask))
    return rows


def build_sft_shards(conversations: Iterable[Conversation], tok: Tokenizer, out_dir: str | Path, max_tokens: int,
                     val_fraction: float, extra_meta: dict | None = None,
                     pretraining: dict[str, set[int]] | None = None) -> dict:
    """Write `{split}_ids.bin`, `{split}_mask.bin` (uint8) and `{split}_offsets.bin` (int64 row starts).

    `pretraining`: the split keys of the pretraining documents (corpus.load_split_keys); the meta's
    "held_out" counts each split's conversations by why they went there (see conversation_split)."""
    dtype = token_dtype(tok.vocab_size)
    stats = {"train": FitStats(), "val": FitStats()}
    why: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    with atomic_dir(out_dir, "sft-data", legacy=("meta.json",)) as tmp:
        files = {s: {k: open(tmp / f"{s}_{k}.bin", "wb") for k in ("ids", "mask")} for s in stats}
        offsets: dict[str, list[int]] = {s: [0] for s in stats}
        for conv in conversations:
            split, reason = conversation_split(conv.messages, val_fraction, pretraining)
            why[split][reason] = why[split].get(reason, 0) + 1
            st = stats[split]
            st.conversations += 1
            for ids, mask in fit_to_context(tok, conv.messages, max_tokens, st):
                if sum(mask[1:]) == 0:  # nothing to predict in this row
                    st.dropped += 1
                    continue
                np.asarray(ids, dtype=dtype).tofile(files[split]["ids"])
                np.asarray(mask, dtype=np.uint8).tofile(files[split]["mask"])
                offsets[split].append(offsets[split][-1] + len(ids))
                st.rows += 1
                st.assistant_tokens += sum(mask)
        for split, handles in files.items():
            for f in handles.values():
                f.close()
            np.asarray(offsets[split], dtype=np.int64).tofile(tmp / f"{split}_offsets.bin")
        if stats["train"].rows == 0:
            raise ValueError("no training conversations with assistant messages")
        meta = {"dtype": dtype.name, "vocab_size": tok.vocab_size, "tokenizer_fingerprint": tok.fingerprint,
                "max_tokens": max_tokens, "splits": {s: st.as_dict() for s, st in stats.items()},
                "held_out": {"checked_against_pretraining": pretraining is not None, **why}, **(extra_meta or {})}
        write_json(tmp / "meta.json", meta)
    return meta


def held_out_summary(meta: dict) -> str:
    """What the SFT split held out from what, in words (for the log and the run report)."""
    h = meta.get("held_out")
    if not h:
        return "held out by a hash of each conversation (made before the split was checked against pretraining)"
    if not h["checked_against_pretraining"]:
        return (f"held out {sum(h['val'].values()):,} conversations by their own hash; no pretraining split was "
                "found to check them against (a checkpoint outside a run folder)")
    val, train = h["val"], h["train"]
    return (f"held out {sum(val.values()):,} conversations: {val.get('pretraining validation document', 0):,} are "
            f"pretraining validation documents (held out of both stages), {val.get('not in pretraining', 0):,} are not "
            f"pretraining documents; of {sum(train.values()):,} training conversations "
            f"{train.get('pretraining training document', 0):,} are pretraining training documents; "
            f"{val.get('pretraining training document', 0):,} held-out conversations are pretraining training documents")


@dataclass
class SFTRows:
    ids: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray = field(repr=False)

    @classmethod
    def load(cls, folder: str | Path, split: str) -> "SFTRows":
        folder = Path(folder)
        meta = read_json(folder / "meta.json")
        offsets = np.fromfile(folder / f"{split}_offsets.bin", dtype=np.int64)
        n = int(offsets[-1])
        ids = np.memmap(folder / f"{split}_ids.bin", dtype=meta["dtype"], mode="r") if n else np.zeros(0, meta["dtype"])
        mask = np.memmap(folder / f"{split}_mask.bin", dtype=np.uint8, mode="r") if n else np.zeros(0, np.uint8)
        if len(ids) != n or len(mask) != n:
            raise ValueError(f"{folder}: {split} files do not match their offsets: damaged SFT shards")
        return cls(ids, mask, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[a:b], self.mask[a:b]


class SFTBatches(EpochBatches):
    """Conversation rows for the training loop (same interface as PackedBatches).

    inputs = ids[:-1], targets = ids[1:] where the target's mask is 1, else -100. Rows are
    right-padded to the longest in the batch, rounded up to a multiple of 8.
    """

    def __init__(self, rows: SFTRows, seq_len: int, batch_size: int, pad_id: int, seed: int = 0,
                 rank: int = 0, world: int = 1, shuffle: bool = True):
        if len(rows) < world * batch_size:
            raise ValueError(f"{len(rows)} conversation rows; one step needs {world * batch_size} "
                             f"(batch {batch_size} x {world} ranks): use more data or a smaller batch")
        self.rows, self.seq_len, self.pad_id = rows, seq_len, pad_id
        super().__init__(len(rows), batch_size, seed, rank, world, shuffle)

    def fetch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.rows.row(i) for i in indices]
        width = min(self.seq_len, -(-max(len(ids) - 1 for ids, _ in rows) // 8) * 8)
        x = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, (ids, mask) in enumerate(rows):
            ids = torch.from_numpy(ids.astype(np.int64))
            n = len(ids) - 1
            x[r, :n] = ids[:-1]
            y[r, :n] = torch.where(torch.from_numpy(mask[1:].astype(bool)), ids[1:], -100)
        return x, y
