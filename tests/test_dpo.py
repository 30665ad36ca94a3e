"""DPO: the loss is eq. 7 of the paper, the pairs are read and masked as documented, the built-in pairs
are real replies against other conversations' replies, and the training loop raises the held-out
preference accuracy."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from tinylm.corpus import CorpusError
from tinylm.dpo import (PairBatches, PreferenceLoss, builtin_pairs, build_pair_shards, dpo, dpo_loss, parse_pair,
                        render_reply, sequence_logprobs)
from tinylm.pipeline import pretrain

from conftest import tiny_config
from test_sft import NUMBERS


def test_loss_is_equation_7_on_hand_made_log_probabilities():
    policy_chosen, policy_rejected = torch.tensor([-3.0, -10.0]), torch.tensor([-5.0, -2.0])
    ref_chosen, ref_rejected = torch.tensor([-4.0, -9.0]), torch.tensor([-4.0, -4.0])
    loss = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.5)
    # pair 1: 0.5 * ((-3 + 4) - (-5 + 4)) = 1; pair 2: 0.5 * ((-10 + 9) - (-2 + 4)) = -1.5
    expected = [-math.log(1 / (1 + math.exp(-1.0))), -math.log(1 / (1 + math.exp(1.5)))]
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)


def test_sequence_log_probs_sum_the_reply_targets_only():
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[-100, 3, 4, -100, -100], [-100, -100, 6, 0, 1]])
    logp = torch.log_softmax(logits, -1)
    by_hand = [logp[0, 1, 3] + logp[0, 2, 4], logp[1, 2, 6] + logp[1, 3, 0] + logp[1, 4, 1]]
    torch.testing.assert_close(sequence_logprobs(logits, targets), torch.stack(by_hand))


def test_pair_formats_and_their_errors():
    user = [{"role": "user", "content": "Hi"}]
    as_strings = parse_pair({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}, "f:1")
    as_messages = parse_pair({"prompt": user, "chosen": [{"role": "assistant", "content": "Hello!"}],
                              "rejected": [{"role": "assistant", "content": "Go away."}]}, "f:2")
    as_conversations = parse_pair({"chosen": [*user, {"role": "assistant", "content": "Hello!"}],
                                   "rejected": [*user, {"role": "assistant", "content": "Go away."}]}, "f:3")
    for pair in (as_strings, as_messages, as_conversations):
        assert (pair.prompt, pair.chosen, pair.rejected) == (user, "Hello!", "Go away.")
    with pytest.raises(CorpusError, match="f:4: expected an object with 'chosen' and 'rejected'"):
        parse_pair({"prompt": "Hi", "chosen": "Hello!"}, "f:4")
    with pytest.raises(CorpusError, match="share every message but the last"):
        parse_pair({"chosen": [*user, {"role": "assistant", "content": "a"}],
                    "rejected": [{"role": "user", "content": "Yo"}, {"role": "assistant", "content": "b"}]}, "f:5")


def test_the_mask_covers_the_last_reply_and_its_turn_end_only(tokenizer):
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    ids, mask = render_reply(tokenizer, prompt, "See you!")
    assert [i for i, m in zip(ids, mask) if m] == [*tokenizer.encode("See you!"), tokenizer.end_id]


def test_builtin_pairs_are_a_real_reply_against_another_conversations():
    from tinylm.corpus import builtin_conversations

    pairs = list(builtin_pairs())
    assert len(pairs) > 5000  # 6,044 conversations have a reply (3,150 are a single message)
    firsts = {source: next(m["content"] for m in messages if m["role"] == "assistant")
              for source, messages in builtin_conversations() if any(m["role"] == "assistant" for m in messages)}
    for pair in pairs[:50] + pairs[-50:]:
        source = pair.source.removesuffix("#pair")
        assert pair.chosen == firsts[source] and pair.rejected != pair.chosen
        assert pair.prompt[-1]["role"] == "user"


def test_the_objective_at_the_reference_is_log_2_and_weighs_pairs(tokenizer, tmp_path):
    from tinylm.conversations import SFTRows  # noqa: F401 (the rows PairBatches reads)
    from tinylm.config import ModelConfig
    from tinylm.model import Transformer

    pairs = [parse_pair({"prompt": f"q{i}", "chosen": "yes " * (i + 1), "rejected": "no"}, "x") for i in range(6)]
    build_pair_shards(pairs, tokenizer, tmp_path, max_tokens=65, val_fraction=0.0)
    x, y = PairBatches.load(tmp_path, "train", 64, 3, tokenizer.pad_id).next_batch()
    assert x.shape[:2] == (3, 2) and y.shape == x.shape
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=tokenizer.vocab_size, max_seq_len=64)).eval()
    objective = PreferenceLoss(model, beta=0.1)
    assert objective.count(y) == 3
    assert objective(model, x, y).item() == pytest.approx(math.log(2), abs=1e-6)


def preference_pairs(path, n=240, seed=0):
    """A learnable preference: for any topic, a willing reply is chosen over a refusal."""
    rng = random.Random(seed)
    topics = ["cats", "the sea", "bread", "trains", "music", "rain", "gardens", "the moon", "books", "dogs", "snow", "tea"]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            topic, number = rng.choice(topics), NUMBERS[rng.randrange(10)]
            f.write(json.dumps({"prompt": f"Tell me {number} things about {topic}.",
                                "chosen": f"Sure, I like {topic}. Here are {number}.",
                                "rejected": f"No. I will not talk about {topic}."}) + "\n")
    return path


@pytest.fixture(scope="module")
def base_checkpoint(prepared, tmp_path_factory):
    cfg = tiny_config(prepared["cfg"].data.corpus[0], **{"train.max_steps": 20})
    return pretrain(cfg, prepared["shards"], tmp_path_factory.mktemp("base"))["checkpoint"]


def _dpo_cfg(prepared, pairs, **overrides):
    return tiny_config(prepared["cfg"].data.corpus[0], **{
        "dpo.corpus": [str(pairs)], "dpo.val_fraction": 0.25, "dpo.beta": 0.5, "dpo.train.batch_size": 8,
        "dpo.train.max_steps": 30, "dpo.train.lr": 3e-3, "dpo.train.warmup_steps": 2, "dpo.train.eval_every": 10,
        "dpo.train.save_every": 15, **overrides})


def test_dpo_raises_held_out_preference_accuracy(prepared, base_checkpoint, tmp_path):
    pairs = preference_pairs(tmp_path / "pairs.jsonl")
    summary = dpo(_dpo_cfg(prepared, pairs), base_checkpoint, tmp_path / "dpo")
    records = [json.loads(ln) for ln in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert val[-1] < math.log(2) - 0.1, val  # log 2 is the loss where the policy is the reference
    scores = json.loads((tmp_path / "dpo" / "preference_eval.json").read_text())
    assert scores["start"]["reward_accuracy"] == 0.0 and scores["start"]["mean_margin"] == 0.0
    assert scores["end"]["reward_accuracy"] > 0.8 and scores["end"]["mean_margin"] > 0
    assert scores["end"]["policy_prefers_chosen"] > scores["start"]["policy_prefers_chosen"]
    assert summary["stage"] == "dpo" and scores["start"]["pairs"] > 40


def test_dpo_with_lora_trains_adapters_only_and_resumes_exactly(prepared, base_checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file

    pairs = preference_pairs(tmp_path / "pairs.jsonl", n=120)
    cfg = _dpo_cfg(prepared, pairs, **{"lora.rank": 4, "dpo.train.max_steps": 8, "dpo.train.save_every": 4,
                                       "train.keep_last": 5})
    dpo(cfg, base_checkpoint, tmp_path / "straight")
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight/checkpoints/step-0000004", tmp_path / "resumed/checkpoints/step-0000004")
    dpo(cfg, base_checkpoint, tmp_path / "resumed")
    a = load_file(str(tmp_path / "straight/checkpoints/step-0000008/model.safetensors"))
    b = load_file(str(tmp_path / "resumed/checkpoints/step-0000008/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(f"{base_checkpoint}/model.safetensors")
    assert all(torch.equal(a[k], w) for k, w in base.items()) and any("lora_b" in k for k in a)


@pytest.mark.slow
def test_run_with_dpo_aligns_after_sft_and_verbs_find_the_aligned_model(tmp_path):
    """`tinylm run --dpo` on the tiny preset: built-in pairs, a dpo/ stage after sft/, found first by every verb."""
    from tinylm.checkpoint import find_checkpoint
    from tinylm.cli import main

    assert main(["run", "--config", "tiny", "--out", str(tmp_path / "run"), "--dpo"]) == 0
    scores = json.loads((tmp_path / "run" / "dpo" / "preference_eval.json").read_text())
    assert scores["start"]["reward_accuracy"] == 0.0 and scores["end"]["pairs"] > 100
    assert find_checkpoint(tmp_path / "run").parent.parent.name == "dpo"
    assert "Preference alignment (DPO)" in (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
