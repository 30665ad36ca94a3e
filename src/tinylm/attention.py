"""Causal self-attention for training on a CPU under `torch.compile`, forward and backward by hand.

PyTorch's CPU flash attention takes the whole score row of a 512-token sequence as one block, so it
computes the masked half of the scores too, and its backward runs at a few percent of the CPU's
matrix peak (at `gpu-26m` it took a third of the compiled training step). Here the queries are cut
into chunks of `CHUNK` rows; chunk i attends to keys 0..end_i only, so about (n + 1) / 2n of the
score matrix is computed for n chunks instead of all of it. Each chunk is a few batched matrix
products with one score block held in memory, which inductor fuses with the elementwise work around
them. The backward recomputes the probabilities from the saved log-sum-exp, as flash attention
does, and never stores the T x T matrix.

Scores and probabilities are fp32 (bf16 scores double the error of the gradients), under autocast
too; the products with V, dO, K and Q take the input dtype (bf16 under autocast). Grouped-query attention needs no
copies: the G query heads of one key/value head are stacked as G * rows of one product.
"""

from __future__ import annotations

import math

import torch

CHUNK = 128  # query rows per block: 64-256 measured alike at T = 512 on a 2-core CPU; 128 split the difference


def applies(q: torch.Tensor, seq_len: int) -> bool:
    """Whether the chunked kernel is worth it here: CPU, gradients wanted, at least two chunks."""
    return q.device.type == "cpu" and torch.is_grad_enabled() and seq_len >= 2 * CHUNK and seq_len % CHUNK == 0


def _chunks(T: int):
    for start in range(0, T, CHUNK):
        yield start, min(T, start + CHUNK)


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores and sums are kept in: fp32, or the input's if wider."""
    return torch.promote_types(dtype, torch.float32)


def _scores(q, k, start, end, scale):
    """Scores of queries start:end against keys 0:end, and the causal mask: (B, Hkv, G, n, end).

    The scores are fp32 (fp64 for fp64 inputs)."""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    n = end - start
    rows = q[:, :, start:end].reshape(B, Hkv, H // Hkv * n, D)  # the G query heads of a kv head, stacked
    wide = _wide(q.dtype)
    s = (rows.to(wide) @ k[:, :, :end].to(wide).transpose(-1, -2)).view(B, Hkv, H // Hkv, n, end) * scale
    visible = torch.ones(n, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
    return rows, s, visible


def _forward(q, k, v):
    B, H, T, D = q.shape
    Hkv, scale = k.shape[1], 1.0 / math.sqrt(D)
    outs, lses = [], []
    for start, end in _chunks(T):
        _, s, visible = _scores(q, k, start, end, scale)
        s = s.masked_fill(~visible, float("-inf"))
        lse = torch.logsumexp(s, dim=-1, keepdim=True)  # (B, Hkv, G, n, 1)
        p = torch.exp(s - lse).to(v.dtype).view(B, Hkv, -1, end)
        outs.append((p @ v[:, :, :end]).view(B, H, end - start, D))
        lses.append(lse.view(B, H, end - start))
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)  # (B, H, T, D), (B, H, T) in the wide dtype


def _backward(q, k, v, out, lse, d_out):
    B, H, T, D = q.shape
    Hkv, scale = k.shape[1], 1.0 / math.sqrt(D)
    G = H // Hkv
    wide = _wide(q.dtype)
    delta = (d_out.to(wide) * out.to(wide)).sum(-1)  # (B, H, T): rowsum(dO * O) = rowsum(P * dP)
    dk = torch.zeros(B, Hkv, T, D, dtype=wide, device=q.device)
    dv = torch.zeros_like(dk)
    dqs = []
    for start, end in _chunks(T):
        n = end - start
        rows, s, visible = _scores(q, k, start, end, scale)
        p = torch.exp(s - lse[:, :, start:end].view(B, Hkv, G, n, 1)).masked_fill(~visible, 0.0)
        d_rows = d_out[:, :, start:end].reshape(B, Hkv, G * n, D)
        dp = (d_rows @ v[:, :, :end].transpose(-1, -2)).to(wide).view(B, Hkv, G, n, end)
        ds = (p * (dp - delta[:, :, start:end].view(B, Hkv, G, n, 1))).to(q.dtype).view(B, Hkv, G * n, end)
        dv[:, :, :end] += (p.to(q.dtype).view(B, Hkv, G * n, end).transpose(-1, -2) @ d_rows).to(wide)
        dk[:, :, :end] += (ds.transpose(-1, -2) @ rows).to(wide) * scale
        dqs.append((ds @ k[:, :, :end]).view(B, H, n, D) * scale)
    return torch.cat(dqs, dim=2), dk.to(k.dtype), dv.to(v.dtype)


class _ChunkedCausalAttention(torch.autograd.Function):
    # Autocast is switched off inside: under it (bf16 training) `@` would take the fp32 score products
    # back to bf16, the forward's log-sum-exp would then disagree with the backward's probabilities by
    # up to e^(score error), and the gradients of sharp attention came out several times less accurate
    # than SDPA's (tests/test_attention.py), enough to make training diverge once heads grew sharp.
    @staticmethod
    def forward(ctx, q, k, v):
        with torch.autocast(q.device.type, enabled=False):
            out, lse = _forward(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q = ctx.saved_tensors[0]
        with torch.autocast(q.device.type, enabled=False):
            return _backward(*ctx.saved_tensors, d_out.contiguous())


def chunked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D), causal) v for q (B, H, T, D) and k, v (B, Hkv, T, D), H a multiple of Hkv."""
    return _ChunkedCausalAttention.apply(q, k, v)
