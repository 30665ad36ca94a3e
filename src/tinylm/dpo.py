"""Direct preference optimisation (Rafailov et al. 2023): preference pairs, their batches, the loss, the stage.

    tinylm dpo CKPT --out DIR [--dpo.corpus=pairs.jsonl] [--dpo.beta=0.1]

Pairs, JSON Lines, one a line:
    {"prompt": "...", "chosen": "...", "rejected": "..."}                     a user message and two replies
    {"prompt": [messages], "chosen": [{"role": "assistant", ...}], "rejected": [...]}   chat messages
    {"chosen": [messages], "rejected": [messages]}                            two conversations sharing all but the last (assistant) message
and `builtin`: one pair per built-in conversation (corpus.builtin_conversations), its first reply as
chosen and the first reply of another conversation (half the list away) as rejected.

The same training loop as pretraining and SFT (train.train), with a different loader and loss: a
batch holds B pairs as (B, 2, T) rows (chosen, rejected), targets only on the reply's tokens (the
reply and its turn end, as SFT's mask), and the objective is eq. 7 of the paper,
    -log sigmoid(beta [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]),
averaged over pairs, where log pi(y|x) is the sum of the reply tokens' log-probabilities and ref is
the starting checkpoint, frozen. With [lora] set, only adapters train.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import Config
from .conversations import SFTBatches, SFTRows, validate_messages
from .corpus import BUILTIN, CorpusError, builtin_conversations, corpus_files, files_fingerprint, is_validation, jsonl_records
from .data import EpochBatches
from .files import atomic_dir, hash_json, write_json
from .plan import RunPlan
from .prepare import _fresh, say
from .shards import token_dtype
from .tokenizer import Tokenizer
from .train import Runtime, setup_runtime, train

SIDES = ("chosen", "rejected")


# --- pairs ---------------------------------------------------------------------------------------
@dataclass
class Pair:
    prompt: list[dict]  # the messages before the reply
    chosen: str
    rejected: str
    source: str


def _reply(value, field: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant" \
            and isinstance(value[-1].get("content"), str):
        return value[-1]["content"]
    raise CorpusError(f"{where}: field {field!r} must be a string or messages ending with an assistant message")


def parse_pair(record, where: str) -> Pair:
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        raise CorpusError(f"{where}: expected an object with 'chosen' and 'rejected' (and 'prompt')")
    prompt = record.get("prompt")
    if prompt is None:  # two whole conversations that differ in their last message
        chosen, rejected = record["chosen"], record["rejected"]
        if not (isinstance(chosen, list) and isinstance(rejected, list) and chosen[:-1] == rejected[:-1]):
            raise CorpusError(f"{where}: without 'prompt', 'chosen' and 'rejected' must be message lists that share "
                              "every message but the last")
        prompt = chosen[:-1]
    elif isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    chosen, rejected = _reply(record["chosen"], "chosen", where), _reply(record["rejected"], "rejected", where)
    messages = validate_messages([*prompt, {"role": "assistant", "content": chosen}], f"{where}: field 'prompt'")
    return Pair(messages[:-1], chosen, rejected, where)


def builtin_pairs() -> Iterator[Pair]:
    """The real first reply of each built-in conversation against another conversation's first reply."""
    firsts = []
    for source, messages in builtin_conversations():
        i = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
        if i:
            firsts.append((source, messages[:i], messages[i]["content"]))
    n = len(firsts)
    for k, (source, prompt, reply) in enumerate(firsts):
        other = firsts[(k + n // 2) % n][2]
        if other.strip() != reply.strip():
            yield Pair(prompt, reply, other, f"{source}#pair")


def read_pairs(paths: Iterable[str]) -> Iterator[Pair]:
    paths = list(paths)
    if BUILTIN in paths:
        yield from builtin_pairs()
    for path in corpus_files(paths):
        if ".jsonl" not in path.name.lower():
            raise CorpusError(f"{path}: preference pairs must be JSON Lines (.jsonl or .jsonl.gz), one pair a line")
        for lineno, record in jsonl_records(path):
            yield parse_pair(record, f"{path}:{lineno}")


def render_reply(tok: Tokenizer, prompt: list[dict], reply: str) -> tuple[list[int], list[int]]:
    """Ids of prompt + reply and a mask on the reply's tokens only (earlier assistant turns are prompt)."""
    ids, mask = tok.render_chat([*prompt, {"role": "assistant", "content": reply}])
    prompt_ids, _ = tok.render_chat(prompt, add_generation_prompt=True)
    if ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat format does not render the prompt as a prefix of prompt + reply")
    return ids, [0] * len(prompt_ids) + mask[len(prompt_ids):]


def build_pair_shards(pairs: Iterable[Pair], tok: Tokenizer, out_dir: str | Path, max_tokens: int,
                      val_fraction: float, extra_meta: dict | None = None) -> dict:
    """`{split}_{side}_{ids,mask,offsets}.bin` in SFTRows' format, for split train/val and side chosen/rejected.

    A row longer than max_tokens is cut there; a pair with no reply token left on either side is dropped."""
    dtype = token_dtype(tok.vocab_size)
    counts = {s: {"pairs": 0, "truncated": 0, "dropped": 0, "reply_tokens": 0} for s in ("train", "val")}
    with atomic_dir(out_dir, "dpo-data", legacy=("meta.json",)) as tmp:
        files = {(s, side): {k: open(tmp / f"{s}_{side}_{k}.bin", "wb") for k in ("ids", "mask")}
                 for s in counts for side in SIDES}
        offsets = {key: [0] for key in files}
        for pair in pairs:
            split = "val" if is_validation(f"{pair.prompt}{pair.chosen}{pair.rejected}", val_fraction) else "train"
            rows = [render_reply(tok, pair.prompt, getattr(pair, side)) for side in SIDES]
            c = counts[split]
            c["truncated"] += sum(len(ids) > max_tokens for ids, _ in rows)
            rows = [(ids[:max_tokens], mask[:max_tokens]) for ids, mask in rows]
            if any(sum(mask[1:]) == 0 for _, mask in rows):
                c["dropped"] += 1
                continue
            for side, (ids, mask) in zip(SIDES, rows):
                np.asarray(ids, dtype=dtype).tofile(files[split, side]["ids"])
                np.asarray(mask, dtype=np.uint8).tofile(files[split, side]["mask"])
                offsets[split, side].append(offsets[split, side][-1] + len(ids))
                c["reply_tokens"] += sum(mask)
            c["pairs"] += 1
        for (split, side), handles in files.items():
            for f in handles.values():
                f.close()
            np.asarray(offsets[split, side], dtype=np.int64).tofile(tmp / f"{split}_{side}_offsets.bin")
        if counts["train"]["pairs"] == 0:
            raise ValueError("no training preference pairs")
        meta = {"dtype": dtype.name, "vocab_size": tok.vocab_size, "tokenizer_fingerprint": tok.fingerprint,
                "max_tokens": max_tokens, "splits": counts, **(extra_meta or {})}
        write_json(tmp / "meta.json", meta)
    return meta


class _Interleaved:
    """Chosen and rejected rows as one list: row 2i is pair i's chosen, row 2i + 1 its rejected."""

    def __init__(self, chosen: SFTRows, rejected: SFTRows):
        self.sides = (chosen, rejected)

    def row(self, j: int):
        return self.sides[j % 2].row(j // 2)


class PairBatches(SFTBatches):
    """B preference pairs a batch: inputs and targets (B, 2, T), [:, 0] chosen, [:, 1] rejected, padded as SFT
    rows are (targets only on the reply). Resumable like every loader (EpochBatches)."""

    def __init__(self, chosen: SFTRows, rejected: SFTRows, seq_len: int, batch_size: int, pad_id: int, seed: int = 0,
                 rank: int = 0, world: int = 1, shuffle: bool = True):
        if len(chosen) < world * batch_size:
            raise ValueError(f"{len(chosen)} preference pairs; one step needs {world * batch_size} "
                             f"(batch {batch_size} x {world} ranks): use more pairs or a smaller batch")
        self.rows, self.seq_len, self.pad_id = _Interleaved(chosen, rejected), seq_len, pad_id
        EpochBatches.__init__(self, len(chosen), batch_size, seed, rank, world, shuffle)

    @classmethod
    def load(cls, folder: Path, split: str, *args, **kwargs) -> "PairBatches":
        return cls(*(SFTRows.load(folder, f"{split}_{side}") for side in SIDES), *args, **kwargs)

    def fetch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().fetch([2 * i + side for i in indices for side in (0, 1)])  # (2B, T)
        return x.view(len(indices), 2, -1), y.view(len(indices), 2, -1)  # (B, 2, T)


# --- the loss ------------------------------------------------------------------------------------
def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of log p(target) over the positions whose target is not -100: logits (N, T, V), targets (N, T) -> (N,)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, T, V)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (N, T)
    return (picked * (targets != -100)).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. 7 of Rafailov et al. (2023), per pair: -log sigmoid(beta (chosen log-ratio - rejected log-ratio))."""
    return -F.logsigmoid(beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)))


def pair_logprobs(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, 2) summed reply log-probabilities of (B, 2, T) pairs."""
    B, _, T = x.shape
    logits, _ = model(x.reshape(2 * B, T))  # (2B, T, V)
    return sequence_logprobs(logits, y.reshape(2 * B, T)).view(B, 2)


class PreferenceLoss:
    """The training loop's objective for DPO (train.NextTokenLoss's interface): the mean DPO loss of the
    batch's pairs against a frozen reference model; micro-batches and ranks weigh by their pairs."""

    def __init__(self, reference: torch.nn.Module, beta: float):
        self.reference, self.beta = reference.eval().requires_grad_(False), beta

    def count(self, y: torch.Tensor) -> int:
        return y.shape[0]

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        policy = pair_logprobs(model, x, y)
        with torch.no_grad():
            ref = pair_logprobs(self.reference, x, y)
        return dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], self.beta).mean()


@torch.no_grad()
def preference_accuracy(policy: torch.nn.Module, reference: torch.nn.Module, batches: PairBatches,
                        device: torch.device, batch_size: int = 16) -> dict:
    """Over every pair of `batches`: the share with a positive reward margin (the implicit reward,
    log pi - log ref, higher for the chosen reply: 0 for the reference itself), the share whose chosen
    reply the policy itself finds likelier, and the mean margin."""
    policy.eval()
    margins, prefers = [], []
    for start in range(0, batches.n_windows, batch_size):
        x, y = batches.fetch(list(range(start, min(start + batch_size, batches.n_windows))))
        x, y = x.to(device), y.to(device)
        pol, ref = pair_logprobs(policy, x, y), pair_logprobs(reference, x, y)
        margins.append((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1]))
        prefers.append(pol[:, 0] > pol[:, 1])
    margin, prefer = torch.cat(margins), torch.cat(prefers)
    return {"pairs": len(margin), "reward_accuracy": round((margin > 0).float().mean().item(), 4),
            "policy_prefers_chosen": round(prefer.float().mean().item(), 4), "mean_margin": round(margin.mean().item(), 4)}


# --- the stage -----------------------------------------------------------------------------------
def pairs_data_stage(cfg: Config, checkpoint: Path, out_dir: Path) -> Path:
    """Render cfg.dpo.corpus with the checkpoint's tokenizer into pair shards (skipped when up to date)."""
    from .checkpoint import checkpoint_model_config

    tok = Tokenizer.load(checkpoint)
    max_tokens = checkpoint_model_config(checkpoint).max_seq_len + 1
    inputs_hash = hash_json({"corpus": files_fingerprint(cfg.dpo.corpus), "val_fraction": cfg.dpo.val_fraction,
                             "tokenizer": tok.fingerprint, "max_tokens": max_tokens, "format": "dpo-pairs/1"})
    if _fresh(out_dir, inputs_hash):
        say(f"dpo data: up to date in {out_dir}")
        return out_dir
    say(f"dpo data: rendering preference pairs from {', '.join(cfg.dpo.corpus)}")
    meta = build_pair_shards(read_pairs(cfg.dpo.corpus), tok, out_dir, max_tokens, cfg.dpo.val_fraction,
                             extra_meta={"inputs_hash": inputs_hash, "corpus": cfg.dpo.corpus})
    for split, c in meta["splits"].items():
        say(f"dpo data: {split} {c['pairs']:,} pairs ({c['truncated']} rows cut at the context, {c['dropped']} "
            f"dropped with no reply left), {c['reply_tokens']:,} reply tokens")
    return out_dir


def dpo(cfg: Config, init_checkpoint: str | Path, out_dir: str | Path, rt: Runtime | None = None,
        plan: RunPlan | None = None) -> dict:
    """Align a checkpoint on preference pairs with the training loop; resumes like every stage. Held-out
    preference accuracy before and after goes to out_dir/preference_eval.json. Within `tinylm run`,
    `plan` times the stage and gives it its max_time."""
    from .checkpoint import find_checkpoint, load_checkpoint
    from .pipeline import VAL_SEED, fine_tuning_start

    init_checkpoint, out_dir = find_checkpoint(init_checkpoint), Path(out_dir)
    rt = rt or setup_runtime(cfg.stage_train("dpo"))
    data_dir = out_dir / "data"
    cfg = fine_tuning_start(cfg, "dpo", init_checkpoint, out_dir, rt,
                            lambda: pairs_data_stage(cfg, init_checkpoint, data_dir), plan)
    tc, tok = cfg.train, Tokenizer.load(init_checkpoint)
    seq, batch = cfg.model.max_seq_len, tc.batch_size
    batches = PairBatches.load(data_dir, "train", seq, batch, tok.pad_id, tc.seed, rt.rank, rt.world)
    val_pairs = len(SFTRows.load(data_dir, "val_chosen"))
    make_val = None
    if val_pairs >= rt.world * batch:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(tc, eval_batches=min(tc.eval_batches, val_pairs // (rt.world * batch))))
        make_val = lambda: PairBatches.load(data_dir, "val", seq, batch, tok.pad_id, VAL_SEED, rt.rank, rt.world)  # noqa: E731
    elif rt.is_main:
        say(f"dpo: only {val_pairs} held-out pairs: no validation loss or preference accuracy")
    reference, _, _ = load_checkpoint(init_checkpoint, rt.device)
    summary = train(cfg, out_dir, rt, batches, make_val, init_checkpoint, stage="dpo",
                    objective=PreferenceLoss(reference, cfg.dpo.beta))
    if rt.is_main and make_val is not None:
        held_out = PairBatches.load(data_dir, "val", seq, 1, tok.pad_id, shuffle=False)
        policy, _, _ = load_checkpoint(summary["checkpoint"], rt.device)
        scores = {"start": preference_accuracy(reference, reference, held_out, rt.device),
                  "end": preference_accuracy(policy, reference, held_out, rt.device), "beta": cfg.dpo.beta,
                  "checkpoint": summary["checkpoint"]}
        write_json(out_dir / "preference_eval.json", scores)
        for when in ("start", "end"):
            s = scores[when]
            say(f"dpo: held-out {s['pairs']} pairs at the {when}: reward margin > 0 for {s['reward_accuracy']:.1%}, "
                f"policy prefers the chosen reply for {s['policy_prefers_chosen']:.1%} (mean margin {s['mean_margin']:.3f})")
        summary["preference"] = scores
    return summary
