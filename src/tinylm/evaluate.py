"""How good is a checkpoint: bits-per-byte on text, minimal pairs (BLiMP), multiple choice (HellaSwag,
ARC), and the assistant-token loss of held-out conversations (chat).

Every score comes with its number of items, a 95% interval and the chance level. Bits-per-byte
divides the summed negative log-likelihood (in bits) by the UTF-8 bytes of the text, so models
with different tokenizers can be compared. All scoring goes through one function,
`masked_logprobs`: the log-probability of the marked tokens of a sequence given the tokens before them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
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


def no_score(items: str, why: str) -> dict:
    """The result of a task with nothing to score: no value (a mean over nothing is not 0), and why."""
    return {"n": 0, "items": items, "score": None, "why": why}


def accuracy(correct: Sequence[bool], chance: float) -> dict:
    k, n = sum(correct), len(correct)
    if n == 0:
        return {**no_score("items", "no items to score"), "accuracy": None, "ci95": None, "chance": round(chance, 4)}
    low, high = wilson_interval(k, n)
    return {"accuracy": round(k / n, 4) if n else None, "ci95": [round(low, 4), round(high, 4)], "n": n,
            "chance": round(chance, 4)}


def bootstrap_ratio(numerators: Sequence[float], denominators: Sequence[float], resamples: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of sum(num) / sum(den), resampling items (documents, windows,
    conversations) with replacement."""
    num, den = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    if len(num) < 2:
        ratio = float(num.sum() / max(den.sum(), 1e-12))
        return (ratio, ratio)
    picks = np.random.default_rng(seed).integers(0, len(num), size=(resamples, len(num)))
    ratios = num[picks].sum(axis=1) / np.maximum(den[picks].sum(axis=1), 1e-12)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return (float(low), float(high))


@torch.inference_mode()
def masked_logprobs(model: Transformer, rows: Sequence[tuple[Sequence[int], Sequence[int]]],
                    batch_size: int = 16) -> list[tuple[float, int]]:
    """For each (ids, mask): the sum of log p(ids[t] | ids[:t]) over positions t >= 1 with mask[t] set,
    and how many such positions there are.

    Rows longer than the context window lose their oldest tokens. Batches are padded on the right;
    padding is never scored (causal attention: no scored token sees it).
    """
    device = model.tok_embeddings.weight.device
    limit = model.cfg.max_seq_len + 1
    out: list[tuple[float, int]] = []
    for start in range(0, len(rows), batch_size):
        chunk = [(list(ids)[-limit:], list(mask)[-limit:]) for ids, mask in rows[start:start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        scored = torch.zeros(len(chunk), width, dtype=torch.bool)
        for i, (row_ids, row_mask) in enumerate(chunk):
            ids[i, :len(row_ids)] = torch.tensor(row_ids)
            scored[i, :len(row_mask)] = torch.tensor(row_mask, dtype=torch.bool)
        logits, _ = model(ids[:, :-1].to(device))
        logp = F.log_softmax(logits.float(), dim=-1)
        token_logp = logp.gather(-1, ids[:, 1:, None].to(device)).squeeze(-1).cpu()  # (B, width - 1)
        keep = scored[:, 1:]
        for i in range(len(chunk)):
            out.append((token_logp[i][keep[i]].sum().item(), int(keep[i].sum())))
    return out


def continuation_logprobs(model: Transformer, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                          batch_size: int = 16) -> list[float]:
    """For each (context, continuation): sum of log p(continuation tokens | everything before them)."""
    rows = [([*ctx, *cont], [0] * len(ctx) + [1] * len(cont)) for ctx, cont in pairs]
    return [logp for logp, _ in masked_logprobs(model, rows, batch_size)]


def _windows(ids: Sequence[int], window: int) -> Iterator[tuple[Sequence[int], list[int]]]:
    """Consecutive (ids, mask) rows of window + 1 tokens overlapping by one: every token after the
    first is scored exactly once, with the tokens before it in its window as context."""
    for start in range(0, len(ids) - 1, window):
        piece = ids[start:start + window + 1]
        yield piece, [0] + [1] * (len(piece) - 1)


def _text_score(nll: Sequence[float], tokens: Sequence[int], n_bytes: Sequence[int], vocab: int, items: str,
                empty: str = "nothing to score") -> dict:
    """Loss per token and bits per byte with bootstrap intervals over `items`, and a uniform model's figures;
    with no token to score, no figures and `empty` as the reason."""
    if sum(tokens) == 0:
        return {**no_score(items, empty), "tokens": 0, "bytes": int(sum(n_bytes)), "loss": None, "bits_per_byte": None,
                "ci95": None, "chance": None}
    total_nll, total_tokens, total_bytes = float(sum(nll)), max(1, sum(tokens)), max(1, sum(n_bytes))
    low, high = bootstrap_ratio(nll, n_bytes)
    return {"n": len(nll), "items": items, "tokens": int(sum(tokens)), "bytes": int(sum(n_bytes)),
            "loss": round(total_nll / total_tokens, 5),
            "bits_per_byte": round(total_nll / math.log(2) / total_bytes, 5),
            "ci95": [round(low / math.log(2), 5), round(high / math.log(2), 5)],
            "chance": round(math.log2(vocab) * total_tokens / total_bytes, 5)}


# --- bits per byte on plain text ------------------------------------------------------------------
def bits_per_byte(model: Transformer, tok: Tokenizer, texts: Iterable[str], batch_size: int = 8,
                  source: str = "the texts") -> dict:
    """Every token of every document after its <|bos|> is scored once, in windows of the context length;
    the interval resamples documents. No document (or none with a token after <|bos|>): no score."""
    window = model.cfg.max_seq_len
    rows, doc_of, n_bytes = [], [], []
    for doc, text in enumerate(texts):
        for row in _windows(tok.encode_document(text), window):
            rows.append(row)
            doc_of.append(doc)
        n_bytes.append(len(text.encode("utf-8")))
    nll, tokens = [0.0] * len(n_bytes), [0] * len(n_bytes)
    for doc, (logp, count) in zip(doc_of, masked_logprobs(model, rows, batch_size)):
        nll[doc] -= logp
        tokens[doc] += count
    return _text_score(nll, tokens, n_bytes, model.cfg.vocab_size, "documents",
                       f"{source}: no document with text to score")


# --- task files -----------------------------------------------------------------------------------
def spread(n: int, limit: int) -> list[int]:
    """`limit` indices of n items spread evenly over them (j * n // limit), all of them when
    `limit` is 0 or n or more. Task files and held-out splits are often in order (BLiMP by
    phenomenon, a corpus by source), so a capped evaluation that takes the first items scores a
    corner of the task: the first 200 of the default run's 656 validation windows scored 1.554
    bits/byte where all of them score 1.540."""
    if not limit or limit >= n:
        return list(range(n))
    return [j * n // limit for j in range(limit)]


def read_jsonl(path: str | Path, limit: int = 0) -> list[dict]:
    """`limit` records (0 = all) of a task file, spread evenly over it; errors name the file and line."""
    from .corpus import jsonl_records

    rows = [record for _, record in jsonl_records(path)]
    return [rows[i] for i in spread(len(rows), limit)]


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
    """Pick the ending with the highest log-likelihood, three ways:

    - "raw": the summed log-likelihood of the ending's tokens (lm-evaluation-harness's `acc`);
    - "length_normalised" (ours): divided by the UTF-8 bytes of the ending as scored, with its
      leading space, the unit of bits-per-byte, so it does not depend on the tokenizer;
    - "lm_eval_acc_norm": divided by the characters (code points) of the ending without the leading
      space, as lm-evaluation-harness's `acc_norm` does (`completion_len = len(choice)` in
      `ConfigurableTask.process_results`): the figure published scores report.
    The two normalisations differ only where endings differ in non-ASCII characters or by the space."""
    items = []
    for number, row in enumerate(rows, 1):
        try:
            items.append(_choice_item(row, f"{source}:{number}"))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}:{number}: {e}") from None
    pairs = [([tok.bos_id, *tok.encode(ctx)], tok.encode(" " + ending)) for ctx, endings, _ in items for ending in endings]
    scores = iter(continuation_logprobs(model, pairs))
    raw, norm, lm_eval, chance = [], [], [], 0.0
    for ctx, endings, label in items:
        s = [next(scores) for _ in endings]
        per_byte = [x / max(1, len((" " + e).encode("utf-8"))) for x, e in zip(s, endings)]
        per_char = [x / max(1, len(e)) for x, e in zip(s, endings)]
        raw.append(max(range(len(s)), key=s.__getitem__) == label)
        norm.append(max(range(len(s)), key=per_byte.__getitem__) == label)
        lm_eval.append(max(range(len(s)), key=per_char.__getitem__) == label)
        chance += 1 / len(endings) / len(items)
    return {"raw": accuracy(raw, chance), "length_normalised": accuracy(norm, chance),
            "lm_eval_acc_norm": accuracy(lm_eval, chance)}


def shards_bits_per_byte(model: Transformer, shards_dir: str | Path, batch_size: int = 8, max_windows: int = 0) -> dict:
    """The validation split of a shard folder: every token after the first scored once, in context windows.

    Shards keep no document boundaries' byte counts, so each window is given the split's average
    bytes per token; the interval resamples windows. `max_windows` takes that many spread evenly
    over the split (`spread`; 0 = all)."""
    from .shards import load_split

    arrays, info = load_split(shards_dir, "val")
    per_token = info["bytes"] / max(1, sum(max(0, len(a) - 1) for a in arrays))  # the split's bytes per scored token
    window = model.cfg.max_seq_len
    ends = np.cumsum([max(0, -(-(len(a) - 1) // window)) for a in arrays])  # windows up to each array's end
    rows = []
    for k in spread(int(ends[-1]) if len(ends) else 0, max_windows):
        i = int(np.searchsorted(ends, k, side="right"))
        start = (k - (int(ends[i - 1]) if i else 0)) * window
        piece = arrays[i][start:start + window + 1]
        rows.append((piece.tolist(), [0] + [1] * (len(piece) - 1)))
    scored = masked_logprobs(model, rows, batch_size)
    tokens = [count for _, count in scored]
    return _text_score([-logp for logp, _ in scored], tokens, [count * per_token for count in tokens],
                       model.cfg.vocab_size, "windows",
                       f"the validation split of {shards_dir} is empty ({info.get('docs', 0)} documents held out: "
                       "the corpus is too small for data.val_fraction to hold one out)")


@torch.inference_mode()
def position_losses(model: Transformer, shards_dir: str | Path, batch_size: int = 16, max_windows: int = 0) -> list[float]:
    """Mean held-out loss (nats) of the t-th scored token of a window, t = 1 .. model.max_seq_len: the
    validation split's full windows as `shards_bits_per_byte` scores them (the t-th predicted from t
    tokens). How much a token gains from the context before it; `sizing.fit_positions` fits it.
    ValueError if the split holds no full window. `max_windows`: that many, spread evenly (0 = all)."""
    from .shards import load_split

    arrays, _ = load_split(shards_dir, "val")
    window = model.cfg.max_seq_len
    rows = [ids for a in arrays for ids, _ in _windows(a, window) if len(ids) == window + 1]
    rows = [list(map(int, rows[i])) for i in spread(len(rows), max_windows)]
    if not rows:
        raise ValueError(f"the validation split of {shards_dir} holds no full window of {window + 1} tokens")
    device = model.tok_embeddings.weight.device
    total = torch.zeros(window, dtype=torch.float64)
    for start in range(0, len(rows), batch_size):
        ids = torch.tensor(rows[start:start + batch_size], dtype=torch.long, device=device)
        logits, _ = model(ids[:, :-1])
        nll = -F.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, window)
        total += nll.sum(0).double().cpu()
    return (total / len(rows)).tolist()


def chat_loss(model: Transformer, rows: Sequence[tuple[Sequence[int], Sequence[int]]], items: str = "conversations") -> dict:
    """Held-out conversations: mean loss on the assistant tokens only (what SFT trains), with a
    bootstrap interval over conversations; chance is a uniform guess over the vocabulary."""
    scored = [(-logp, count) for logp, count in masked_logprobs(model, rows) if count]
    if not scored:
        return {**no_score(items, f"no {items} with assistant tokens to score"), "assistant_tokens": 0, "loss": None,
                "ci95": None, "chance": None}
    nll, counts = [x for x, _ in scored], [n for _, n in scored]
    loss = sum(nll) / max(1, sum(counts))
    low, high = bootstrap_ratio(nll, counts)
    return {"n": len(scored), "items": items, "assistant_tokens": int(sum(counts)),
            "loss": round(loss, 5), "ci95": [round(low, 5), round(high, 5)], "perplexity": round(math.exp(loss), 3),
            "chance": round(math.log(model.cfg.vocab_size), 5)}


def _conversation_rows(tok: Tokenizer, paths: Sequence[str], limit: int) -> list[tuple[list[int], list[int]]]:
    from .conversations import read_conversations

    convs = list(read_conversations(paths))
    return [tok.render_chat(convs[i].messages) for i in spread(len(convs), limit)]


def _sft_val_rows(data_dir: Path, limit: int) -> list[tuple[list[int], list[int]]]:
    from .conversations import SFTRows

    val = SFTRows.load(data_dir, "val")
    return [tuple(a.tolist() for a in val.row(i)) for i in spread(len(val), limit)]


def read_choice_task(spec: str, limit: int = 0) -> list[dict]:
    """A local JSONL file, or a Hugging Face dataset in the collect syntax (`Rowan/hellaswag`,
    `allenai/ai2_arc/ARC-Easy?split=test`; the split defaults to validation), streamed; `limit`
    items spread evenly over it (0 = all)."""
    if Path(spec).is_file():
        return read_jsonl(spec, limit)
    from datasets import load_dataset

    from .corpus import parse_hf_spec

    name, config, options = parse_hf_spec(spec)
    split = options.pop("split", "validation")
    rows = [dict(row) for row in load_dataset(name, config, split=split, streaming=True, **options)]
    return [rows[i] for i in spread(len(rows), limit)]


def evaluate_checkpoint(checkpoint: str | Path, texts: Sequence[str] = (), blimp: Sequence[str] = (),
                        choice: Sequence[str] = (), shards: str | None = None, max_items: int = 0,
                        chat: Sequence[str] = (), defaults: bool | None = None, device: str = "auto") -> dict:
    """Run the asked evaluations and merge them into CKPT/eval.json. The defaults (taken when nothing
    is asked, or `defaults=True`): the run's validation shards, and for a fine-tuned checkpoint its
    held-out conversations too. `max_items` bounds every task (0 = all). `device` as `train.device`
    ("auto": a GPU where there is one)."""
    from .checkpoint import find_checkpoint, load_checkpoint
    from .config import DataConfig
    from .corpus import read_documents
    from .files import read_json, write_json
    from .device import pick_device
    from .layout import RunLayout, sft_data, stage_dir

    ckpt = find_checkpoint(checkpoint)
    model, tok, meta = load_checkpoint(ckpt, pick_device(device))
    model.eval()
    results: dict = {}
    held_out_chats = None
    if defaults or (defaults is None and not (texts or blimp or choice or shards or chat)):
        run, stage = RunLayout.of_checkpoint(ckpt), stage_dir(ckpt)
        if run is not None and (run.shards / "meta.json").is_file():
            shards = str(run.shards)
        if meta["trainer"].get("stage") == "sft" and stage is not None and (sft_data(stage) / "meta.json").is_file():
            held_out_chats = sft_data(stage)
        if shards is None and held_out_chats is None and not defaults:
            raise ValueError(f"nothing to evaluate: give --text, --blimp, --choice or --chat files (no shards beside {ckpt})")
    if shards:
        results["validation_shards"] = shards_bits_per_byte(model, shards, max_windows=max_items)
    if held_out_chats:
        results["chat:held-out"] = chat_loss(model, _sft_val_rows(held_out_chats, max_items), "conversation pieces")
    for path in chat:
        results[f"chat:{Path(path).name}"] = chat_loss(model, _conversation_rows(tok, [path], max_items))
    for path in texts:
        docs = read_documents(DataConfig(corpus=[path]))
        results[f"text:{Path(path).name}"] = bits_per_byte(model, tok, (d.text for d in docs), source=str(path))
    for path in blimp:
        results[f"blimp:{Path(path).name}"] = minimal_pairs(model, tok, read_jsonl(path, max_items), str(path))
    for spec in choice:
        name = Path(spec).name if Path(spec).is_file() else spec
        results[f"choice:{name}"] = multiple_choice(model, tok, read_choice_task(spec, max_items), spec)
    out = ckpt / "eval.json"
    merged = {**(read_json(out) if out.is_file() else {}), **results}
    write_json(out, merged)
    return results


def score_table(results: dict) -> list[dict]:
    """One row per score (task, metric, value, interval, items, chance) for printing and the run report;
    a task with nothing to score has value None and `why` says so."""
    rows = []
    for name, r in results.items():
        why = {"why": r["why"]} if r.get("why") else {}
        if "bits_per_byte" in r:
            rows.append({"task": name, "metric": "bits/byte", "value": r["bits_per_byte"], "ci95": r.get("ci95"),
                         "n": f"{r['n']:,} {r['items']}" if "n" in r else f"{r['tokens']:,} tokens",
                         "chance": r.get("chance"), **why})
        elif "assistant_tokens" in r:
            rows.append({"task": name, "metric": "assistant loss (nats/token)", "value": r["loss"], "ci95": r["ci95"],
                         "n": f"{r['n']:,} {r['items']}", "chance": r["chance"], **why})
        for label, acc in ([("accuracy", r)] if "accuracy" in r else
                           [(f"accuracy {k}", v) for k, v in r.items() if isinstance(v, dict) and "accuracy" in v]):
            rows.append({"task": name, "metric": label.replace("_", "-"), "value": acc["accuracy"], "ci95": acc["ci95"],
                         "n": f"{acc['n']:,} items", "chance": acc["chance"], **({"why": acc["why"]} if acc.get("why") else {})})
    return rows


def format_score(row: dict) -> str:
    if row["value"] is None:
        return f"{row['task']}: {row['metric']}: no score, n=0: {row.get('why', 'nothing to score')}"
    ci = f" (95% CI {row['ci95'][0]:.3f}-{row['ci95'][1]:.3f}" if row.get("ci95") else " ("
    chance = f", chance {row['chance']:.3f})" if row.get("chance") is not None else ")"
    return f"{row['task']}: {row['metric']} {row['value']:.4f}{ci}, n={row['n']}{chance}"
