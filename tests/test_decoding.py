"""decoding.py: the packed CPU layout computes what the model's own forward computes."""

import pytest
import torch
import torch.nn.functional as F

from tinylm.decoding import pack_matrix, packed_forward, packed_matmul, packed_weights

from test_model import tiny_model


@pytest.fixture
def threads(request):
    """Run the test with `request.param` intra-op threads (the packed layout cuts matrices per thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5)], ids=["one-row", "batch"])
def test_packed_matmul_matches_the_linear_layer(threads, shape):
    w = torch.randn(96, 40)  # (out, in): 96 outputs split into 1, 2 or 3 blocks
    for weight, parts in ((w, threads), (w[:40], min(threads, 2)), (w[:7], 1)):  # 40 into 2 at most, 7 not at all
        packed = pack_matrix(weight, threads)
        assert packed.shape == (parts, weight.size(1), weight.size(0) // parts)
        x = torch.randn(*shape, weight.size(1))
        assert torch.allclose(packed_matmul(x, packed), F.linear(x, weight), atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
def test_packed_decoding_matches_full_recompute(threads):
    model = tiny_model()
    idx = torch.randint(0, 101, (2, 24))
    full, _ = model(idx)
    packed = packed_weights(model)
    assert packed.layers[0].w13.size(0) == threads  # one column block per thread
    cache = model.new_cache(batch_size=2)
    pieces = [packed_forward(model, packed, idx[:, :10], cache)]  # prefill
    pieces.append(packed_forward(model, packed, idx[:, 10:15], cache))  # a chunk after a cached prefix
    pieces += [packed_forward(model, packed, idx[:, t:t + 1], cache) for t in range(15, 24)]
    assert cache.pos == 24
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)
    one = model.new_cache(batch_size=1)  # batch 1 takes the path where the products need no copy
    rows = torch.cat([packed_forward(model, packed, idx[:1, t:t + 1], one) for t in range(24)], dim=1)
    assert torch.allclose(rows, full[:1], atol=1e-5)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        packed_forward(model, packed, torch.zeros(1, 40, dtype=torch.long), model.new_cache(1))


def test_generation_on_a_cpu_decodes_through_the_packed_layout(monkeypatch):
    import tinylm.generate as generate
    from tinylm.config import SampleConfig

    calls = []
    monkeypatch.setattr(generate, "packed_forward", lambda *a: calls.append(a[2].shape) or packed_forward(*a))
    model = tiny_model()
    tokens = list(generate.generate_ids(model, [[1, 2, 3]], SampleConfig(temperature=0.0), max_new_tokens=5))
    assert len(tokens) == 5 and calls[0] == (1, 3) and calls[1:] == [(1, 1)] * 5  # prefill, then a step per token


def test_packed_weights_are_rebuilt_when_the_parameters_change():
    model = tiny_model()
    packed = packed_weights(model)
    assert packed_weights(model) is packed  # kept while nothing changes
    idx = torch.randint(0, 101, (1, 12))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(idx, targets=idx)[1].backward()
    opt.step()  # in-place updates, as training does between two samples
    stepped = packed_weights(model)
    assert stepped is not packed
    with torch.no_grad():
        model.layers[1].ffn.w2.weight.mul_(3)  # one in-place change is enough
    scaled = packed_weights(model)
    assert scaled is not stepped
    w2 = model.layers[1].ffn.w2.weight
    assert torch.equal(packed_matmul(torch.eye(w2.size(1)), scaled.layers[1].w2), w2.t())
    torch.set_num_threads(torch.get_num_threads() + 1)  # a new thread count cuts the matrices anew
    try:
        assert packed_weights(model) is not scaled
    finally:
        torch.set_num_threads(torch.get_num_threads() - 1)
    scaled = packed_weights(model)
    model.load_state_dict(tiny_model().state_dict())  # loading weights copies into the parameters
    with torch.inference_mode():
        loaded = packed_weights(model)  # rebuilt inside inference mode, as generate_ids does it ...
    assert loaded is not scaled and not loaded.output.is_inference()  # ... and still usable outside it
    full, _ = model(idx)
    cache = model.new_cache(batch_size=1)
    steps = [packed_forward(model, loaded, idx[:, t:t + 1], cache) for t in range(12)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
