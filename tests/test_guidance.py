"""Attention heads guided to a pattern while training (`train.guided_heads`, Transformer.set_guidance)."""

import math

import pytest
import torch

from tinylm.attention import CHUNK
from tinylm.config import ConfigError, ModelConfig, load_config
from tinylm.model import Transformer, guidance_keys, guidance_labels


def _model(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, vocab_size=11)
    return Transformer(ModelConfig(**{**cfg, **kw}))


def _slow_keys(pattern: str, idx: torch.Tensor) -> torch.Tensor:
    B, T = idx.shape
    keys = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            for j in range(i + 1):
                if pattern == "previous":
                    keys[b, i, j] = j == i - 1
                elif pattern == "induction":  # what followed an earlier occurrence of token i
                    keys[b, i, j] = j >= 1 and int(idx[b, j - 1]) == int(idx[b, i])
                else:  # what followed an earlier occurrence of the tokens i - 1 and i
                    keys[b, i, j] = i >= 1 and j >= 2 and idx[b, j - 2:j].tolist() == idx[b, i - 1:i + 1].tolist()
    return keys


@pytest.mark.parametrize("pattern", ["previous", "induction", "induction2"])
def test_the_keys_of_each_pattern_match_a_loop_over_positions(pattern):
    idx = torch.randint(0, 4, (3, 17), generator=torch.Generator().manual_seed(1))  # few tokens: many repeats
    keys = guidance_keys(guidance_labels(pattern, idx))
    assert torch.equal(keys, _slow_keys(pattern, idx))
    assert keys.any()
    big = torch.tensor([0, 1, 2**20, 2**31 - 1])[idx]  # large ids (up to the limit): pairs such as (1, 0) and (0, 2**20) stay apart
    assert torch.equal(guidance_keys(guidance_labels(pattern, big)), keys)


@pytest.mark.parametrize("kernel, T", [("sdpa", 32), ("chunked", 2 * CHUNK)])  # the chunked kernel computes the mass itself
def test_the_guided_attention_is_the_attention_the_model_uses_and_the_loss_is_the_hinge(kernel, T):
    model = _model(max_seq_len=T)
    model.attention = kernel
    model.set_guidance(["previous:0.3", "induction:1.0", "induction2:1.2"], weight=0.5, mass=0.05)  # early queries have more: the hinge is 0
    seen = {}
    for i, block in enumerate(model.layers):  # record each layer's queries, keys and values
        def attend(q, k, v, *a, _orig=block.attn.attend, _i=i, **kw):
            seen[_i] = (q.detach(), k.detach(), v.detach())
            return _orig(q, k, v, *a, **kw)
        block.attn.attend = attend
    idx = torch.randint(0, 4, (2, T), generator=torch.Generator().manual_seed(2))  # few tokens: pairs repeat
    model.train()
    _, loss = model(idx, idx)
    D, group = model.cfg.head_dim, model.cfg.n_heads // model.cfg.kv_heads
    expected = 0.0
    for pattern, layer, head in (("previous", 0, 3), ("induction", 1, 0), ("induction2", 1, 2)):
        attn = model.layers[layer].attn
        q, k, _ = seen[layer]
        scores = (q[:, head] @ k[:, head // group].transpose(-1, -2)) / math.sqrt(D)  # (B, T, T)
        probs = torch.softmax(scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")), -1)
        keys = _slow_keys(pattern, idx)
        log_mass = attn.guided_log_mass[:, attn.guided.index(head)].detach()  # (B, T), what the loss reads
        assert torch.equal(attn.guided_has_keys[:, attn.guided.index(head)], keys.any(-1))
        shortfalls = []
        for b in range(2):
            for i in range(T):
                if keys[b, i].any():
                    mass = float(probs[b, i][keys[b, i]].sum())
                    assert math.isclose(math.exp(float(log_mass[b, i])), mass, rel_tol=1e-4, abs_tol=1e-6)
                    shortfalls.append(max(0.0, math.log(0.05) - math.log(mass)))
        expected += sum(shortfalls) / len(shortfalls)
    assert torch.allclose(model.guidance_loss(), torch.tensor(0.5 * expected), rtol=1e-4)
    model.eval()  # evaluation: the language-model loss alone
    _, plain = model(idx, idx)
    assert torch.allclose(loss, plain + 0.5 * expected, rtol=1e-4) and expected > 0


def test_the_chunked_kernel_gives_the_guidance_the_gradients_of_the_plain_computation():
    """The log mass from inside the chunked kernel has the gradients of softmax, mask and log-sum-exp."""
    model = _model(max_seq_len=2 * CHUNK, dim=64, n_heads=4, n_kv_heads=2)
    model.set_guidance(["previous:0.1", "induction:1.2", "previous:1.3", "induction2:1.0"], weight=1.0, mass=0.5)
    idx = torch.randint(0, 5, (2, 2 * CHUNK), generator=torch.Generator().manual_seed(4))
    model.train()
    grads = {}
    for kernel in ("sdpa", "chunked"):
        model.attention = kernel
        model.zero_grad()
        model(idx, idx)[1].backward()
        grads[kernel] = {name: p.grad.clone() for name, p in model.named_parameters()}
    assert float(model.guidance_loss().detach()) > 0
    for name, reference in grads["sdpa"].items():
        assert torch.allclose(grads["chunked"][name], reference, atol=1e-5, rtol=1e-4), name


def test_training_guides_the_head_and_a_compiled_step_computes_the_same():
    model = _model()
    model.set_guidance(["previous:0.1"], weight=1.0, mass=0.9)
    compiled = torch.compile(model, backend="eager")  # Dynamo's tracing, as training compiles the step
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 11, (4, 32), generator=g)
    model.train()
    losses = [m(idx, idx)[1] for m in (model, compiled)]
    grads = [torch.autograd.grad(loss, model.layers[0].attn.wq.weight)[0] for loss in losses]
    assert torch.allclose(losses[0], losses[1]) and torch.allclose(grads[0], grads[1], atol=1e-6)

    def mass_on_previous() -> float:
        model(idx, idx)
        return float(model.layers[0].attn.guided_log_mass[:, 0, 1:].detach().exp().mean())  # query 0 has no previous token

    before = mass_on_previous()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        compiled(torch.randint(0, 11, (4, 32), generator=g), torch.randint(0, 11, (4, 32), generator=g))[1].backward()
        opt.step()
    assert before < 0.2 and mass_on_previous() > 0.85  # near the asked-for 0.9 on unseen tokens


@pytest.mark.parametrize("heads, message", [
    (["next:0.0"], "PATTERN:LAYER.HEAD"), (["previous:0"], "PATTERN:LAYER.HEAD"), (["previous:2.0"], "layers 0-1"),
    (["previous:0.4"], "heads 0-3"), (["induction:0.1"], "layer below"), (["induction2:0.0"], "layer below"), (["previous:1.2", "induction:1.2"], "twice")])
def test_bad_guided_heads_are_refused_by_name(heads, message):
    with pytest.raises(ValueError, match=message):
        _model().set_guidance(heads, weight=0.1, mass=0.7)


def test_guidance_settings_are_checked_and_fine_tuning_leaves_them_off():
    with pytest.raises(ConfigError, match="guided_mass"):
        load_config("tiny", {"train.guided_mass": 1.0})
    with pytest.raises(ConfigError, match="DPO"):
        load_config("tiny", {"dpo.train.guided_heads": "previous:0.0"})
    cfg = load_config("tiny", {"train.guided_heads": "previous:0.0,induction:1.1"})
    assert cfg.train.guided_heads == ["previous:0.0", "induction:1.1"]
    assert cfg.stage_train("sft").guided_heads == [] and cfg.stage_train("dpo").guided_heads == []
