"""The model's matrices laid out for decoding on a CPU, and the forward pass that reads them.

A decoding step multiplies one row per sequence by every matrix, so it is bound by reading the
weights, and MKL runs such a thin product on one thread. On a 2-core AVX512-BF16 EPYC three things
made one pass through the weights faster: `x @ w_t` with `w_t` stored (in, out) read them ~1.5x
faster than `nn.Linear`'s `x @ w.T`; fusing q/k/v and gate/up saves three calls per block; and
cutting every matrix into P column blocks multiplied in one batched product, one block per thread,
~2x more (benchmarks/generate.py prints the floor in both layouts). The price is a second copy of
the weights, made on the first generation and again whenever a parameter or the thread count
changes. A GPU does not get it (its decoding is bound by kernel launches: generate.py replays a
CUDA graph instead).

`packed_forward` is `Transformer.forward` for inference (no dropout, no loss) over these matrices;
tests/test_decoding.py holds the two to the same logits.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import KVCache, Transformer, apply_rope


def pack_matrix(w: torch.Tensor, threads: int) -> torch.Tensor:
    """An (out, in) weight as P column blocks of its transpose, (P, in, out / P).

    P is the largest number of blocks up to `threads` that divides `out` evenly.
    """
    parts = max(p for p in range(1, threads + 1) if w.size(0) % p == 0)
    return w.t().reshape(w.size(1), parts, -1).transpose(0, 1).contiguous()


def packed_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., in) times a matrix packed by `pack_matrix`, w (P, in, out / P): (..., out).

    One batched product whose P parts run on P threads. For one row the result is already laid out
    as (1, out) and the reshape copies nothing.
    """
    parts, k, n = w.shape
    rows = x.reshape(1, -1, k).expand(parts, -1, k)  # (P, M, in), no copy
    return torch.bmm(rows, w).transpose(0, 1).reshape(*x.shape[:-1], parts * n)


@dataclass
class PackedLayer:
    """One block's weights for decoding: q/k/v and gate/up fused, each packed by `pack_matrix`."""

    qkv: torch.Tensor  # [wq; wk; wv] as (P, dim, (H + 2 Hkv) D / P)
    wo: torch.Tensor  # (P, H D, dim / P)
    w13: torch.Tensor  # [w1; w3] as (P, dim, 2 hidden / P)
    w2: torch.Tensor  # (P, hidden, dim / P)


@dataclass
class PackedWeights:
    layers: list[PackedLayer]
    output: torch.Tensor  # (P, dim, vocab / P)
    stamp: tuple  # thread count, and (storage, version) of every parameter it was built from


_packed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its PackedWeights


@torch.no_grad()
def packed_weights(model: Transformer) -> PackedWeights | None:
    """The model's matrices in decoding layout, on a CPU only; None elsewhere.

    Kept while the parameters and the thread count are unchanged: an optimizer step, a loaded state
    dict or a move to another device changes a parameter's (storage, version) stamp, and the next
    call builds the layout again, so decoding never reads stale weights.
    """
    if model.tok_embeddings.weight.device.type != "cpu":
        return None
    threads = torch.get_num_threads()  # up to one column block per thread
    stamp = (threads, *((p.untyped_storage().data_ptr(), p._version) for p in model.parameters()))
    current = _packed.get(model)
    if current is None or current.stamp != stamp:
        _packed.pop(model, None)  # let the old copy go before the new one is made
        with torch.inference_mode(False):  # plain tensors even when built inside generate_ids
            layers = [PackedLayer(
                qkv=pack_matrix(torch.cat([b.attn.wq.weight, b.attn.wk.weight, b.attn.wv.weight]), threads),
                wo=pack_matrix(b.attn.wo.weight, threads),
                w13=pack_matrix(torch.cat([b.ffn.w1.weight, b.ffn.w3.weight]), threads),
                w2=pack_matrix(b.ffn.w2.weight, threads),
            ) for b in model.layers]
            current = PackedWeights(layers, pack_matrix(model.output.weight, threads), stamp)
        _packed[model] = current
    return current


def packed_forward(model: Transformer, packed: PackedWeights, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits (B, T, V) of idx (B, T) after the cached positions, as `model(idx, cache=cache)[0]`
    computes them in eval mode, with the matrices read from `packed`; advances the cache by T."""
    B, T = idx.shape
    cos, sin, attn_mask = cache.rope_and_mask(T, model.rope_cos, model.rope_sin)
    x = model.tok_embeddings(idx)  # (B, T, dim)
    for i, (block, w) in enumerate(zip(model.layers, packed.layers)):
        attn = block.attn
        H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
        qkv = packed_matmul(block.attn_norm(x), w.qkv).view(B, T, H + 2 * Hkv, D).transpose(1, 2)  # (B, H + 2 Hkv, T, D)
        qk = apply_rope(qkv[:, :H + Hkv], cos, sin)  # one rotation for q and k
        y = attn.attend(qk[:, :H], qk[:, H:], qkv[:, H + Hkv:], cache, i, attn_mask)  # (B, T, H*D)
        x = x + packed_matmul(y, w.wo)
        gate, up = packed_matmul(block.ffn_norm(x), w.w13).chunk(2, dim=-1)
        x = x + packed_matmul(F.silu(gate) * up, w.w2)
    cache.advance(T)
    return packed_matmul(model.norm(x), packed.output)  # (B, T, V)
