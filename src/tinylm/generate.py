"""Autoregressive decoding with a KV cache. Token ids in, token ids out: no text here.

The prompt is prefilled in one forward pass; each new token then costs one single-position pass
over the cache. Sampling: repetition penalty, temperature (0 = greedy), top-k, top-p.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .config import SampleConfig
from .model import Transformer


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: for tokens already present, divide positive logits and multiply negative ones."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches p (always at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each token
    drop_sorted = before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, seen: torch.Tensor, sc: SampleConfig,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: (B, V) -> next ids (B,)."""
    logits = apply_repetition_penalty(logits.float(), seen, sc.repetition_penalty)
    if sc.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = filter_top_p(filter_top_k(logits / sc.temperature, sc.top_k), sc.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def make_generator(seed: int, device: torch.device) -> torch.Generator | None:
    if not seed:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


@torch.inference_mode()
def generate_ids(model: Transformer, prompts: Sequence[Sequence[int]] | torch.Tensor, sc: SampleConfig,
                 stop_ids: Sequence[int] = (), max_new_tokens: int | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence, (B,) per step, until all hit a stop id or the limit.

    Prompts in one batch must have the same length. Sequences that stopped keep yielding their
    stop id so the batch stays rectangular; the caller cuts at the first stop.
    """
    device = model.tok_embeddings.weight.device
    idx = torch.as_tensor(prompts, dtype=torch.long, device=device)
    if idx.dim() == 1:
        idx = idx[None]
    B, T = idx.shape
    if T == 0:
        raise ValueError("empty prompt: pass at least one token (e.g. the tokenizer's <|bos|>)")
    max_len = model.cfg.max_seq_len
    if T >= max_len:
        raise ValueError(f"prompt of {T} tokens leaves no room in the {max_len}-token context")
    budget = min(max_new_tokens if max_new_tokens is not None else sc.max_new_tokens, max_len - T)
    generator = make_generator(sc.seed, device)
    cache = model.new_cache(B, T + budget)
    seen = torch.zeros(B, model.cfg.vocab_size, dtype=torch.bool, device=device)
    seen.scatter_(1, idx, True)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)

    logits, _ = model(idx, cache=cache)  # prefill: (B, T, V)
    for _ in range(budget):
        nxt = sample_next(logits[:, -1], seen, sc, generator)
        if len(stops):
            nxt = torch.where(done, stops[0], nxt)
            done |= torch.isin(nxt, stops)
        yield nxt
        if len(stops) and bool(done.all()):  # the only host sync per token, and only with stop ids
            return
        seen.scatter_(1, nxt[:, None], True)
        logits, _ = model(nxt[:, None], cache=cache)  # (B, 1, V)


@torch.inference_mode()
def generate_ids_no_cache(model: Transformer, prompt: Sequence[int], sc: SampleConfig,
                          stop_ids: Sequence[int] = ()) -> list[int]:
    """Reference decoder: recompute the whole sequence every step. Slow; for tests and benchmarks."""
    device = model.tok_embeddings.weight.device
    ids = torch.as_tensor([list(prompt)], dtype=torch.long, device=device)
    generator = make_generator(sc.seed, device)
    seen = torch.zeros(1, model.cfg.vocab_size, dtype=torch.bool, device=device)
    seen.scatter_(1, ids, True)
    out: list[int] = []
    for _ in range(min(sc.max_new_tokens, model.cfg.max_seq_len - ids.size(1))):
        logits, _ = model(ids)
        nxt = sample_next(logits[:, -1], seen, sc, generator)
        out.append(int(nxt))
        if int(nxt) in stop_ids:
            break
        seen.scatter_(1, nxt[:, None], True)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return out
