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

Guided heads (`train.guided_heads`, model.py) need the log of the attention a head puts on a set of
keys, given as labels (query i's keys are the keys whose label matches its own), so no T x T mask is
ever stored. The kernel computes it from the score block it already holds, as a second log-sum-exp
over those keys: the guidance costs a few elementwise passes over the guided heads' scores rather
than a second attention. Its gradient joins the attention's: for log m_i = lse_K(s_i) - lse(s_i),
d log m_i / d s_ij = [j in K_i] exp(s_ij - lse_K(s_i)) - p_ij.
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


# The score a key outside a guided head's key set gets in that set's log-sum-exp: finite, so a query
# with no such key gets a finite log mass (which its caller masks) rather than -inf and NaN gradients.
OUTSIDE = -1e4


def _guided_scores(s, visible, labels, start, end):
    """One guided head's scores of a chunk, s (B, n, end), with OUTSIDE off its key sets, and the key
    sets, (B, n, end) bool: key j is in query i's set where their labels (B, T) match (and j <= i)."""
    query_labels, key_labels = labels
    keys = (query_labels[:, start:end, None] == key_labels[:, None, :end]) & visible
    return s.masked_fill(~keys, OUTSIDE), keys


def _forward(q, k, v, heads=(), labels=None):
    B, H, T, D = q.shape
    Hkv, scale = k.shape[1], 1.0 / math.sqrt(D)
    G = H // Hkv
    outs, lses, key_lses, has = [], [], [], []
    for start, end in _chunks(T):
        _, s, visible = _scores(q, k, start, end, scale)
        s = s.masked_fill(~visible, float("-inf"))
        lse = torch.logsumexp(s, dim=-1, keepdim=True)  # (B, Hkv, G, n, 1)
        p = torch.exp(s - lse).to(v.dtype).view(B, Hkv, -1, end)
        outs.append((p @ v[:, :, :end]).view(B, H, end - start, D))
        lses.append(lse.view(B, H, end - start))
        for i, h in enumerate(heads):  # each guided head's scores are a slice of the block: no copies
            guided, keys = _guided_scores(s[:, h // G, h % G], visible, (labels[0][:, i], labels[1][:, i]), start, end)
            key_lses.append(torch.logsumexp(guided, dim=-1))  # (B, n)
            has.append(keys.any(-1))
    out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)  # (B, H, T, D), (B, H, T) in the wide dtype
    if not heads:
        return out, lse, None, None
    return out, lse, _by_head(key_lses, len(heads)), _by_head(has, len(heads))  # (B, Hg, T) each


def _by_head(pieces, n_heads):
    """Per-chunk, per-head pieces (B, n) in chunk-major order -> (B, n_heads, T)."""
    per_head = [torch.cat(pieces[i::n_heads], dim=-1) for i in range(n_heads)]
    return torch.stack(per_head, dim=1)


def _backward(q, k, v, out, lse, d_out, heads=(), labels=None, key_lse=None, d_log_mass=None):
    B, H, T, D = q.shape
    Hkv, scale = k.shape[1], 1.0 / math.sqrt(D)
    G = H // Hkv
    wide = _wide(q.dtype)
    delta = (d_out.to(wide) * out.to(wide)).sum(-1)  # (B, H, T): rowsum(dO * O) = rowsum(P * dP)
    # A guided head's log mass adds g_i ([j in K_i] exp(s_ij - lse_K,i) - p_ij) to its ds: the - p_ij
    # part joins delta, the other is computed on the head's slice of the block and added to the
    # block as a broadcast under a one-hot over heads (a pointwise pass inductor vectorises).
    if heads:
        one_hot = torch.eye(H, dtype=wide, device=q.device)[list(heads)]  # (Hg, H)
        delta = delta + (one_hot[None, :, :, None] * d_log_mass.to(wide)[:, :, None, :]).sum(1)
    dk = torch.zeros(B, Hkv, T, D, dtype=wide, device=q.device)
    dv = torch.zeros_like(dk)
    dqs = []
    for start, end in _chunks(T):
        n = end - start
        rows, s, visible = _scores(q, k, start, end, scale)
        p = torch.exp(s - lse[:, :, start:end].view(B, Hkv, G, n, 1)).masked_fill(~visible, 0.0)
        d_rows = d_out[:, :, start:end].reshape(B, Hkv, G * n, D)
        dp = (d_rows @ v[:, :, :end].transpose(-1, -2)).to(wide).view(B, Hkv, G, n, end)
        ds = p * (dp - delta[:, :, start:end].view(B, Hkv, G, n, 1))
        for i, h in enumerate(heads):
            guided, keys = _guided_scores(s[:, h // G, h % G], visible, (labels[0][:, i], labels[1][:, i]), start, end)
            on_keys = torch.exp(guided - key_lse[:, i, start:end, None]).masked_fill(~keys, 0.0)
            ds = ds + one_hot[i].view(1, Hkv, G, 1, 1) * (on_keys * d_log_mass[:, i, start:end, None]).view(B, 1, 1, n, end)
        ds = ds.to(q.dtype).view(B, Hkv, G * n, end)
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
    def forward(ctx, q, k, v, heads, query_labels, key_labels):
        with torch.autocast(q.device.type, enabled=False):
            out, lse, key_lse, has = _forward(q, k, v, heads, (query_labels, key_labels))
        ctx.heads = heads
        if not heads:
            ctx.save_for_backward(q, k, v, out, lse)
            return out, None, None
        ctx.save_for_backward(q, k, v, out, lse, query_labels, key_labels, key_lse)
        ctx.mark_non_differentiable(has)
        return out, key_lse - torch.stack([lse[:, h] for h in heads], dim=1), has

    @staticmethod
    def backward(ctx, d_out, d_log_mass, _):
        with torch.autocast(d_out.device.type, enabled=False):
            q, k, v, out, lse, *guided = ctx.saved_tensors
            labels, key_lse = (guided[:2], guided[2]) if ctx.heads else (None, None)
            grads = _backward(q, k, v, out, lse, d_out.contiguous(), ctx.heads, labels, key_lse, d_log_mass)
        return *grads, None, None, None


def chunked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: tuple[int, ...] = (),
                             labels: tuple[torch.Tensor, torch.Tensor] | None = None):
    """softmax(q k^T / sqrt(D), causal) v for q (B, H, T, D) and k, v (B, Hkv, T, D), H a multiple of Hkv.

    Without `heads`, returns the output (B, H, T, D). With guided heads (a tuple of head indices) and
    their `labels`, two integer tensors (B, len(heads), T) of query and key labels that define each
    query's key set K_i = {j <= i: query_label_i == key_label_j}, returns (output, log mass, has):
    log sum_{j in K_i} p_ij, (B, len(heads), T) in fp32 (fp64 for fp64 inputs), and whether K_i is
    non-empty, (B, len(heads), T) bool (the log mass of a query without keys is finite but meaningless)."""
    if not heads:
        return _ChunkedCausalAttention.apply(q, k, v, (), None, None)[0]
    shape = (q.shape[0], len(heads), q.shape[2])
    if labels is None or any(t.shape != shape for t in labels):
        raise ValueError(f"labels must be two {shape} tensors for guided heads {heads}")
    return _ChunkedCausalAttention.apply(q, k, v, tuple(heads), *labels)
