"""The hand-written chunked attention (attention.py) against the textbook formula and SDPA."""

import pytest
import torch
import torch.nn.functional as F

from tinylm.attention import CHUNK, applies, chunked_causal_attention
from tinylm.config import ModelConfig
from tinylm.model import Transformer
from test_model import explicit_attention


def _inputs(heads, kv_heads, T, dtype, B=2, D=16, seed=0, sharpness=2.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, d_out = (torch.randn(B, h, T, D, generator=g, dtype=torch.float64) * s
                      for h, s in ((heads, sharpness), (kv_heads, sharpness), (kv_heads, 1.0), (heads, 1.0)))
    return [t.to(dtype) for t in (q, k, v)], d_out.to(dtype)


def _output_and_grads(fn, qkv, d_out):
    qkv = [t.detach().requires_grad_() for t in qkv]
    out = fn(*qkv)
    return [out.detach(), *torch.autograd.grad(out, qkv, d_out)]


@pytest.mark.parametrize("heads, kv_heads, T", [(4, 2, 2 * CHUNK), (4, 4, 3 * CHUNK), (6, 2, 2 * CHUNK + 40), (2, 1, 50)])
def test_chunked_attention_and_its_gradients_equal_the_textbook_formula(heads, kv_heads, T):
    qkv, d_out = _inputs(heads, kv_heads, T, torch.float64)
    ours = _output_and_grads(chunked_causal_attention, qkv, d_out)
    reference = _output_and_grads(explicit_attention, qkv, d_out)
    for name, a, b in zip(("output", "dq", "dk", "dv"), ours, reference):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-9), name


@pytest.mark.parametrize("autocast", [False, True])  # training runs the kernel under bf16 autocast
@pytest.mark.parametrize("sharpness", [2.0, 6.0])  # 6: scores of std 36, most rows near one-hot (late in training)
def test_chunked_attention_in_bf16_is_as_accurate_as_sdpa(sharpness, autocast):
    qkv64, d_out64 = _inputs(8, 2, 2 * CHUNK, torch.float64, B=2, D=64, sharpness=sharpness)
    exact = _output_and_grads(explicit_attention, qkv64, d_out64)
    qkv, d_out = [t.bfloat16() for t in qkv64], d_out64.bfloat16()

    def under_autocast(fn):
        def run(*args):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return fn(*args)
        return run

    ours = _output_and_grads(under_autocast(chunked_causal_attention), qkv, d_out)
    sdpa = _output_and_grads(
        under_autocast(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)),
        qkv, d_out)
    for name, a, b, e in zip(("output", "dq", "dk", "dv"), ours, sdpa, exact):
        ours_error = (a.double() - e).norm() / e.norm()
        sdpa_error = (b.double() - e).norm() / e.norm()
        assert ours_error < 1.5 * sdpa_error + 1e-3, (name, float(ours_error), float(sdpa_error))


def test_the_model_with_chunked_attention_trains_like_the_model_with_sdpa(monkeypatch):
    import tinylm.model

    calls = []
    monkeypatch.setattr(tinylm.model, "chunked_causal_attention", lambda *a, **kw: calls.append(1) or chunked_causal_attention(*a, **kw))
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=2 * CHUNK, vocab_size=101)
    torch.manual_seed(0)
    model = Transformer(cfg)
    idx, targets = torch.randint(0, 101, (2, 2 * CHUNK)), torch.randint(0, 101, (2, 2 * CHUNK))
    results = {}
    for kernel in ("sdpa", "chunked"):
        model.attention = kernel
        model.zero_grad()
        _, loss = model(idx, targets)
        loss.backward()
        results[kernel] = [loss.detach()] + [p.grad.clone() for p in model.parameters()]
    assert len(calls) == 2  # the chunked kernel ran in both layers, and only when asked
    for a, b in zip(results["sdpa"], results["chunked"]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert not applies(idx.float(), CHUNK) and applies(idx.float(), 2 * CHUNK)
    with torch.no_grad():
        assert not applies(idx.float(), 2 * CHUNK)  # evaluation keeps SDPA's forward


def test_the_attention_kernel_is_one_setting_resolved_in_one_place():
    from tinylm.config import ConfigError, load_config
    from tinylm.train import attention_kernel

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for compile_, expected in ((False, "sdpa"), (True, "chunked")):  # auto: chunked for a step compiled on a CPU
        assert attention_kernel(load_config("tiny", {"train.compile": compile_}).train, cpu) == expected
    assert attention_kernel(load_config("tiny", {"train.compile": True}).train, cuda) == "sdpa"
    assert attention_kernel(load_config("tiny", {"train.attention": "sdpa", "train.compile": True}).train, cpu) == "sdpa"
    with pytest.raises(ConfigError, match="CPU kernel"):
        attention_kernel(load_config("tiny", {"train.attention": "chunked"}).train, cuda)
    with pytest.raises(ConfigError, match="train.attention must be"):
        load_config("tiny", {"train.attention": "flash"})


def test_the_log_mass_of_guided_heads_and_its_gradients_equal_the_textbook_formula():
    """The guided heads' log attention on their key sets (model.py's guidance), computed inside the
    kernel, against softmax, mask and log-sum-exp in fp64: values, which queries have keys, gradients."""
    heads, kv_heads, T, B = 6, 2, 2 * CHUNK + 40, 2
    (q, k, v), d_out = _inputs(heads, kv_heads, T, torch.float64, B=B)
    idx = torch.randint(0, 5, (B, T), generator=torch.Generator().manual_seed(1))
    guided = (4, 1)  # out of order, in different key/value groups
    positions = torch.arange(T).expand(B, T)
    before = torch.cat([torch.full_like(idx[:, :1], -1), idx[:, :-1]], dim=1)
    labels = (torch.stack([positions, idx], 1), torch.stack([positions + 1, before], 1))  # previous token, induction
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    keys = (labels[0][..., :, None] == labels[1][..., None, :]) & causal  # (B, 2, T, T)
    weights = torch.randn(B, 2, T, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def ours(q, k, v):
        out, log_mass, has = chunked_causal_attention(q, k, v, guided, labels)
        assert torch.equal(has, keys.any(-1))
        return out, torch.where(has, log_mass, 0.0)

    def textbook(q, k, v):
        group = heads // kv_heads
        scores = q @ k.repeat_interleave(group, 1).transpose(-1, -2) / q.shape[-1] ** 0.5
        log_p = torch.log_softmax(scores.masked_fill(~causal, float("-inf")), -1)
        log_mass = torch.logsumexp(log_p[:, list(guided)].masked_fill(~keys, float("-inf")), -1)
        return log_p.exp() @ v.repeat_interleave(group, 1), torch.where(keys.any(-1), log_mass, 0.0)

    results = []
    for fn in (ours, textbook):
        qkv = [t.detach().requires_grad_() for t in (q, k, v)]
        out, log_mass = fn(*qkv)
        results.append([out.detach(), log_mass.detach(),
                        *torch.autograd.grad((out * d_out).sum() + (log_mass * weights).sum(), qkv)])
    assert (results[1][1] < -0.5).any()  # the mass is far from all of it: the gradients are not trivial
    for name, a, b in zip(("output", "log mass", "dq", "dk", "dv"), *results):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-9), name
