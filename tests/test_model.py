import math

import pytest
import torch
import torch.nn.functional as F

from tinylm.config import ModelConfig
from tinylm.model import Transformer, apply_rope


def tiny_model(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, vocab_size=101, **kw)
    return Transformer(cfg).eval()


def test_shapes_and_loss():
    model = tiny_model()
    idx, targets = torch.randint(0, 101, (3, 16)), torch.randint(0, 101, (3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 101)
    assert loss.ndim == 0 and abs(loss.item() - math.log(101)) < 0.5  # near uniform at init


def test_causality_future_tokens_do_not_change_the_past():
    model = tiny_model()
    idx = torch.randint(0, 101, (1, 20))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 7) % 101
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


def test_kv_cache_matches_full_recompute():
    """The model's own forward with a cache (the path a GPU decodes with): prefill, a chunk after
    the cached prefix, then one token at a time; and at batch 1."""
    model = tiny_model()
    idx = torch.randint(0, 101, (2, 24))
    full, _ = model(idx)
    cache = model.new_cache(batch_size=2)
    pieces = [model(idx[:, :10], cache=cache)[0]]  # prefill
    pieces.append(model(idx[:, 10:15], cache=cache)[0])  # a chunk after a cached prefix
    pieces += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(15, 24)]  # one token at a time
    assert cache.pos == 24
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)
    one = model.new_cache(batch_size=1)
    rows = torch.cat([model(idx[:1, t:t + 1], cache=one)[0] for t in range(24)], dim=1)
    assert torch.allclose(rows, full[:1], atol=1e-5)


def test_static_cache_decoding_matches_full_recompute():
    """The fixed-shape decoding step a CUDA graph replays (positions on the device, the whole buffer
    read under a mask) computes what recomputation does; checked here on the CPU, on CUDA in test_cuda."""
    model = tiny_model()
    idx = torch.randint(0, 101, (2, 20))
    full, _ = model(idx)
    cache = model.new_cache(batch_size=2, max_len=24)  # longer than what is decoded: unwritten slots stay masked
    pieces = [model(idx[:, :8], cache=cache)[0]]  # prefill, dynamic
    cache.make_static()
    pieces += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(8, 20)]
    assert cache.pos == 20 and cache.positions.tolist() == [20]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)
    with pytest.raises(ValueError, match="one token"):
        model(idx[:, :2], cache=cache)


def test_the_forward_has_no_decoding_layout_in_it():
    """The model file reads like the architecture: the CPU decoding layout lives in decoding.py."""
    import inspect

    import tinylm.model as m

    source = inspect.getsource(m)
    assert "packed" not in source.lower() and "bmm" not in source


def explicit_attention(q, k, v):
    """Textbook causal attention with keys/values repeated for grouped-query heads."""
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    T = q.size(2)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


def test_sdpa_attention_equals_explicit_reference(monkeypatch):
    model = tiny_model()
    idx = torch.randint(0, 101, (2, 16))
    fast, _ = model(idx)

    def reference(q, k, v, attn_mask=None, is_causal=False, dropout_p=0.0, enable_gqa=False):
        assert is_causal and attn_mask is None
        return explicit_attention(q, k, v)

    monkeypatch.setattr(F, "scaled_dot_product_attention", reference)
    slow, _ = model(idx)
    assert torch.allclose(fast, slow, atol=1e-5)


def test_rope_preserves_norm_and_encodes_relative_position():
    from tinylm.model import rope_tables

    cos, sin = rope_tables(16, 40, 10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    rot = lambda x, p: apply_rope(x, cos[p:p + 1], sin[p:p + 1])  # noqa: E731
    assert torch.allclose(rot(q, 5).norm(), q.norm(), atol=1e-5)
    # the score depends only on the distance between positions
    assert torch.allclose((rot(q, 7) * rot(k, 3)).sum(), (rot(q, 30) * rot(k, 26)).sum(), atol=1e-4)


def test_parameter_count_is_honest():
    tied, untied = tiny_model(tie_embeddings=True), tiny_model(tie_embeddings=False)
    by_hand = sum(p.numel() for p in {id(p): p for p in untied.parameters()}.values())
    assert untied.num_params() == by_hand
    assert tied.num_params() == by_hand - 101 * 64  # the tied head is counted once
    assert tied.output.weight.data_ptr() == tied.tok_embeddings.weight.data_ptr()


def test_tiny_model_overfits_one_batch():
    model = tiny_model().train()
    idx = torch.randint(0, 101, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_ignored_targets_carry_no_loss():
    model = tiny_model()
    idx = torch.randint(0, 101, (1, 10))
    targets = idx.clone()
    targets[0, :5] = -100
    _, masked = model(idx, targets)
    logits, _ = model(idx)
    expected = F.cross_entropy(logits[0, 5:], idx[0, 5:])
    assert torch.allclose(masked, expected, atol=1e-5)


def test_context_overflow_is_an_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))
