"""A LLaMA-style decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

The layout and the rotary convention (rotate the two halves of each head) match Hugging Face's
`LlamaForCausalLM`, so export is a renaming of weights. No I/O, logging or parallelism here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import applies as chunked_applies, chunked_causal_attention
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


def packed_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., in) times a matrix packed by `pack_matrix`, w (P, in, out / P): (..., out).

    One batched product whose P parts run on P threads. For one row the result is already laid out
    as (1, out) and the reshape copies nothing.
    """
    parts, k, n = w.shape
    rows = x.reshape(1, -1, k).expand(parts, -1, k)  # (P, M, in), no copy
    return torch.bmm(rows, w).transpose(0, 1).reshape(*x.shape[:-1], parts * n)


def pack_matrix(w: torch.Tensor, threads: int) -> torch.Tensor:
    """An (out, in) weight as P column blocks of its transpose, (P, in, out / P).

    P is the largest number of blocks up to `threads` that divides `out` evenly.
    """
    parts = max(p for p in range(1, threads + 1) if w.size(0) % p == 0)
    return w.t().reshape(w.size(1), parts, -1).transpose(0, 1).contiguous()


@dataclass
class PackedLayer:
    """One block's weights for decoding: q/k/v and gate/up fused, each packed by `pack_matrix`."""

    qkv: torch.Tensor  # [wq; wk; wv] as (P, dim, (H + 2 Hkv) D / P)
    wo: torch.Tensor  # (P, H D, dim / P)
    w13: torch.Tensor  # [w1; w3] as (P, dim, 2 hidden / P)
    w2: torch.Tensor  # (P, hidden, dim / P)


@dataclass
class PackedWeights:
    """The model's matrices laid out for decoding on a CPU (`Transformer.packed_weights`).

    A decoding step multiplies one row per sequence by every matrix, so it is bound by reading the
    weights, and MKL runs such a thin product on one thread. On a 2-core AVX512-BF16 EPYC three
    things made one pass through the weights faster: `x @ w_t` with `w_t` stored (in, out) read them
    ~1.5x faster than `nn.Linear`'s `x @ w.T`; fusing q/k/v and gate/up saves three calls per block;
    and cutting every matrix into P column blocks multiplied in one batched product, one block per
    thread, ~2x more (benchmarks/generate.py prints the floor in both layouts). The price is a
    second copy of the weights.
    """

    layers: list[PackedLayer]
    output: torch.Tensor  # (P, dim, vocab / P)
    stamp: tuple  # thread count, and (storage, version) of every parameter it was built from


class KVCache:
    """Preallocated key/value buffers for every layer; `pos` is the number of cached positions.

    `packed`: the weights in decoding layout, if the model has them for its device (else None).
    After `make_static()` the cache takes one position per forward at `positions`, a tensor on the
    device that the forward itself advances, and attention reads the whole buffer under a mask: every
    shape and address stays fixed from step to step, so a step can be replayed as a CUDA graph.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype,
                 packed: PackedWeights | None = None):
        shape = (cfg.n_layers, batch_size, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0
        self.packed = packed
        self.positions: torch.Tensor | None = None  # (1,) long: the next position, in static mode

    def make_static(self) -> None:
        """Switch to static decoding from the current position on (see the class docstring)."""
        self.positions = torch.tensor([self.pos], dtype=torch.long, device=self.k.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, Hkv, T, D) at the current position; return everything cached so far
        (static mode: the whole buffer, (B, Hkv, max_len, D), to be read under the mask of `forward`)."""
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


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout
        self.chunked = False  # hand-written causal attention (attention.py); set where the step is compiled on a CPU

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, attn_mask=None,
                packed: PackedLayer | None = None):
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        if packed is not None:  # decoding: one product for q, k and v, one rotation for q and k
            qkv = packed_matmul(x, packed.qkv).view(B, T, H + 2 * Hkv, D).transpose(1, 2)  # (B, H + 2 Hkv, T, D)
            qk = apply_rope(qkv[:, :H + Hkv], cos, sin)
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv:]
        else:
            q = self.wq(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
            k = self.wk(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
            v = self.wv(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, pos + T, D)
        dropout = self.dropout if self.training else 0.0
        if self.chunked and cache is None and attn_mask is None and dropout == 0.0 and chunked_applies(q, T):
            y = chunked_causal_attention(q, k, v)  # (B, H, T, D)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=attn_mask,
                is_causal=attn_mask is None and T > 1,
                dropout_p=dropout,
                enable_gqa=Hkv != H,
            )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
        return packed_matmul(y, packed.wo) if packed is not None else self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x, packed: PackedLayer | None = None):
        if packed is not None:
            gate, up = packed_matmul(x, packed.w13).chunk(2, dim=-1)
            return packed_matmul(F.silu(gate) * up, packed.w2)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache=None, layer=0, attn_mask=None, packed: PackedLayer | None = None):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, cache, layer, attn_mask, packed))
        return x + self.drop(self.ffn(self.ffn_norm(x), packed))


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
        self._packed: PackedWeights | None = None
        self.reset_parameters()

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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """idx: (B, T) token ids. Returns (logits (B, T, V), loss or None).

        targets: (B, T) next-token ids, -100 where no loss is wanted (SFT masks, padding).
        cache: decode with a KV cache; positions start at `cache.pos`, which advances by T.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        attn_mask = None
        if start > 0 and T > 1:
            # a chunk after a cached prefix: query i sees all cached keys and the chunk up to i
            attn_mask = torch.ones(T, start + T, dtype=torch.bool, device=idx.device).tril(diagonal=start)
        static = cache is not None and cache.positions is not None
        if static:  # one token at a device-side position, read from the device: no shape depends on it
            if T != 1:
                raise ValueError(f"a static KV cache takes one token per sequence per step, not {T}")
            cos, sin = self.rope_cos[cache.positions], self.rope_sin[cache.positions]  # (1, D)
            attn_mask = (torch.arange(cache.max_len, device=idx.device) <= cache.positions).view(1, 1, 1, -1)
        packed = cache.packed if cache is not None else None  # decoding on a CPU: see PackedWeights
        x = self.tok_embeddings(idx)  # (B, T, dim)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, attn_mask, packed.layers[i] if packed is not None else None)
        if cache is not None:
            cache.pos += T
        if static:
            cache.positions.add_(1)
        logits = packed_matmul(self.norm(x), packed.output) if packed is not None else self.output(self.norm(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> KVCache:
        p = self.tok_embeddings.weight
        return KVCache(self.cfg, batch_size, max_len or self.cfg.max_seq_len, p.device, dtype or p.dtype,
                       self.packed_weights())

    @torch.no_grad()
    def packed_weights(self) -> PackedWeights | None:
        """The matrices in decoding layout (see PackedWeights), on a CPU only; None elsewhere.

        Built on first use and kept while the parameters and the thread count are unchanged: an
        optimizer step, a loaded state dict or a move to another device changes a parameter's
        (storage, version) stamp, and the next call builds the layout again, so a cache never decodes
        with stale weights.
        """
        if self.tok_embeddings.weight.device.type != "cpu":
            return None  # not measured on a GPU, where the copy would also cost device memory
        threads = torch.get_num_threads()  # up to one column block per thread
        stamp = (threads, *((p.untyped_storage().data_ptr(), p._version) for p in self.parameters()))
        if self._packed is None or self._packed.stamp != stamp:
            self._packed = None  # let the old copy go before the new one is made
            with torch.inference_mode(False):  # plain tensors even when built inside generate_ids
                layers = [PackedLayer(
                    qkv=pack_matrix(torch.cat([b.attn.wq.weight, b.attn.wk.weight, b.attn.wv.weight]), threads),
                    wo=pack_matrix(b.attn.wo.weight, threads),
                    w13=pack_matrix(torch.cat([b.ffn.w1.weight, b.ffn.w3.weight]), threads),
                    w2=pack_matrix(b.ffn.w2.weight, threads),
                ) for b in self.layers]
                self._packed = PackedWeights(layers, pack_matrix(self.output.weight, threads), stamp)
        return self._packed

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 N plus attention scores (PaLM appendix B)."""
        T = seq_len or self.cfg.max_seq_len
        n = self.num_params(embeddings=False)  # includes an untied output head
        attn = 12 * self.cfg.n_layers * self.cfg.dim * T / 2  # causal: half the score matrix
        head = 6 * self.cfg.dim * self.cfg.vocab_size if self.cfg.tie_embeddings else 0
        return 6 * n + attn + head
