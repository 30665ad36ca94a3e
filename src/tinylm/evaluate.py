"""How good is a checkpoint: bits-per-byte on text, minimal pairs (BLiMP), multiple choice (HellaSwag, ARC).

Every score comes with its number of items, a 95% interval and the chance level. Bits-per-byte
divides the summed negative log-likelihood (in bits) by the UTF-8 bytes of the text, so models
with different tokenizers can be compared. All scoring goes through one function,
`continuation_logprobs`: the log-probability of some tokens given the tokens before them.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .model import Transformer
from .tokenizer import Tokenizer

Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (well-behaved near 0 and 1, unlike p +- 2 se)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def accuracy(correct: Sequence[bool], chance: float) -> dict:
    k, n = sum(correct), len(correct)
    low, high = wilson_interval(k, n)
    return {"accuracy": round(k / n, 4) if n else None, "ci95": [round(low, 4), round(high, 4)], "n": n,
            "chance": round(chance, 4)}


@torch.inference_mode()
def continuation_logprobs(model: Transformer, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                          batch_size: int = 16) -> list[float]:
    """For each (context, continuation): sum of log p(continuation tokens | everything before them).

    Sequences longer than the context window lose their oldest context tokens. Batches are padded
    on the right; padding is never scored (causal attention: no scored token sees it).
    """
    device = model.tok_embeddings.weight.device
    limit = model.cfg.max_seq_len + 1
    out: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        seqs = [(list(ctx) + list(cont))[-limit:] for ctx, cont in chunk]
        n_scored = [min(len(cont), len(s) - 1) for (_, cont), s in zip(chunk, seqs)]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
        logits, _ = model(ids[:, :-1].to(device))
        logp = F.log_softmax(logits.float(), dim=-1)
        token_logp = logp.gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)  # (B, width - 1)
        for i, s in enumerate(seqs):
            end = len(s) - 1
            out.append(token_logp[i, end - n_scored[i]:end].sum().item())
    return out


# --- bits per byte on plain text ------------------------------------------------------------------
@torch.inference_mode()
def bits_per_byte(model: Transformer, tok: Tokenizer, texts: Iterable[str], batch_size: int = 8) -> dict:
    """Every token of every document after its <|bos|> is scored once, in windows of the context length."""
    window = model.cfg.max_seq_len
    pairs, n_bytes, n_docs = [], 0, 0
    for text in texts:
        ids = tok.encode_document(text)
        for start in range(0, len(ids) - 1, window):  # each window predicts ids[start+1 : start+window+1]
            pairs.append((ids[start:start + 1], ids[start + 1:start + window + 1]))
        n_bytes += len(text.encode("utf-8"))
        n_docs += 1
    nll = -sum(continuation_logprobs(model, pairs, batch_size))
    n_tokens = sum(len(cont) for _, cont in pairs)
    return {"docs": n_docs, "tokens": n_tokens, "bytes": n_bytes, "loss": round(nll / max(1, n_tokens), 5),
            "bits_per_byte": round(nll / math.log(2) / max(1, n_bytes), 5)}


# --- task files -----------------------------------------------------------------------------------
def read_jsonl(path: str | Path, limit: int = 0) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if limit and len(rows) >= limit:
                break
    return rows


def minimal_pairs(model: Transformer, tok: Tokenizer, rows: list[dict], source: str = "") -> dict:
    """BLiMP: the pair is right when the good sentence gets the higher log-probability."""
    for number, row in enumerate(rows, 1):
        if not isinstance(row.get("sentence_good"), str) or not isinstance(row.get("sentence_bad"), str):
            raise ValueError(f"{source}:{number}: needs string fields 'sentence_good' and 'sentence_bad'")
    pairs = [([tok.bos_id], tok.encode(r[key])) for r in rows for key in ("sentence_good", "sentence_bad")]
    scores = continuation_logprobs(model, pairs)
    right = [good > bad for good, bad in zip(scores[0::2], scores[1::2])]
    by_phenomenon: dict[str, list[bool]] = defaultdict(list)
    for row, ok in zip(rows, right):
        by_phenomenon[row.get("UID") or row.get("linguistics_term") or "all"].append(ok)
    return {**accuracy(right, 0.5),
            "by_phenomenon": {name: accuracy(oks, 0.5) for name, oks in sorted(by_phenomenon.items())}}


def _choice_item(row: dict, where: str) -> tuple[str, list[str], int]:
    """(context, endings, index of the right one) from HellaSwag or ARC-style rows."""
    if "endings" in row:  # HellaSwag: ctx, endings, label
        return row["ctx"], list(row["endings"]), int(row["label"])
    if "choices" in row:  # ARC: question, choices {text, label}, answerKey
        labels = list(row["choices"]["label"])
        return row["question"], list(row["choices"]["text"]), labels.index(row["answerKey"])
    raise ValueError(f"{where}: expected HellaSwag fields (ctx, endings, label) or ARC fields (question, choices, answerKey)")


def multiple_choice(model: Transformer, tok: Tokenizer, rows: list[dict], source: str = "") -> dict:
    """Pick the ending with the highest log-likelihood: raw, and per byte of the ending (length-normalised)."""
    items = []
    for number, row in enumerate(rows, 1):
        try:
            items.append(_choice_item(row, f"{source}:{number}"))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}:{number}: {e}") from None
    pairs = [([tok.bos_id, *tok.encode(ctx)], tok.encode(" " + ending)) for ctx, endings, _ in items for ending in endings]
    scores = iter(continuation_logprobs(model, pairs))
    raw, norm, chance = [], [], 0.0
    for ctx, endings, label in items:
        s = [next(scores) for _ in endings]
        per_byte = [x / max(1, len((" " + e).encode("utf-8"))) for x, e in zip(s, endings)]
        raw.append(max(range(len(s)), key=s.__getitem__) == label)
        norm.append(max(range(len(s)), key=per_byte.__getitem__) == label)
        chance += 1 / len(endings) / len(items)
    return {"raw": accuracy(raw, chance), "length_normalised": accuracy(norm, chance)}


@torch.inference_mode()
def shards_bits_per_byte(model: Transformer, shards_dir: str | Path, batch_size: int = 8) -> dict:
    """The validation split of a shard folder: every token after the first scored once, in context windows."""
    from .shards import load_split

    arrays, info = load_split(shards_dir, "val")
    window = model.cfg.max_seq_len
    pairs = []
    for array in arrays:
        ids = array.tolist()
        for start in range(0, len(ids) - 1, window):
            pairs.append((ids[start:start + 1], ids[start + 1:start + window + 1]))
    nll = -sum(continuation_logprobs(model, pairs, batch_size))
    n_tokens = sum(len(cont) for _, cont in pairs)
    return {"docs": info["docs"], "tokens": n_tokens, "bytes": info["bytes"], "loss": round(nll / max(1, n_tokens), 5),
            "bits_per_byte": round(nll / math.log(2) / max(1, info["bytes"]), 5)}


def evaluate_checkpoint(checkpoint: str | Path, texts: Sequence[str] = (), blimp: Sequence[str] = (),
                        choice: Sequence[str] = (), shards: str | None = None, max_items: int = 0) -> dict:
    """Run the asked evaluations (default: the run's validation shards) and merge them into eval.json."""
    from .checkpoint import find_checkpoint, load_checkpoint
    from .config import DataConfig
    from .corpus import read_documents
    from .io import read_json, write_json

    ckpt = find_checkpoint(checkpoint)
    model, tok, _ = load_checkpoint(ckpt)
    model.eval()
    results: dict = {}
    if not (texts or blimp or choice or shards):
        run_shards = ckpt.parents[2] / "shards" if len(ckpt.parents) > 2 else None
        shards = str(run_shards) if run_shards and (run_shards / "meta.json").is_file() else None
        if shards is None:
            raise ValueError(f"nothing to evaluate: give --text, --blimp or --choice files (no shards beside {ckpt})")
    if shards:
        results["validation_shards"] = shards_bits_per_byte(model, shards)
    for path in texts:
        docs = read_documents(DataConfig(corpus=[path]))
        results[f"text:{Path(path).name}"] = bits_per_byte(model, tok, (d.text for d in docs))
    for path in blimp:
        results[f"blimp:{Path(path).name}"] = minimal_pairs(model, tok, read_jsonl(path, max_items), str(path))
    for path in choice:
        results[f"choice:{Path(path).name}"] = multiple_choice(model, tok, read_jsonl(path, max_items), str(path))
    out = ckpt / "eval.json"
    merged = {**(read_json(out) if out.is_file() else {}), **results}
    write_json(out, merged)
    return results
