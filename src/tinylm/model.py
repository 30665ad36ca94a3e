"""A LLaMA-style decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

The layout and the rotary convention (rotate the two halves of each head) match Hugging Face's
`LlamaForCausalLM`, so export is a renaming of weights. No I/O, logging or parallelism here; the
layout a CPU decodes with is decoding.py's, and which attention kernel training uses, train.py's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import OUTSIDE, applies as chunked_applies, chunked_causal_attention
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32: under bf16 the mean of squares loses too many bits
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.type_as(x)


def rope_tables(head_dim: int, max_len: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (max_len, head_dim), each frequency repeated for the two halves."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (T, D). Rotates pairs (i, i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class KVCache:
    """Preallocated key/value buffers for every layer; `pos` is the number of cached positions.

    After `make_static()` the cache takes one position per forward at `positions`, a tensor on the
    device that `advance` moves on, and attention reads the whole buffer under a mask: every shape
    and address stays fixed from step to step, so a step can be replayed as a CUDA graph.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (cfg.n_layers, batch_size, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0
        self.positions: torch.Tensor | None = None  # (1,) long: the next position, in static mode

    def make_static(self) -> None:
        """Switch to static decoding from the current position on (see the class docstring)."""
        self.positions = torch.tensor([self.pos], dtype=torch.long, device=self.k.device)

    def rope_and_mask(self, T: int, cos: torch.Tensor, sin: torch.Tensor):
        """The rotary tables (T, D) of the next T positions, and the attention mask of T new queries
        against the cache (None where `is_causal` or no mask is right)."""
        if self.pos + T > len(cos):  # the tables are model.max_seq_len long
            raise ValueError(f"sequence of {self.pos + T} tokens exceeds model.max_seq_len={len(cos)}")
        if self.positions is not None:  # one token at a device-side position: no shape depends on it
            if T != 1:
                raise ValueError(f"a static KV cache takes one token per sequence per step, not {T}")
            visible = torch.arange(self.max_len, device=cos.device) <= self.positions
            return cos[self.positions], sin[self.positions], visible.view(1, 1, 1, -1)
        start = self.pos
        mask = None
        if start > 0 and T > 1:  # a chunk after a cached prefix: query i sees all cached keys and the chunk up to i
            mask = torch.ones(T, start + T, dtype=torch.bool, device=cos.device).tril(diagonal=start)
        return cos[start:start + T], sin[start:start + T], mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, Hkv, T, D) at the current position; return everything cached so far
        (static mode: the whole buffer, (B, Hkv, max_len, D), read under the mask of `rope_and_mask`)."""
        if self.positions is not None:
            self.k[layer].index_copy_(2, self.positions, k)
            self.v[layer].index_copy_(2, self.positions, v)
            return self.k[layer], self.v[layer]
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, T: int) -> None:
        """T positions were written by every layer."""
        self.pos += T
        if self.positions is not None:
            self.positions.add_(T)


ATTENTION_KERNELS = ("sdpa", "chunked")

# Attention patterns a head can be guided to while training (Transformer.set_guidance):
#   previous:  each query attends to the token before it;
#   induction: each query attends to the positions that follow an earlier occurrence of its own token
#              (A B ... A -> B), where there is one: the pattern of an induction head (Olsson et al. 2022,
#              "In-context learning and induction heads"), which copies what came next last time;
#   induction2: the same on the last two tokens (A B C ... A B -> C): the positions that follow an earlier
#              occurrence of the token pair ending at the query. Fewer keys, and more often the right ones.
GUIDANCE_PATTERNS = ("previous", "induction", "induction2")


def guidance_labels(pattern: str, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys each query of idx (B, T) should attend to under `pattern` (GUIDANCE_PATTERNS), as
    labels: query i's keys are the keys j <= i whose key label equals its query label. Returns
    (query labels, key labels), (B, T) each: previous: i and j + 1; induction: the token at i and the
    token before j (-1 before the first); induction2: the pair of tokens at i - 1 and i and the pair at
    j - 2 and j - 1, as one int64 (token ids below 2**31; -1 and -2 where there is no pair)."""
    if pattern == "previous":
        positions = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)
        return positions, positions + 1
    if pattern == "induction":
        return idx, torch.cat([torch.full_like(idx[:, :1], -1), idx[:, :-1]], dim=1)
    if pattern == "induction2":
        pairs = idx[:, :-1].long() * 2**31 + idx[:, 1:].long()  # (B, T - 1): the pair ending at position t + 1
        return (torch.cat([torch.full_like(pairs[:, :1], -1), pairs], dim=1),
                torch.cat([torch.full_like(pairs[:, :2], -2), pairs[:, :-1]], dim=1))
    raise ValueError(f"unknown guidance pattern {pattern!r}; choose from {', '.join(GUIDANCE_PATTERNS)}")


def guidance_keys(labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The key sets of `labels` (guidance_labels, (..., T) each) as a causal (..., T, T) bool mask
    [..., query, key]: what the chunked kernel computes a block at a time."""
    query_labels, key_labels = labels
    T = query_labels.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=query_labels.device).tril()
    return (query_labels[..., :, None] == key_labels[..., None, :]) & causal


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.dropout = cfg.attention_dropout
        # Guidance (Transformer.set_guidance): the heads guided; the labels of the keys each of their
        # queries should attend to (guidance_labels, two (B, len(guided), T) tensors), set by
        # Transformer.forward before each training forward; and, set by that forward, the log of the
        # attention the queries put there and whether they have such keys, (B, len(guided), T) each.
        self.guided: tuple[int, ...] = ()
        self.guided_labels: tuple[torch.Tensor, torch.Tensor] | None = None
        self.guided_log_mass: torch.Tensor | None = None
        self.guided_has_keys: torch.Tensor | None = None

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, attn_mask=None,
                kernel: str = "sdpa"):
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.wq(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.wo(self.attend(q, k, v, cache, layer, attn_mask, kernel))

    def log_attention(self, q: torch.Tensor, k: torch.Tensor, heads: tuple[int, ...]) -> torch.Tensor:
        """The causal attention's log-probabilities of the given heads, computed apart from the kernel
        that attends (the same q and k, so the same pattern): q (B, H, T, D), k (B, Hkv, T, D) ->
        (B, len(heads), T, T), fp32, -inf above the diagonal. Guidance's path where the chunked
        kernel (which computes the log mass itself) does not run."""
        T, D = q.shape[2], q.shape[3]
        group = self.n_heads // self.n_kv_heads
        with torch.autocast(q.device.type, enabled=False):  # fp32 scores (autocast would take `@` to bf16)
            scores = q[:, list(heads)].float() @ k[:, [h // group for h in heads]].float().transpose(-1, -2)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        return torch.log_softmax((scores / math.sqrt(D)).masked_fill(~causal, float("-inf")), dim=-1)

    def attend(self, q, k, v, cache: KVCache | None, layer: int, attn_mask, kernel: str = "sdpa") -> torch.Tensor:
        """softmax(q k^T / sqrt(D)) v over the cached and new keys: q (B, H, T, D), k/v (B, Hkv, T, D)
        -> (B, T, H * D). `kernel`: "sdpa" (PyTorch's fused kernels), or "chunked" (attention.py) where it applies.
        In a training forward with guided heads, also sets `guided_log_mass` and `guided_has_keys`."""
        B, _, T, D = q.shape
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, cached + T, D)
        dropout = self.dropout if self.training else 0.0
        guided = self.guided if self.training and cache is None else ()
        if kernel == "chunked" and cache is None and attn_mask is None and dropout == 0.0 and chunked_applies(q, T):
            if guided:  # the kernel computes the log mass from its own scores
                y, self.guided_log_mass, self.guided_has_keys = chunked_causal_attention(
                    q, k, v, guided, self.guided_labels)
            else:
                y = chunked_causal_attention(q, k, v)  # (B, H, T, D)
        else:
            if guided:
                keys = guidance_keys(self.guided_labels)  # (B, Hg, T, T)
                self.guided_log_mass = torch.logsumexp(
                    self.log_attention(q, k, guided).masked_fill(~keys, OUTSIDE), dim=-1)
                self.guided_has_keys = keys.any(-1)
            y = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=attn_mask,
                is_causal=attn_mask is None and T > 1,
                dropout_p=dropout,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )  # (B, H, T, D)
        return y.transpose(1, 2).reshape(B, T, self.n_heads * D)  # (B, T, H*D)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache=None, layer=0, attn_mask=None, kernel: str = "sdpa"):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, cache, layer, attn_mask, kernel))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (it normally comes from the tokenizer)")
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.attention = "sdpa"  # the kernel of training's attention (ATTENTION_KERNELS); train.py picks it
        self.guidance: list[tuple[str, int, int]] = []  # (pattern, layer, head): set_guidance
        self.guidance_weight, self.guidance_mass = 0.0, 1.0
        self.reset_parameters()

    def set_guidance(self, heads: Sequence[str], weight: float, mass: float) -> None:
        """Guide attention heads to a pattern while training (`train.guided_heads`): each entry is
        "PATTERN:LAYER.HEAD", PATTERN one of GUIDANCE_PATTERNS. The training loss gains `weight` x, for
        each guided head, the mean over its queries of max(0, -log(attention on the pattern's keys) +
        log(mass)): a hinge that asks for at least `mass` of the attention there and no more (asking
        for all of it drives the scores to infinity). Evaluation and inference do not change.

        Raises ValueError for an unknown pattern, a layer or head the model does not have, one head
        guided twice, "induction" or "induction2" in layer 0 (they need a layer below that brings the
        previous tokens to each position), or a weight
        or mass out of range."""
        if weight < 0 or not 0.0 < mass < 1.0:
            raise ValueError(f"guidance weight must be >= 0 and mass in (0, 1), not {weight} and {mass}")
        specs = []
        for entry in heads:
            pattern, _, where = entry.partition(":")
            layer, _, head = where.partition(".")
            if pattern not in GUIDANCE_PATTERNS or not layer.isdigit() or not head.isdigit():
                raise ValueError(f"guided head {entry!r}: expected PATTERN:LAYER.HEAD, PATTERN one of "
                                 f"{', '.join(GUIDANCE_PATTERNS)} (e.g. previous:0.0)")
            layer, head = int(layer), int(head)
            if layer >= self.cfg.n_layers or head >= self.cfg.n_heads:
                raise ValueError(f"guided head {entry!r}: the model has layers 0-{self.cfg.n_layers - 1} "
                                 f"and heads 0-{self.cfg.n_heads - 1}")
            if pattern.startswith("induction") and layer == 0:
                raise ValueError(f"guided head {entry!r}: an induction head needs a layer below it to "
                                 "find the previous token; guide one in layer 1 or later")
            if any((layer, head) == (l, h) for _, l, h in specs):
                raise ValueError(f"guided head {entry!r}: layer {layer} head {head} is guided twice")
            specs.append((pattern, layer, head))
        self.guidance, self.guidance_weight, self.guidance_mass = specs, float(weight), float(mass)
        for i, block in enumerate(self.layers):
            block.attn.guided = tuple(h for _, l, h in specs if l == i)
            block.attn.guided_labels = block.attn.guided_log_mass = block.attn.guided_has_keys = None

    def _set_guided_labels(self, idx: torch.Tensor) -> None:
        """Give each guided head the labels of the keys its pattern picks in idx (B, T), before a training forward."""
        patterns = {(layer, head): pattern for pattern, layer, head in self.guidance}
        for i, block in enumerate(self.layers):
            if block.attn.guided:
                labels = [guidance_labels(patterns[i, h], idx) for h in block.attn.guided]
                block.attn.guided_labels = tuple(torch.stack(side, dim=1) for side in zip(*labels))

    def guidance_loss(self) -> torch.Tensor:
        """The guidance term of the training loss (set_guidance) for the training forward just run:
        weight x the sum over guided heads of the mean over queries with keys of the hinge."""
        total = torch.zeros((), device=self.output.weight.device)
        for block in self.layers:
            attn = block.attn
            if attn.guided:
                has = attn.guided_has_keys  # (B, Hg, T): the queries the pattern says something about
                shortfall = F.relu(math.log(self.guidance_mass) - attn.guided_log_mass)  # (B, Hg, T)
                total = total + ((shortfall * has).sum((0, 2)) / has.sum((0, 2)).clamp(min=1)).sum()
        return self.guidance_weight * total

    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; residual output projections scaled by 1/sqrt(2 * layers)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def num_params(self, embeddings: bool = True) -> int:
        """Unique parameters (a tied head counts once); without the token embedding if asked."""
        n = sum(p.numel() for p in self.parameters())  # parameters() already skips the shared tensor
        return n if embeddings else n - self.tok_embeddings.weight.numel()

    def set_dropout(self, on: bool) -> bool:
        """Turn `dropout` and `attention_dropout` on (the config's rates) or off for training
        (`train.dropout_from_epoch`); True if that changed anything. The weights are untouched."""
        changed = False
        for block in self.layers:
            p, attn_p = (self.cfg.dropout, self.cfg.attention_dropout) if on else (0.0, 0.0)
            changed |= block.drop.p != p or block.attn.dropout != attn_p
            block.drop.p, block.attn.dropout = p, attn_p
        return changed

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """idx: (B, T) token ids. Returns (logits (B, T, V), loss or None).

        targets: (B, T) next-token ids, -100 where no loss is wanted (SFT masks, padding).
        cache: decode with a KV cache; positions start at `cache.pos`, which advances by T.
        """
        B, T = idx.shape
        if cache is None:
            if T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
            cos, sin, attn_mask = self.rope_cos[:T], self.rope_sin[:T], None
        else:
            cos, sin, attn_mask = cache.rope_and_mask(T, self.rope_cos, self.rope_sin)
        guided = bool(self.guidance) and self.training and cache is None
        if guided:
            self._set_guided_labels(idx)
        x = self.tok_embeddings(idx)  # (B, T, dim)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, attn_mask, self.attention)
        if cache is not None:
            cache.advance(T)
        logits = self.output(self.norm(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
            if guided:
                loss = loss + self.guidance_loss()
        return logits, loss

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> KVCache:
        p = self.tok_embeddings.weight
        return KVCache(self.cfg, batch_size, max_len or self.cfg.max_seq_len, p.device, dtype or p.dtype)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 N plus attention scores (PaLM appendix B)."""
        T = seq_len or self.cfg.max_seq_len
        n = self.num_params(embeddings=False)  # includes an untied output head
        attn = 12 * self.cfg.n_layers * self.cfg.dim * T / 2  # causal: half the score matrix
        head = 6 * self.cfg.dim * self.cfg.vocab_size if self.cfg.tie_embeddings else 0
        return 6 * n + attn + head
