"""benchmarks/context.py's measurements: the copying rule against a plain scan, the losses against the model's own."""

import numpy as np
import pytest
import torch
from conftest import load_benchmark

from tinylm.config import ModelConfig
from tinylm.model import Transformer


@pytest.fixture(scope="module")
def context():
    return load_benchmark("context")


def scan(row: np.ndarray, t: int, k: int) -> tuple[bool, bool]:
    """Whether row[t-k+1 : t+1] occurred before (ending earlier than t), and was once followed by row[t+1]."""
    if t < k - 1:
        return False, False
    key = list(row[t - k + 1:t + 1])
    ends = [s for s in range(k - 1, t) if list(row[s - k + 1:s + 1]) == key]
    return bool(ends), any(row[s + 1] == row[t + 1] for s in ends)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_copy_rule_agrees_with_a_plain_scan(context, k):
    windows = np.random.default_rng(k).integers(0, 4, size=(5, 41))  # a small vocabulary: many repeats
    seen, right = context.copy_rule(windows, k)
    for w, row in enumerate(windows):
        for t in range(40):
            assert (seen[w, t], right[w, t]) == scan(row, t, k), (w, t)
    assert seen.any() and right.any() and (seen & ~right).any()


def test_copy_rule_on_a_repeated_span(context):
    span = np.array([5, 6, 7, 8])
    seen, right = context.copy_rule(np.concatenate([span, span, [9]])[None], 2)
    # at t the pair row[t-1 : t+1] predicts row[t+1]; (5, 6) recurs at t = 5 and (6, 7) at 6, followed as before
    # by 7 and 8; (7, 8) recurs at 7, followed by 9 where it was by 5; (8, 5) at t = 4 is new
    assert seen[0].tolist() == [False, False, False, False, False, True, True, True]
    assert right[0].tolist() == [False, False, False, False, False, True, True, False]


def test_token_losses_are_the_models_own_next_token_losses(context):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=16, vocab_size=50)).eval()
    windows = torch.randint(0, 50, (20, 17))
    losses = context.token_losses(model, windows)
    assert losses.shape == (20, 16)
    with torch.no_grad():
        _, loss = model(windows[:, :-1], windows[:, 1:])
    assert losses.mean().item() == pytest.approx(loss.item(), rel=1e-5)


def test_copy_mixture_is_the_model_at_lambda_zero_and_copies_a_repeat(context):
    V, span, lam = 50, 10, 0.3
    row = np.concatenate([np.arange(span), np.arange(span), [10]])  # a span read twice, then a new token
    uniform = np.full((1, len(row) - 1, V), -np.log(V))
    assert context.copy_mixture_loss(uniform, row[None], 2, 0.0) == pytest.approx(np.log(V))
    # 20 targets; t = 0..10 have no earlier pair (the first (9, 0) is at t = 10): the model alone; the pairs
    # (0, 1) .. (7, 8) recur at t = 11..18 and are followed as before; (8, 9) recurs at t = 19, followed by 10, not 0
    right = -np.log((1 - lam) / V + lam)
    wrong = -np.log((1 - lam) / V)
    expected = (11 * np.log(V) + 8 * right + wrong) / 20
    assert context.copy_mixture_loss(uniform, row[None], 2, lam) == pytest.approx(expected)


def test_copy_mixture_weighs_earlier_followers_by_count(context):
    V, lam = 50, 0.3
    row = np.array([1, 2, 3, 1, 2, 4, 1, 2, 3])  # (1, 2) is followed by 3, then 4, then 3
    uniform = np.full((1, len(row) - 1, V), -np.log(V))
    # 8 targets: (1, 2) recurs at t = 4 (before: [3], target 4) and t = 7 (before: [3, 4], target 3: half the rule's mass)
    expected = (6 * np.log(V) - np.log((1 - lam) / V) - np.log((1 - lam) / V + lam / 2)) / 8
    assert context.copy_mixture_loss(uniform, row[None], 2, lam) == pytest.approx(expected)
