"""Autoregressive decoding with a KV cache. Token ids in, token ids out: no text here.

The prompt is prefilled in one forward pass; each new token then costs one single-position pass
over the cache. Sampling: repetition penalty, temperature (0 = greedy), top-k, top-p.

How a pass runs depends on the device (`forward_step`): on a CPU over the packed matrices of
decoding.py (one row's product is bound by reading the weights); on a GPU, where a single-position
pass launches a few hundred small kernels and launching them from Python takes longer than running
them, it is captured once per generation as a CUDA graph (`GraphedDecodeStep`) and replayed for
every token, one launch per step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from .config import SampleConfig
from .decoding import packed_forward, packed_weights
from .model import KVCache, Transformer


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
    """Keep the smallest set of tokens whose probability reaches p, and always the most likely one
    (so p = 0 keeps just that token, as llama.cpp's min_keep=1 does)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each token
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


GREEDY_BELOW = 1e-5
"""A temperature under this samples as greedy: dividing float32 logits by ~1e-38 overflows to inf and
the softmax to NaN, and long before that the distribution is one token (llama.cpp: temp <= 0 is greedy)."""


def sample_next(logits: torch.Tensor, seen: torch.Tensor, sc: SampleConfig,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: (B, V) -> next ids (B,)."""
    logits = apply_repetition_penalty(logits.float(), seen, sc.repetition_penalty)
    if sc.temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    logits = filter_top_p(filter_top_k(logits / sc.temperature, sc.top_k), sc.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def make_generator(seed: int, device: torch.device) -> torch.Generator | None:
    """A generator seeded with `seed` (0 to 2**64-1), or None (the global, random one) for seed -1."""
    if seed < 0:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def forward_step(model: Transformer, cache: KVCache):
    """ids (B, T) -> logits (B, T, V) after the cached positions: over the packed matrices on a CPU,
    the model's own forward elsewhere."""
    packed = packed_weights(model)
    if packed is not None:
        return lambda ids: packed_forward(model, packed, ids, cache)
    return lambda ids: model(ids, cache=cache)[0]


class GraphedDecodeStep:
    """`model(ids (B, 1), cache)` -> logits (B, 1, V), captured as one CUDA graph and replayed.

    The cache is switched to static mode (model.KVCache), so that every step reads and writes the
    same addresses; the token ids go in through a fixed input buffer. Capturing follows PyTorch's
    recipe (torch.cuda.graphs): one warm-up pass on a side stream, then the capture. Both run the
    forward's Python code, which writes a key/value slot that the first real step overwrites and
    moves the positions on; they are put back afterwards.
    """

    def __init__(self, model: Transformer, cache, batch_size: int):
        self.cache, start = cache, cache.pos
        cache.make_static()
        device = cache.k.device
        self.ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            model(self.ids, cache=cache)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, _ = model(self.ids, cache=cache)  # (B, 1, V), rewritten by every replay
        cache.pos = start
        cache.positions.fill_(start)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.graph.replay()
        self.cache.pos += 1
        return self.logits


@torch.inference_mode()
def generate_ids(model: Transformer, prompts: Sequence[Sequence[int]] | torch.Tensor, sc: SampleConfig,
                 stop_ids: Sequence[int] = (), max_new_tokens: int | None = None,
                 cuda_graph: bool = True,
                 observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence, (B,) per step, until all hit a stop id or the limit.

    Prompts in one batch must have the same length. Sequences that stopped keep yielding their
    stop id so the batch stays rectangular; the caller cuts at the first stop. On a GPU the
    decoding step is a CUDA graph unless `cuda_graph=False` (the eager reference for tests).
    `observe(logits (B, V), next ids (B,))`, if given, sees the model's raw logits of every step.
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

    forward = forward_step(model, cache)
    logits = forward(idx)  # prefill: (B, T, V)
    step = GraphedDecodeStep(model, cache, B) if cuda_graph and device.type == "cuda" and budget > 1 else forward
    for _ in range(budget):
        nxt = sample_next(logits[:, -1], seen, sc, generator)
        if observe is not None:
            observe(logits[:, -1], nxt)
        if len(stops):
            nxt = torch.where(done, stops[0], nxt)
            done |= torch.isin(nxt, stops)
        yield nxt
        if len(stops) and bool(done.all()):  # the only host sync per token, and only with stop ids
            return
        seen.scatter_(1, nxt[:, None], True)
        logits = step(nxt[:, None])  # (B, 1, V)


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
