"""Evaluation: scores against hand-computed references and cases whose answer is known."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from tinylm.config import ModelConfig
from tinylm.evaluate import (bits_per_byte, bootstrap_ratio, chat_loss, continuation_logprobs, minimal_pairs,
                             multiple_choice, read_choice_task, wilson_interval)
from tinylm.model import Transformer

from conftest import DATA, tiny_config


def uniform_model(vocab: int) -> Transformer:
    """Zero output weights: every token gets probability 1/vocab whatever came before."""
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, max_seq_len=32, vocab_size=vocab, tie_embeddings=False))
    torch.nn.init.zeros_(model.output.weight)
    return model.eval()


def test_wilson_interval_known_values():
    low, high = wilson_interval(5, 10)
    assert (round(low, 3), round(high, 3)) == (0.237, 0.763)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0


def test_batched_padded_scoring_equals_one_sequence_at_a_time():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=16, vocab_size=50)).eval()
    pairs = [([1, 2, 3], [4, 5]), ([7], [8, 9, 10, 11, 12]), (list(range(1, 15)), [20, 21, 22, 23])]  # the last overflows
    fast = continuation_logprobs(model, pairs, batch_size=3)
    for (ctx, cont), got in zip(pairs, fast):
        seq = (ctx + cont)[-17:]
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([seq[:-1]]))[0][0].float(), -1)
        n = min(len(cont), len(seq) - 1)
        expected = sum(logp[i - 1, seq[i]].item() for i in range(len(seq) - n, len(seq)))
        assert got == pytest.approx(expected, abs=1e-4)


def test_bits_per_byte_of_a_uniform_model_is_log2_vocab_per_token(tokenizer):
    model = uniform_model(tokenizer.vocab_size)
    texts = ["Once upon a time there was a cat. " * 9, "Héllo wörld, ça va?"]  # the first spans several windows
    result = bits_per_byte(model, tokenizer, texts)
    tokens = sum(len(tokenizer.encode_document(t)) - 1 for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert result["tokens"] == tokens and result["bytes"] == n_bytes
    assert result["bits_per_byte"] == pytest.approx(math.log2(tokenizer.vocab_size) * tokens / n_bytes, rel=1e-4)
    assert result["chance"] == pytest.approx(result["bits_per_byte"], rel=1e-4) and result["n"] == 2


def test_bootstrap_interval_brackets_the_ratio_and_shrinks_with_items():
    import numpy as np

    rng = np.random.default_rng(1)
    small, large = rng.exponential(size=(2, 50)), rng.exponential(size=(2, 5000))
    lo_s, hi_s = bootstrap_ratio(small[0], small[1])
    lo_l, hi_l = bootstrap_ratio(large[0], large[1])
    assert lo_s < small[0].sum() / small[1].sum() < hi_s and lo_l < large[0].sum() / large[1].sum() < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 4  # 100x the items: about a tenth of the width


def test_chat_loss_scores_assistant_tokens_only(tokenizer):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=64, vocab_size=tokenizer.vocab_size)).eval()
    chats = [[{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, friend."},
              {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine."}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "4"}]]
    rows = [tokenizer.render_chat(m) for m in chats]
    result = chat_loss(model, rows)
    nll, count = 0.0, 0
    for ids, mask in rows:  # the reference: one conversation at a time, every marked position by hand
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([ids[:-1]]))[0][0].float(), -1)
        for t in range(1, len(ids)):
            if mask[t]:
                nll -= logp[t - 1, ids[t]].item()
                count += 1
    assert result["assistant_tokens"] == count == sum(sum(m[1:]) for _, m in rows) and result["n"] == 2
    assert result["loss"] == pytest.approx(nll / count, abs=1e-4)
    uniform = chat_loss(uniform_model(tokenizer.vocab_size), rows)
    assert uniform["loss"] == pytest.approx(math.log(tokenizer.vocab_size), abs=1e-4) == uniform["chance"]


def test_choice_tasks_load_from_a_dataset_name_like_from_a_file(tmp_path):
    """The hub path (`datasets.load_dataset(name, streaming=True)`) on a local json builder, no network."""
    rows = read_choice_task(str(DATA / "hellaswag_sample.jsonl"), limit=5)
    spec = f"json?data_files={DATA / 'hellaswag_sample.jsonl'}&split=train"
    from_hub_path = read_choice_task(spec, limit=5)
    assert len(from_hub_path) == 5
    assert [(r["ctx"], list(r["endings"]), int(r["label"])) for r in from_hub_path] == \
           [(r["ctx"], list(r["endings"]), int(r["label"])) for r in rows]


def test_minimal_pairs_with_a_known_answer(tokenizer):
    """A uniform model prefers the sentence with fewer tokens, so these answers are known."""
    model = uniform_model(tokenizer.vocab_size)
    rows = [{"sentence_good": "The cat sat.", "sentence_bad": "The cat sat sat sat sat.", "UID": "short_wins"},
            {"sentence_good": "The dog ran and ran and ran.", "sentence_bad": "The dog ran.", "UID": "long_loses"}]
    result = minimal_pairs(model, tokenizer, rows)
    assert result["accuracy"] == 0.5 and result["n"] == 2 and result["chance"] == 0.5
    assert result["by_phenomenon"]["short_wins"]["accuracy"] == 1.0
    assert result["by_phenomenon"]["long_loses"]["accuracy"] == 0.0
    with pytest.raises(ValueError, match=r"bench.jsonl:1: needs string fields"):
        minimal_pairs(model, tokenizer, [{"sentence_good": "x"}], "bench.jsonl")


def test_multiple_choice_raw_and_length_normalised(tokenizer):
    model = uniform_model(tokenizer.vocab_size)
    short, long = "ran.", "ran away into the forest and was never seen again."
    rows = [{"ctx": "The dog", "endings": [long, short], "label": 1},  # HellaSwag fields
            {"question": "The dog", "choices": {"text": [short, long], "label": ["A", "B"]}, "answerKey": "A"}]  # ARC
    result = multiple_choice(model, tokenizer, rows)
    assert result["raw"]["accuracy"] == 1.0 and result["raw"]["chance"] == 0.5  # fewer tokens: the short ending
    # per byte, the uniform model prefers the ending with more bytes per token
    long_per_byte = len(tokenizer.encode(" " + long)) / len((" " + long).encode())
    short_per_byte = len(tokenizer.encode(" " + short)) / len((" " + short).encode())
    assert result["length_normalised"]["accuracy"] == (0.0 if long_per_byte < short_per_byte else 1.0)


def test_eval_verb_on_a_trained_checkpoint(prepared, tmp_path, capsys):
    from tinylm.cli import main
    from tinylm.pipeline import pretrain

    cfg = tiny_config(prepared["cfg"].data.corpus[0], **{"train.max_steps": 10})
    ckpt = pretrain(cfg, prepared["shards"], tmp_path / "pretrain")["checkpoint"]
    blimp = tmp_path / "blimp.jsonl"
    blimp.write_text("".join(open(DATA / "blimp_sample.jsonl").readlines()[:20]))
    # a task file given as a setting (as `tinylm run` takes it) counts like one given as a flag
    args = ["eval", ckpt, f"--eval.blimp={blimp}", "--choice", str(DATA / "hellaswag_sample.jsonl"), "--max-items", "10",
            "--shards", str(prepared["shards"])]
    assert main(args) == 0
    results = json.loads((tmp_path / "pretrain" / "checkpoints" / "step-0000010" / "eval.json").read_text())
    assert results["blimp:blimp.jsonl"]["n"] == 10 and results["choice:hellaswag_sample.jsonl"]["raw"]["n"] == 10
    assert results["validation_shards"]["bits_per_byte"] > 0
    assert "accuracy" in capsys.readouterr().out


def test_nothing_to_score_gives_no_score_and_says_why(tokenizer):
    from tinylm.evaluate import format_score, score_table

    model = uniform_model(tokenizer.vocab_size)
    results = {"text:empty.txt": bits_per_byte(model, tokenizer, [], source="empty.txt"),
               "chat:none.jsonl": chat_loss(model, []),
               "blimp:none.jsonl": minimal_pairs(model, tokenizer, [])}
    assert results["text:empty.txt"]["bits_per_byte"] is None and results["text:empty.txt"]["n"] == 0
    assert results["chat:none.jsonl"]["loss"] is None and results["blimp:none.jsonl"]["accuracy"] is None
    lines = [format_score(row) for row in score_table(results)]
    assert all("no score, n=0" in line and "0.0000" not in line for line in lines), lines
    assert "empty.txt: no document with text to score" in lines[0]


def test_eval_of_an_empty_text_file_and_an_empty_validation_split_scores_nothing(prepared, tmp_path, capsys):
    from tinylm.cli import main
    from tinylm.evaluate import shards_bits_per_byte
    from tinylm.pipeline import pretrain
    from tinylm.shards import build_shards

    cfg = tiny_config(prepared["cfg"].data.corpus[0], **{"train.max_steps": 2})
    ckpt = pretrain(cfg, prepared["shards"], tmp_path / "pretrain")["checkpoint"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert main(["eval", ckpt, "--text", str(empty)]) == 0
    out = capsys.readouterr().out
    assert "bits/byte: no score, n=0" in out and "0.0000" not in out, out
    saved = json.loads((tmp_path / "pretrain" / "checkpoints" / "step-0000002" / "eval.json").read_text())
    assert saved["text:empty.txt"]["bits_per_byte"] is None and "no document" in saved["text:empty.txt"]["why"]
    from tinylm.corpus import Document
    from tinylm.checkpoint import load_checkpoint

    one_doc = build_shards([(Document("A single document that is all of the corpus.", "one"), False)],
                           prepared["tokenizer"], tmp_path / "shards", cfg.data, progress=False)
    assert one_doc["splits"]["val"]["docs"] == 0
    model, _, _ = load_checkpoint(ckpt, "cpu")
    result = shards_bits_per_byte(model, tmp_path / "shards")
    assert result["bits_per_byte"] is None and "validation split" in result["why"]


def test_multiple_choice_reports_lm_evaluation_harness_acc_norm_per_character(tokenizer, monkeypatch):
    """lm-eval's acc_norm divides by len(choice): characters, no leading space; ours by UTF-8 bytes with it."""
    import tinylm.evaluate as evaluate

    accented, plain = "café crème", "cafe creme"  # 10 characters each; 13 and 11 bytes with the space
    monkeypatch.setattr(evaluate, "continuation_logprobs", lambda model, pairs: [-10.0, -9.0])
    result = multiple_choice(uniform_model(tokenizer.vocab_size), tokenizer,
                             [{"ctx": "Coffee:", "endings": [accented, plain], "label": 0}])
    assert result["length_normalised"]["accuracy"] == 1.0  # -10/13 > -9/11
    assert result["lm_eval_acc_norm"]["accuracy"] == 0.0  # -10/10 < -9/10
    assert result["raw"]["accuracy"] == 0.0


def test_position_losses_score_the_t_th_token_of_each_full_window_from_t_tokens(prepared):
    from tinylm.evaluate import masked_logprobs, position_losses
    from tinylm.shards import load_split

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=16, vocab_size=512)).eval()
    losses = position_losses(model, prepared["shards"], batch_size=5)
    arrays, _ = load_split(prepared["shards"], "val")
    windows = [list(map(int, a[s:s + 17])) for a in arrays for s in range(0, len(a) - 1, 16) if len(a[s:s + 17]) == 17]
    assert len(losses) == 16 and len(windows) > 5
    for t in (1, 7, 16):  # the slow reference: each window cut after its t-th scored token, that token alone scored
        rows = [(w[:t + 1], [0] * t + [1]) for w in windows]
        assert losses[t - 1] == pytest.approx(-sum(lp for lp, _ in masked_logprobs(model, rows)) / len(rows), rel=1e-4)
    assert position_losses(model, prepared["shards"], max_windows=2) != losses[:16]  # two windows, other means


def test_a_capped_evaluation_scores_items_spread_over_the_task_not_its_first_ones(prepared, tmp_path):
    from tinylm.evaluate import masked_logprobs, read_jsonl, shards_bits_per_byte, spread
    from tinylm.shards import load_split

    assert spread(10, 3) == [0, 3, 6] and spread(10, 0) == spread(10, 10) == spread(10, 50) == list(range(10))
    assert spread(7, 7) == list(range(7)) and len(set(spread(1000, 999))) == 999
    tasks = tmp_path / "task.jsonl"
    tasks.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(10)))
    assert [r["i"] for r in read_jsonl(tasks, 3)] == [0, 3, 6] and len(read_jsonl(tasks)) == 10

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=16, vocab_size=512)).eval()
    arrays, _ = load_split(prepared["shards"], "val")
    windows = [list(map(int, a[s:s + 17])) for a in arrays for s in range(0, len(a) - 1, 16)]  # the last of each may be short
    assert len(windows) > 6
    for cap in (5, 0):
        picked = [windows[i] for i in spread(len(windows), cap)]
        scored = masked_logprobs(model, [(w, [0] + [1] * (len(w) - 1)) for w in picked], batch_size=1)
        nll, tokens = -sum(lp for lp, _ in scored), sum(n for _, n in scored)
        result = shards_bits_per_byte(model, prepared["shards"], max_windows=cap)
        assert result["n"] == len(picked) and result["tokens"] == tokens
        assert result["loss"] == pytest.approx(nll / tokens, rel=1e-4)
