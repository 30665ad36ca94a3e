import pytest
import torch

import tinylm.api as api
from tinylm.api import LanguageModel
from tinylm.config import ModelConfig, SampleConfig
from tinylm.generate import filter_top_k, filter_top_p, generate_ids, generate_ids_no_cache, apply_repetition_penalty
from tinylm.model import Transformer


@pytest.fixture
def model(tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, vocab_size=tokenizer.vocab_size)
    m = Transformer(cfg).eval()
    with torch.no_grad():  # a sharper random model so sampling is not uniform noise
        m.output.weight.mul_(40)
    return m


@pytest.mark.parametrize("sc", [
    SampleConfig(temperature=0.0, repetition_penalty=1.0, max_new_tokens=30),
    SampleConfig(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3, max_new_tokens=30, seed=7),
])
def test_kv_cache_decoding_equals_full_recompute(model, sc):
    prompt = [2, 50, 60, 70, 80]
    fast = [int(t[0]) for t in generate_ids(model, [prompt], sc)]
    slow = generate_ids_no_cache(model, prompt, sc)
    assert fast == slow and len(fast) == 30


def test_batch_rows_decode_like_single_prompts(model):
    sc = SampleConfig(temperature=0.0, repetition_penalty=1.2, max_new_tokens=12)
    prompts = [[2, 10, 11, 12], [2, 40, 41, 42]]
    batch = torch.stack(list(generate_ids(model, prompts, sc)), dim=1)
    for row, prompt in zip(batch.tolist(), prompts):
        assert row == generate_ids_no_cache(model, prompt, sc)


def test_generation_stops_at_the_context_end(model):
    sc = SampleConfig(temperature=0.0, max_new_tokens=500)
    out = list(generate_ids(model, [[2] * 60], sc))
    assert len(out) == 4  # 60 prompt tokens + 4 = max_seq_len 64


def test_generation_ends_when_every_row_has_stopped(model):
    sc = SampleConfig(temperature=0.0, repetition_penalty=1.0, max_new_tokens=12)
    prompts = [[2, 10, 11, 12], [2, 40, 41, 42]]
    free = torch.stack(list(generate_ids(model, prompts, sc)), dim=1).tolist()  # no stop ids: the whole budget
    assert [len(row) for row in free] == [12, 12]
    stops = [free[0][2], free[1][5]]  # a token from each row serves as a stop id
    stops_at = [next(i for i, t in enumerate(row) if t in stops) for row in free]
    stopped = list(generate_ids(model, prompts, sc, stop_ids=stops))
    assert len(stopped) == max(stops_at) + 1 < 12  # ends on the step the later row stops


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_top_k(logits, 2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_top_p(logits, 0.6)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_top_p(logits, 0.5)).tolist() == [[False, True, True, True]]
    assert torch.isinf(filter_top_p(logits, 0.01)).tolist() == [[False, True, True, True]]  # never empty
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.isinf(filter_top_p(shuffled, 0.6)).tolist() == [[True, False, True, False]]


def test_repetition_penalty_lowers_seen_tokens_only():
    logits = torch.tensor([[2.0, -1.0, 3.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 3.0]]


def _forced(monkeypatch, ids):
    def fake(model, prompts, sc, stop_ids=(), max_new_tokens=None, observe=None):
        for i in ids:
            yield torch.tensor([i])
    monkeypatch.setattr(api, "generate_ids", fake)


def test_streaming_never_splits_a_utf8_character(monkeypatch, tokenizer, model):
    text = "héllo 😀 世界 ok"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text)  # the tiny vocabulary splits characters into bytes
    _forced(monkeypatch, ids)
    pieces = list(LanguageModel(model, tokenizer).stream("x", max_new_tokens=100))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces) and len(pieces) > 3


def test_stop_strings_and_stop_tokens(monkeypatch, tokenizer, model):
    lm = LanguageModel(model, tokenizer)
    _forced(monkeypatch, tokenizer.encode("one two STOP three"))
    assert lm.generate("x", stop=["STOP"]) == "one two "
    _forced(monkeypatch, [*tokenizer.encode("hi there"), tokenizer.end_id, *tokenizer.encode("more")])
    assert lm.generate("x") == "hi there"


def test_sampling_options_are_checked(tokenizer, model):
    with pytest.raises(TypeError, match="unknown sampling options: tempreature"):
        LanguageModel(model, tokenizer).generate("x", tempreature=0.5)


def test_sampling_at_the_edges():
    """top_p 0 keeps the top token, a temperature of 1e-40 is greedy, the largest seed works, and
    SampleConfig.check refuses what the sampler cannot honour, naming the field."""
    from tinylm.config import SamplingError
    from tinylm.generate import make_generator, sample_next

    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    assert torch.isinf(filter_top_p(logits, 0.0)).tolist() == [[True, False, True, True]]
    seen = torch.zeros(1, 4, dtype=torch.bool)
    for sc in (SampleConfig(temperature=1e-40), SampleConfig(temperature=1.0, top_p=0.0)):
        assert sample_next(logits, seen, sc, make_generator(2**64 - 1, torch.device("cpu"))).tolist() == [1]
    for field, value in [("temperature", 2.5), ("temperature", float("nan")), ("top_p", 1.5), ("top_k", -1),
                         ("repetition_penalty", 0.0), ("seed", 2**64), ("seed", -2), ("max_new_tokens", -1)]:
        with pytest.raises(SamplingError) as info:
            SampleConfig(**{field: value}).check()
        assert info.value.field == field
