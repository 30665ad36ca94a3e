"""Outputs never cost the user anything: `--out` replaces only an earlier output of the same kind,
never a folder of someone else's files, the input being read or a file; one process writes a folder
at a time; a damaged output is rebuilt; a damaged checkpoint file ends in one line naming it."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinylm.checkpoint import latest_checkpoint
from tinylm.cli import main
from tinylm.files import LockedError, output_lock

from conftest import tiny_config


@pytest.fixture(scope="module")
def ckpt(prepared, tmp_path_factory):
    from tinylm.pipeline import pretrain

    out = tmp_path_factory.mktemp("pretrained") / "pretrain"
    cfg = tiny_config(prepared["cfg"].data.corpus[0], **{"train.max_steps": 2})
    return Path(pretrain(cfg, prepared["shards"], out)["checkpoint"])


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    path.write_text("".join(json.dumps({"messages": turn}) + "\n" for _ in range(20)))
    return path


def _user_folder(path: Path) -> dict:
    path.mkdir(parents=True, exist_ok=True)
    (path / "thesis.txt").write_text("years of work")
    (path / "config.toml").write_text("# mine\n")
    return {p.name: p.read_bytes() for p in path.iterdir()}


def _verbs(prepared, ckpt, corpus, chats):
    tiny = ["--config", "tiny", f"--data.corpus={corpus}"]
    return {
        "collect": ["collect", "--config", "tiny", f"--collect.files={corpus}"],
        "clean": ["clean", *tiny],
        "tokenizer": ["tokenizer", *tiny],
        "shards": ["shards", "--tokenizer", str(prepared["tokenizer"]), *tiny],
        "pretrain": ["pretrain", "--shards", str(prepared["shards"]), "--config", "tiny", "--train.max_steps=1"],
        "sft": ["sft", str(ckpt), f"--sft.corpus={chats}", "--sft.train.max_steps=1"],
        "export-hf": ["export", str(ckpt)],
        "export-gguf": ["export", str(ckpt), "--format", "gguf"],
        "run": ["run", *tiny, "--sft.corpus=[]", "--train.max_steps=1"],
        "generate": ["generate", str(ckpt), "--prompt", "Once"],
        "chat": ["chat", str(ckpt)],
    }


VERBS = ["collect", "clean", "tokenizer", "shards", "pretrain", "sft", "export-hf", "export-gguf", "run", "generate", "chat"]


@pytest.mark.parametrize("verb", VERBS)
def test_a_folder_of_other_files_is_refused_and_left_intact(verb, prepared, ckpt, chats, corpus_file, tmp_path, capsys):
    args = _verbs(prepared, ckpt, corpus_file, chats)[verb]
    mine = tmp_path / "mydocs"
    before = _user_folder(mine)
    code = main([*args, "--out", str(mine)])
    err = capsys.readouterr().err
    assert code != 0 and "files that tinylm did not write" in err and str(mine) in err, err
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before


@pytest.mark.parametrize("verb", ["tokenizer", "pretrain", "export-hf", "run"])
def test_a_file_as_out_is_refused_and_kept(verb, prepared, ckpt, chats, corpus_file, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    code = main([*_verbs(prepared, ckpt, corpus_file, chats)[verb], "--out", str(target)])
    err = capsys.readouterr().err
    assert code != 0 and "is a file" in err, err
    assert target.read_text() == "keep me" and not (tmp_path / "notes.txt.old").exists()


def test_an_export_into_its_own_input_is_refused(ckpt, capsys):
    stage = ckpt.parent.parent
    for out in (stage, ckpt, ckpt / "hf", stage.parent):  # the stage, the checkpoint, inside it, above it
        code = main(["export", str(ckpt), "--out", str(out)])
        err = capsys.readouterr().err
        assert code != 0 and ("holds the input" in err or "lies inside the input" in err), (out, err)
    assert latest_checkpoint(stage) == ckpt and (ckpt / "model.safetensors").is_file()


def test_an_earlier_output_of_the_same_kind_is_replaced(ckpt, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(ckpt), "--out", str(out)]) == 0
    (out / "config.json").write_text("{}")  # the new export replaces the old one whole
    assert main(["export", str(ckpt), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    code = main(["export", str(ckpt), "--out", str(out), "--format", "gguf"])  # another kind: refused
    assert code != 0 and "a tinylm hf-export output" in capsys.readouterr().err


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path):
    target = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from tinylm.files import output_lock\n"
        f"with output_lock({str(target)!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"PID {holder.pid}"):
            with output_lock(target):
                pass
    finally:
        holder.kill()
        holder.wait()
    with output_lock(target):  # a killed holder leaves nothing locked
        with output_lock(target):  # and one process may enter twice
            pass
    assert not (tmp_path / ".run.lock").exists()


def test_two_runs_in_one_folder_one_is_refused(prepared, corpus_file, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tinylm.cli", "pretrain", "--shards", str(prepared["shards"]), "--config", "tiny",
           "--train.max_steps=400", "--train.save_every=50", "--out", str(out)]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").is_file() and time.time() < deadline:
            time.sleep(0.05)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1 and f"PID {first.pid}" in second.stderr, second.stderr
    finally:
        first.kill()
        first.wait()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"step"' in line]
    assert len(steps) == len(set(steps))  # no step written twice


def test_a_damaged_stage_output_is_rebuilt(prepared, corpus_file, tmp_path, capsys):
    from tinylm.prepare import shards_stage

    out = tmp_path / "shards"
    cfg = prepared["cfg"]
    shards_stage(cfg, prepared["tokenizer"], out, progress=False)
    shard = sorted(out.glob("*.bin"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)  # as a killed copy or a second writer would leave it
    capsys.readouterr()
    shards_stage(cfg, prepared["tokenizer"], out, progress=False)
    said = capsys.readouterr().out
    assert "damaged or incomplete" in said and "tokenizing" in said
    shards_stage(cfg, prepared["tokenizer"], out, progress=False)
    assert "up to date" in capsys.readouterr().out  # the rebuilt one verifies


def test_latest_never_names_an_incomplete_checkpoint(ckpt, tmp_path):
    import shutil

    stage = tmp_path / "stage"
    shutil.copytree(ckpt.parent.parent, stage)
    named = stage / "checkpoints" / ckpt.name
    (named / "model.safetensors").write_bytes(b"")  # a second writer's half-copied weights
    assert latest_checkpoint(stage) != named


@pytest.mark.parametrize("edit, says", [
    (lambda m: m.pop("model"), "'model' is missing"),
    (lambda m: m.update(model=[1, 2]), "'model' should be a dict"),
    (lambda m: m["model"].update(dim="wide"), "model.dim"),
    (lambda m: m["model"].update(colour="blue"), "colour"),
    (lambda m: m["trainer"].update(step="ten"), "trainer.step"),
])
def test_a_hand_edited_meta_json_is_named(edit, says, ckpt, tmp_path, capsys):
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    meta = json.loads((copy / "meta.json").read_text())
    edit(meta)
    (copy / "meta.json").write_text(json.dumps(meta))
    for verb in (["info", str(copy)], ["generate", str(copy), "--prompt", "Once"]):
        code = main(verb)
        err = capsys.readouterr().err
        assert code == 2 and str(copy / "meta.json") in err and says in err, err
        assert "Traceback" not in err


class Boom:
    """Unpickling this runs a shell command."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_a_code_running_trainer_state_is_refused_without_bad_advice(ckpt, tmp_path):
    import pickle
    import shutil

    from tinylm.checkpoint import CheckpointError, load_trainer_state

    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    (copy / "trainer_state.pt").write_bytes(pickle.dumps(Boom(tmp_path / "pwned")))
    with pytest.raises(CheckpointError) as e:
        load_trainer_state(copy)
    assert "not a tinylm trainer state" in str(e.value) and "weights_only=False" in str(e.value)
    assert "Re-running `torch.load`" not in str(e.value) and not (tmp_path / "pwned").exists()


def test_a_deeply_nested_jsonl_line_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "deep.jsonl"
    bad.write_text('{"text": "fine"}\n' + '{"text": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    code = main(["tokenizer", "--config", "tiny", f"--data.corpus={bad}", "--out", str(tmp_path / "tok")])
    err = capsys.readouterr().err
    assert code == 2 and "deep.jsonl:2" in err and "Traceback" not in err, err


def test_a_fifo_is_not_called_missing(tmp_path, capsys):
    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)
    code = main(["run", "--config", "tiny", f"--data.corpus={fifo}", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "not a regular file" in err and "no such file" not in err, err


def test_a_missing_sft_corpus_stops_the_run_before_pretraining(corpus_file, tmp_path, capsys):
    code = main(["run", "--config", "tiny", f"--data.corpus={corpus_file}", "--sft.corpus=nowhere.jsonl",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "sft.corpus" in err and "nowhere.jsonl" in err, err
    assert not (tmp_path / "run" / "tokenizer").exists() and not (tmp_path / "run" / "pretrain").exists()


@pytest.mark.parametrize("existed", [False, True])
def test_a_setting_refused_after_the_claim_leaves_no_output_behind(existed, prepared, tmp_path, capsys):
    """The folder is claimed before training checks the model's settings: a refusal undoes the claim."""
    out = tmp_path / "pretrain"
    if existed:
        out.mkdir()
    code = main(["pretrain", "--shards", str(prepared["shards"]), "--config", "tiny", "--train.max_steps=1",
                 "--train.guided_heads=previous:9.0", "--out", str(out)])  # tiny has 2 layers: refused in training
    err = capsys.readouterr().err
    assert code == 2 and "guided_heads" in err and "layers 0-1" in err, err
    assert out.exists() == existed and (not existed or not any(out.iterdir()))


def test_an_undone_claim_keeps_what_the_work_wrote(tmp_path):
    from tinylm.files import MARKER, claimed_folder

    with pytest.raises(RuntimeError), claimed_folder(tmp_path / "out", "run") as out:
        (out / "corpus.jsonl").write_text("{}\n")
        raise RuntimeError("failed after writing")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([MARKER, "corpus.jsonl"])
