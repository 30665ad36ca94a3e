import json
import math
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tinylm.checkpoint import latest_checkpoint
from tinylm.corpus import CorpusError
from tinylm.pipeline import pretrain, sft
from tinylm.conversations import FitStats, SFTBatches, SFTRows, build_sft_shards, fit_to_context, read_conversations

from conftest import tiny_config

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def arithmetic_chats(path, n=400, seed=0):
    """Conversations with a learnable answer pattern, half in each accepted format."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            a, b = rng.randrange(5), rng.randrange(5)
            turns = [{"role": "user", "content": f"What is {NUMBERS[a]} plus {NUMBERS[b]}?"},
                     {"role": "assistant", "content": f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}."}]
            key = "conversations" if i % 2 else "messages"
            f.write(json.dumps({key: turns}) + "\n")
    return path


@pytest.fixture(scope="module")
def base_checkpoint(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    cfg = tiny_config(prepared["cfg"].data.corpus[0], **{"train.max_steps": 30})
    return pretrain(cfg, prepared["shards"], out)["checkpoint"]


def test_batch_targets_are_exactly_the_assistant_tokens(tokenizer, tmp_path):
    tok = tokenizer
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."}]
    conv = type("C", (), {"messages": messages, "source": "hand"})
    build_sft_shards([conv], tok, tmp_path, max_tokens=65, val_fraction=0.0)
    x, y = SFTBatches(SFTRows.load(tmp_path, "train"), 64, 1, tok.pad_id).next_batch()
    trained = y[y != -100].tolist()
    assert trained == [*tok.encode("Hello!"), tok.end_id, *tok.encode("Goodbye."), tok.end_id]
    ids, _ = tok.render_chat(messages)
    assert x[0, :len(ids) - 1].tolist() == ids[:-1] and (x[0, len(ids) - 1:] == tok.pad_id).all()
    # the first answer token is predicted from the assistant marker before it
    first = ids.index(tok.role_ids["assistant"])
    assert y[0, first].item() == tok.encode("Hello!")[0]


def test_long_conversations_are_split_into_whole_exchanges(tokenizer):
    messages = [{"role": "system", "content": "sys"}]
    for i in range(12):  # short questions, long answers: a split decided at the question alone would cut answers
        messages += [{"role": "user", "content": f"q{i}?"}, {"role": "assistant", "content": f"answer {i} " * 6}]
    exchange = len(tokenizer.render_chat(messages[:3])[0])
    window = int(2.5 * exchange)  # room for about two exchanges after the system message
    stats = FitStats()
    rows = fit_to_context(tokenizer, messages, window, stats)
    assert len(rows) >= 5 and stats.split == 1 and stats.truncated == 0
    sys_ids = tokenizer.render_chat(messages[:1])[0]
    for ids, mask in rows:
        assert len(ids) <= window and ids[:len(sys_ids)] == sys_ids
        assert ids[len(sys_ids)] == tokenizer.role_ids["user"] and ids[-1] == tokenizer.end_id and mask[-1] == 1
    total_trained = sum(sum(m) for _, m in rows)
    assert total_trained == sum(tokenizer.render_chat(messages)[1])  # every answer token is kept


def test_an_exchange_longer_than_the_context_is_cut_and_counted(tokenizer):
    stats = FitStats()
    rows = fit_to_context(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}], 50, stats)
    assert len(rows) == 1 and len(rows[0][0]) == 50 and stats.truncated == 1


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', r"message 0: field 'role' is 'robot'"),
    ('{"chat": []}', r"no field 'conversations' or 'messages' \(fields present: chat\)"),
    ('{"messages": [{"role": "user", "content": 3}]}', "field 'content' must be a string"),
])
def test_bad_conversations_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "chats.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n' + line + "\n")
    with pytest.raises(CorpusError, match=f"chats.jsonl:2: .*{message}"):
        list(read_conversations([str(path)]))


def _sft_cfg(prepared, chats, **overrides):
    return tiny_config(prepared["cfg"].data.corpus[0], **{
        "sft.corpus": [str(chats)], "sft.val_fraction": 0.2, "sft.train.batch_size": 8, "sft.train.max_steps": 40,
        "sft.train.eval_every": 10, "sft.train.lr": 3e-3, **overrides})


def test_sft_lowers_validation_loss_on_held_out_conversations(prepared, base_checkpoint, tmp_path):
    chats = arithmetic_chats(tmp_path / "chats.jsonl")
    summary = sft(_sft_cfg(prepared, chats), base_checkpoint, tmp_path / "sft")
    meta = json.loads((tmp_path / "sft" / "data" / "meta.json").read_text())
    assert meta["splits"]["val"]["conversations"] > 40 and meta["splits"]["train"]["dropped"] == 0
    records = [json.loads(ln) for ln in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 4 and val[-1] < val[0] - 0.5, val
    assert summary["stage"] == "sft" and math.isfinite(summary["best_val_loss"])
    trained_meta = json.loads((latest_checkpoint(tmp_path / "sft") / "meta.json").read_text())
    assert trained_meta["trainer"]["stage"] == "sft"
    # `tinylm eval` of an SFT checkpoint scores its held-out conversations: the loop's last validation
    # loss (the same rows, batched and padded, under autocast) and the evaluator's agree
    from tinylm.evaluate import evaluate_checkpoint

    chat = evaluate_checkpoint(summary["checkpoint"])["chat:held-out"]
    assert chat["n"] == meta["splits"]["val"]["rows"] and chat["assistant_tokens"] == meta["splits"]["val"]["assistant_tokens"]
    assert chat["loss"] == pytest.approx(val[-1], abs=0.05) and chat["loss"] < chat["chance"]
    assert chat["ci95"][0] < chat["loss"] < chat["ci95"][1]


def test_sft_resumes_exactly(prepared, base_checkpoint, tmp_path):
    chats = arithmetic_chats(tmp_path / "chats.jsonl", n=120)
    cfg = _sft_cfg(prepared, chats, **{"sft.train.max_steps": 8, "train.save_every": 4, "train.keep_last": 5,
                                       "model.dropout": 0.0})
    sft(cfg, base_checkpoint, tmp_path / "straight")
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight/checkpoints/step-0000004", tmp_path / "resumed/checkpoints/step-0000004")
    sft(cfg, base_checkpoint, tmp_path / "resumed")
    a = load_file(str(tmp_path / "straight/checkpoints/step-0000008/model.safetensors"))
    b = load_file(str(tmp_path / "resumed/checkpoints/step-0000008/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    four = load_file(str(tmp_path / "straight/checkpoints/step-0000004/model.safetensors"))
    assert not all(torch.equal(four[k], b[k]) for k in a)


def test_builtin_conversations_are_real_and_alternate():
    first = []
    for conv in read_conversations(["builtin"]):
        first.append(conv)
        if len(first) == 50:
            break
    assert all(c.source.startswith("chitchat-dataset:") for c in first)
    for conv in first:
        roles = [m["role"] for m in conv.messages]
        assert roles[0] == "user" and all(a != b for a, b in zip(roles, roles[1:]))


def test_sft_starts_over_when_the_base_model_changes(prepared, tmp_path):
    chats = arithmetic_chats(tmp_path / "chats.jsonl", n=80)
    base_cfg = tiny_config(prepared["cfg"].data.corpus[0], **{"train.max_steps": 4})
    first = pretrain(base_cfg, prepared["shards"], tmp_path / "base")["checkpoint"]
    cfg = _sft_cfg(prepared, chats, **{"sft.train.max_steps": 3})
    sft(cfg, first, tmp_path / "sft")
    second = pretrain(tiny_config(prepared["cfg"].data.corpus[0], **{"train.max_steps": 6}), prepared["shards"],
                      tmp_path / "base")["checkpoint"]
    assert second != first
    summary = sft(cfg, second, tmp_path / "sft")
    assert summary["steps"] == 3 and (tmp_path / "sft" / "checkpoints.superseded").is_dir()
    meta = json.loads((latest_checkpoint(tmp_path / "sft") / "meta.json").read_text())
    assert meta["config"]["train"]["init_from"] == second


def test_accumulation_weighs_micro_batches_by_answer_tokens(prepared, base_checkpoint, tmp_path):
    """4 conversations x 2 accumulated micro-batches == one batch of 8, though answers differ in length."""
    chats = arithmetic_chats(tmp_path / "chats.jsonl", n=120)
    weights = {}
    for name, batch, accum in (("one", 8, 1), ("accumulated", 4, 2)):
        cfg = _sft_cfg(prepared, chats, **{"sft.train.batch_size": batch, "train.grad_accum": accum, "sft.train.max_steps": 3,
                                           "train.dtype": "fp32", "train.save_every": 0})
        sft(cfg, base_checkpoint, tmp_path / name)
        weights[name] = load_file(str(latest_checkpoint(tmp_path / name) / "model.safetensors"))
    for key, value in weights["one"].items():
        assert torch.allclose(value, weights["accumulated"][key], atol=1e-5), key


def test_loop_validation_is_the_token_weighted_loss_of_its_rows(prepared, base_checkpoint, tmp_path):
    """The training loop's validation equals the evaluator's per-token loss on the same rows.

    Answers differ in length, so a mean of per-batch means (what the loop once computed) differs
    from the per-token mean; batches drawn in a fixed shuffled order cover every row here.
    """
    from tinylm.checkpoint import load_checkpoint
    from tinylm.evaluate import chat_loss
    from tinylm.pipeline import VAL_SEED, sft_data_stage
    from tinylm.train import evaluate, setup_runtime

    chats = arithmetic_chats(tmp_path / "chats.jsonl", n=200)
    cfg = _sft_cfg(prepared, chats, **{"train.dtype": "fp32"})
    data = sft_data_stage(cfg, base_checkpoint, tmp_path / "data", progress=False)
    model, tok, _ = load_checkpoint(base_checkpoint)
    rows = SFTRows.load(data, "val")
    rt = setup_runtime(cfg.train)
    batch = 3
    n_batches = len(rows) // batch  # the tail that does not fill a batch is left out on both sides
    loop = evaluate(model, lambda: SFTBatches(rows, model.cfg.max_seq_len, batch, tok.pad_id, VAL_SEED),
                    n_batches, rt)
    order = SFTBatches(rows, model.cfg.max_seq_len, batch, tok.pad_id, VAL_SEED)._order[:n_batches * batch]
    with torch.no_grad():
        reference = chat_loss(model, [tuple(a.tolist() for a in rows.row(int(i))) for i in order])
        lengths = [int(rows.row(int(i))[1][1:].sum()) for i in order]
    assert len(set(lengths)) > 1  # answers of different lengths, or the weighting would not matter
    assert loop == pytest.approx(reference["loss"], abs=1e-4)


def test_sft_counts_real_tokens_and_the_log_shows_flops_and_mfu(prepared, base_checkpoint, tmp_path):
    """tokens and tok/s count the conversation tokens of each batch, never its padding; TFLOP/s is
    tokens/s times the model's FLOPs per token, and MFU that over the peak named in the preflight."""
    from tinylm.model import Transformer
    from tinylm.device import peak_flops
    from tinylm.tokenizer import Tokenizer

    chats = arithmetic_chats(tmp_path / "chats.jsonl", n=120)
    cfg = _sft_cfg(prepared, chats, **{"sft.train.max_steps": 3, "train.grad_accum": 2, "train.dtype": "fp32"})
    sft(cfg, base_checkpoint, tmp_path / "sft")
    records = [json.loads(ln) for ln in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    pad = Tokenizer.load(base_checkpoint).pad_id
    replay = SFTBatches(SFTRows.load(tmp_path / "sft" / "data", "train"), 64, 8, pad, cfg.train.seed)
    batches = [replay.next_batch()[0] for _ in range(6)]
    real = [int((x != pad).sum()) for x in batches]
    assert [r["tokens"] for r in records] == [sum(real[:2]), sum(real[:4]), sum(real)]
    assert sum(real) < sum(x.numel() for x in batches)  # there was padding to leave out
    model = Transformer(load_checkpoint_cfg(base_checkpoint))
    peak, source = peak_flops(torch.device("cpu"), torch.float32)
    for r in records:
        step_tokens = r["tokens"] - (records[records.index(r) - 1]["tokens"] if r["step"] > 1 else 0)
        dt = step_tokens / r["tok_per_s"]
        assert r["tflops"] == pytest.approx(step_tokens * model.flops_per_token(64) / dt / 1e12, rel=1e-2)
        assert r["mfu"] == pytest.approx(r["tflops"] * 1e12 / peak, rel=1e-2)
    log = (tmp_path / "sft" / "train.log").read_text()
    assert f"MFU against {peak / 1e12:,.2f} TFLOP/s ({source})" in log and " MFU " in log


def load_checkpoint_cfg(path):
    from tinylm.checkpoint import checkpoint_model_config

    return checkpoint_model_config(path)
