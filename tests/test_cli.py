import json
import os
import socket
import subprocess
import sys

import pytest

from tinylm.cli import _leave_process_group, main


def test_cli_generate_and_info(prepared, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", "tiny", "--shards", str(prepared["shards"]), "--out", str(run),
                 "--train.max_steps", "4"]) == 0
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "Once upon", "--sample.max_new_tokens=5", "--sample.seed=3",
                 "--out", str(tmp_path / "gen")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Once upon")
    saved = json.loads((tmp_path / "gen" / "generations.json").read_text())
    assert saved["samples"][0]["prompt"] == "Once upon" and (tmp_path / "gen" / "config.toml").is_file()
    assert main(["info", str(run)]) == 0
    assert "parameters:" in capsys.readouterr().out


def test_a_verb_refuses_settings_it_does_not_read(capsys):
    assert main(["export", "/nonexistent/run", "--nosuch.key=1"]) == 2
    assert "`tinylm export` reads no config settings: --nosuch.key would do nothing" in capsys.readouterr().err
    assert main(["generate", "/nonexistent/run", "--train.lr=1"]) == 2
    assert "`tinylm generate` reads only [sample]" in capsys.readouterr().err
    assert main(["pretrain", "--shards", "x", "--data.corpus=a.txt"]) == 2
    assert "reads only [model], [train]" in capsys.readouterr().err


def test_every_verb_help_lists_the_settings_it_reads(capsys):
    from tinylm.cli import VERB_SECTIONS, VERBS
    from tinylm.config import Config

    for verb in VERBS:
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        out = capsys.readouterr().out
        sections = VERB_SECTIONS.get(verb, ())
        for section, values in Config().to_dict().items():
            listed = [name for name in values if f"--{section}.{name}" in out]
            assert listed == (list(values) if section in sections else []), (verb, section)
        if not sections:
            assert "reads no config settings" in out


def test_sft_takes_train_settings_from_the_command_line(prepared, tmp_path, capsys):
    """`tinylm sft CKPT --train.lr=X` fine-tunes with X (and records it); `--sft.train.*` still works."""
    from test_sft import arithmetic_chats

    base = tmp_path / "base"
    assert main(["pretrain", "--config", "tiny", "--shards", str(prepared["shards"]), "--out", str(base),
                 "--train.max_steps=2"]) == 0
    chats = arithmetic_chats(tmp_path / "chats.jsonl", n=60)
    assert main(["sft", str(base), "--out", str(tmp_path / "sft"), f"--sft.corpus={chats}", "--train.lr=0.00123",
                 "--train.max_steps=2", "--sft.train.warmup_steps=1", "--train.compile=false"]) == 0
    meta = json.loads((tmp_path / "sft/checkpoints/step-0000002/meta.json").read_text())
    train = meta["config"]["train"]
    assert train["lr"] == 0.00123 and train["max_steps"] == 2 and train["warmup_steps"] == 1
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "sft/metrics.jsonl").read_text().splitlines()]
    assert max(lrs) == pytest.approx(0.00123)  # the schedule peaked at it (warmup of 1 step)


def test_cli_errors_are_one_line(capsys):
    assert main(["run", "--config", "tiny", "--train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tinylm: error:") and "did you mean 'lr'" in err
    assert main(["generate", "/nonexistent/run"]) == 2
    assert "no checkpoint here" in capsys.readouterr().err


def test_chat_loop_keeps_history_and_obeys_commands(prepared, tmp_path):
    from tinylm.chat import chat_loop
    from tinylm.config import load_config
    from tinylm.pipeline import pretrain

    cfg = load_config("tiny", {"data.corpus": prepared["cfg"].data.corpus, "train.max_steps": 2,
                               "sample.max_new_tokens": 8})
    pretrain(cfg, prepared["shards"], tmp_path / "run")
    lines = iter(["/set temperature 0", "/set temprature 1", "hello", "/reset", "again", "/quit"])
    printed = []
    chat_loop(str(tmp_path / "run"), cfg, input_fn=lambda _: next(lines),
              print_fn=lambda *a, **k: printed.append(" ".join(map(str, a))), out_dir=str(tmp_path / "chat"))
    text = "\n".join(printed)
    assert "(temperature = 0.0)" in text and "did you mean 'temperature'" in text and "(history cleared)" in text
    transcript = json.loads((tmp_path / "chat" / "transcript.json").read_text())["messages"]
    assert [m["role"] for m in transcript] == ["user", "assistant", "user", "assistant"]


def test_chat_history_is_trimmed_to_the_context(prepared, tmp_path):
    from tinylm.api import load
    from tinylm.config import load_config
    from tinylm.pipeline import pretrain

    cfg = load_config("tiny", {"data.corpus": prepared["cfg"].data.corpus, "train.max_steps": 1})
    pretrain(cfg, prepared["shards"], tmp_path / "run")
    lm = load(tmp_path / "run")
    history = [{"role": "system", "content": "be nice"}] + [
        {"role": r, "content": "word " * 10} for r in ("user", "assistant") * 4]
    trimmed, dropped = lm.fit_messages(history, max_new_tokens=10)
    assert dropped > 0 and trimmed[0]["role"] == "system" and trimmed[-1] == history[-1]
    assert len(lm.tokenizer.render_chat(trimmed, True)[0]) + 10 <= lm.context_length


LEAVE_GROUP = """
import atexit, os, sys, torch, torch.distributed as dist
from tinylm.cli import _leave_process_group
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[1], rank=0, world_size=1)
torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))  # after this the group outlives destroy
atexit.register(lambda: print("interpreter teardown ran"))
print("summary written", end="")  # no newline: still in the buffer when the process ends
_leave_process_group(130)
print("returned")
"""


def test_a_rank_leaves_the_group_without_interpreter_teardown(tmp_path):
    """Under a process group the CLI ends the rank itself: same exit code, output flushed, no teardown."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "leave.py"
    script.write_text(LEAVE_GROUP)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout to a pipe is buffered
    done = subprocess.run([sys.executable, str(script), str(port)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stdout == "summary written"
    assert _leave_process_group(3) == 3  # without a group: just the code back


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(lm, prepared, tmp_path, monkeypatch):
    """Ctrl-C (a KeyboardInterrupt while a reply is printing) ends that reply only: its words so far are
    kept, the next turn sees the whole history, and /set refuses what the sampler cannot do."""
    from tinylm.api import LanguageModel
    from tinylm.chat import chat_loop
    from tinylm.config import load_config

    cfg = load_config("tiny", {"data.corpus": prepared["cfg"].data.corpus, "sample.temperature": 0})
    seen, stream_chat = [], LanguageModel.stream_chat
    monkeypatch.setattr(LanguageModel, "stream_chat", lambda self, history, **kw: seen.append(list(history)) or stream_chat(self, history, **kw))
    lines = iter(["/set max_new_tokens 250", "hello there", "/set top_p 0", "/set top_p 2", "and again", "/quit"])
    printed, pieces, interrupted = [], [], []

    def print_fn(*a, end="\n", **k):
        if end == "" and a and a[0] not in ("bot> ", " [stopped]"):
            pieces.append(a[0])
            if len(seen) == 1 and len(pieces) == 2:
                interrupted.append("".join(pieces).strip())
                raise KeyboardInterrupt  # the user presses Ctrl-C during the first reply
        printed.append(" ".join(map(str, a)))

    assert chat_loop(lm.meta["path"], cfg, input_fn=lambda _: next(lines), print_fn=print_fn,
                     out_dir=str(tmp_path / "chat")) == 0
    text = "\n".join(printed)
    assert "(top_p = 0.0)" in text and "top_p=2.0: must be between 0 and 1" in text and " [stopped]" in text
    transcript = json.loads((tmp_path / "chat" / "transcript.json").read_text())["messages"]
    assert [m["content"] for m in transcript if m["role"] == "user"] == ["hello there", "and again"]
    assert transcript[1]["content"] == interrupted[0]  # the interrupted reply: the words before Ctrl-C
    assert [m["content"] for m in seen[1]][:2] == ["hello there", interrupted[0]]  # history kept
    assert seen[1][-1]["content"] == "and again"


def test_generate_with_top_p_zero(lm, capsys):
    assert main(["generate", lm.meta["path"], "--prompt", "Once upon", "--sample.top_p=0", "--sample.max_new_tokens=5"]) == 0
    assert main(["generate", lm.meta["path"], "--prompt", "Once upon", "--sample.top_p=3"]) == 2
    assert "top_p=3.0: must be between 0 and 1" in capsys.readouterr().err


def test_ctrl_c_inside_the_generator_keeps_the_chat(lm, prepared, tmp_path, monkeypatch):
    """The usual case: SIGINT lands while the model computes, so the KeyboardInterrupt leaves the generator."""
    from tinylm.api import LanguageModel
    from tinylm.chat import chat_loop
    from tinylm.config import load_config

    calls = []

    def stream_chat(self, history, **kw):
        calls.append([m["content"] for m in history])
        yield "first words"
        if len(calls) == 1:
            raise KeyboardInterrupt
        yield " and more"

    monkeypatch.setattr(LanguageModel, "stream_chat", stream_chat)
    lines = iter(["hi", "again", "/quit"])
    cfg = load_config("tiny", {"data.corpus": prepared["cfg"].data.corpus})
    assert chat_loop(lm.meta["path"], cfg, input_fn=lambda _: next(lines), print_fn=lambda *a, **k: None,
                     out_dir=str(tmp_path)) == 0
    assert calls[1] == ["hi", "first words", "again"]
    transcript = json.loads((tmp_path / "transcript.json").read_text())["messages"]
    assert [m["content"] for m in transcript] == ["hi", "first words", "again", "first words and more"]
