"""Bad input gets a clear error that names the file (and line and field where there is one), and
loses nothing: no half-written output is ever left where a later stage would read it."""

import gzip
import json
import os
import resource
import signal
import subprocess
import sys

import pytest

from tinylm.checkpoint import latest_checkpoint
from tinylm.cli import main
from tinylm.config import DataConfig
from tinylm.conversations import read_conversations
from tinylm.corpus import read_documents


def _run(capsys, *args) -> tuple[int, str]:
    code = main(["run", "--config", "tiny", *args])
    return code, capsys.readouterr().err


def test_an_empty_corpus_stops_before_the_tokenizer_is_trained(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    code, err = _run(capsys, "--out", str(tmp_path / "run"), f"--data.corpus={empty}", "--sft.corpus=[]")
    assert code == 2 and "no training documents in" in err and "empty.txt" in err
    assert not (tmp_path / "run" / "tokenizer").exists()


def test_a_corpus_smaller_than_one_batch_says_what_to_change(tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("Once upon a time there was a cat.\n")
    code, err = _run(capsys, "--out", str(tmp_path / "run"), f"--data.corpus={small}", "--sft.corpus=[]",
                     "--data.val_fraction=0")
    assert code == 2 and "windows of" in err and "use more data" in err


@pytest.mark.parametrize("content, where", [
    (b'{"text": "fine"}\n{"text": "cut\n', "bad.jsonl:2: invalid JSON"),
    (b'{"text": "fine"}\n{"txt": "wrong field"}\n', "bad.jsonl:2: no field 'text'"),
    (b'{"text": "fine"}\n{"text": ["not", "a", "string"]}\n', "bad.jsonl:2: field 'text' must be a string"),
    (b'{"text": "fine"}\n{"text": "\xff\xfe bytes"}\n', "bad.jsonl:2: not valid UTF-8"),
    (b'{"text": "fine"}\n{"text": "half a pair \\ud83d here"}\n', "bad.jsonl:2: field text (character 12: \\ud83d) holds a lone surrogate"),
])
def test_a_bad_corpus_line_is_named(tmp_path, capsys, content, where):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    code, err = _run(capsys, "--out", str(tmp_path / "run"), f"--data.corpus={bad}")
    assert code == 2 and where in err, err


BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("name, content", [
    ("bom.jsonl", BOM + b'{"text": "First document."}\n{"text": "Second."}\n'),
    ("bom.txt", BOM + b"First document.\n<|endoftext|>\nSecond.\n"),
    ("bom.json", BOM + b'[{"content": "First document."}, {"content": "Second."}]'),
    ("bom.jsonl.gz", gzip.compress(BOM + b'{"text": "First document."}\n{"text": "Second."}\n')),
])
def test_a_file_that_starts_with_a_byte_order_mark_is_read_from_its_first_letter(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    texts = [d.text for d in read_documents(DataConfig(corpus=[str(path)]))]
    assert texts == ["First document.", "Second."]


def test_a_conversation_file_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_bytes(BOM + json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                    {"role": "assistant", "content": "Hello"}]}).encode() + b"\n")
    assert [c.messages[0]["content"] for c in read_conversations([str(path)])] == ["Hi"]


def test_a_full_disk_while_saving_keeps_no_half_checkpoint(prepared, tmp_path):
    """The file-size limit makes every write past 300 kB fail as a full disk does: the checkpoint being
    written is discarded, the error names the file, and the same command succeeds once there is room."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tinylm.cli", "pretrain", "--config", "tiny", "--shards", str(prepared["shards"]),
           "--out", str(out), "--train.max_steps=4"]

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    full = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=small_disk,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert full.returncode == 1, full.stderr[-2000:]
    assert "File too large" in full.stderr and "model.safetensors" in full.stderr
    assert latest_checkpoint(out) is None and not list((out / "checkpoints").glob("*.tmp"))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and latest_checkpoint(out).name == "step-0000004"


def test_an_interrupted_output_is_never_half_there(tmp_path):
    """Every stage writes through atomic_dir: a failure mid-way leaves the previous complete output."""
    from tinylm.files import atomic_dir

    target = tmp_path / "tokenizer"
    with atomic_dir(target, "tokenizer") as tmp:
        (tmp / "a.json").write_text("complete")
    with pytest.raises(RuntimeError):
        with atomic_dir(target, "tokenizer") as tmp:
            (tmp / "a.json").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (target / "a.json").read_text() == "complete" and not (tmp_path / "tokenizer.tmp").exists()
    # a kill between "move the old aside" and "move the new in" leaves only the old: it is restored
    os.replace(target, tmp_path / "tokenizer.old")
    with atomic_dir(target, "tokenizer") as tmp:
        assert (target / "a.json").read_text() == "complete"
        (tmp / "a.json").write_text("new")
    assert (target / "a.json").read_text() == "new" and not (tmp_path / "tokenizer.old").exists()


def test_a_huge_line_is_cut_into_pieces_at_whitespace(tmp_path):
    from tinylm.config import DataConfig
    from tinylm.corpus import read_documents

    words = " ".join(f"word{i}" for i in range(20_000))  # one 188 kB line
    (tmp_path / "one.jsonl").write_text('{"text": "%s"}\n' % words)
    docs = list(read_documents(DataConfig(corpus=[str(tmp_path / "one.jsonl")], max_doc_chars=10_000)))
    assert len(docs) > 18 and all(len(d.text) <= 10_000 for d in docs)
    assert "".join(d.text for d in docs) == words  # nothing lost, nothing added
    assert all(d.text.endswith(" ") for d in docs[:-1])  # cut after a space, never inside a word
    assert [d.source.rsplit("#", 1)[1] for d in docs[:2]] == ["part-1", "part-2"]


def test_the_shard_stage_counts_the_documents_it_cut(prepared, tmp_path):
    from tinylm.config import load_config
    from tinylm.corpus import read_documents
    from tinylm.files import read_json
    from tinylm.prepare import shards_stage

    words = " ".join(f"word{i}" for i in range(5_000))  # 38 kB
    (tmp_path / "docs.jsonl").write_text('{"text": "%s"}\n{"text": "a short one"}\n{"text": "%s"}\n' % (words, words[:15_000]))
    cfg = load_config("tiny", {"data.corpus": [str(tmp_path / "docs.jsonl")], "data.max_doc_chars": 10_000,
                               "data.val_fraction": 0.0})
    pieces = sum("#part-" in d.source for d in read_documents(cfg.data))
    shards_stage(cfg, prepared["tokenizer"], tmp_path / "shards", progress=False)
    meta = read_json(tmp_path / "shards" / "meta.json")
    assert meta["cut_documents"] == {"documents": 2, "pieces": pieces, "max_doc_chars": 10_000}
    assert pieces >= 4 + 2 and meta["splits"]["train"]["docs"] == pieces + 1


@pytest.mark.slow
def test_a_100_mb_line_goes_through_the_shard_stage(prepared, tmp_path):
    """A single 100 MB line in a text file: read, cut into 1 MB pieces, tokenized, nothing lost."""
    from tinylm.config import load_config
    from tinylm.prepare import shards_stage
    from tinylm.shards import load_split

    line = ("the cat sat on the mat and looked at the dog " * 2_300_000)[:100_000_000]
    (tmp_path / "huge.txt").write_text(line + "\n")
    cfg = load_config("tiny", {"data.corpus": [str(tmp_path / "huge.txt")], "data.val_fraction": 0.0})
    shards_stage(cfg, prepared["tokenizer"], tmp_path / "shards", progress=False)
    _, info = load_split(tmp_path / "shards", "train")
    assert info["docs"] in (100, 101) and info["bytes"] == 100_000_000  # pieces cut at spaces: just under 1 MB
    cut = json.loads((tmp_path / "shards" / "meta.json").read_text())["cut_documents"]
    assert cut["documents"] == 1 and cut["pieces"] == info["docs"]


def test_a_tokenizer_that_does_not_match_is_refused(prepared, tmp_path):
    """Shards made by one tokenizer are not trained with another, and a run is not resumed with another."""
    import shutil

    from tinylm.checkpoint import CheckpointError
    from tinylm.config import load_config
    from tinylm.pipeline import pretrain
    from tinylm.prepare import tokenizer_stage

    cfg = load_config("tiny", {"data.corpus": [str(prepared["cfg"].data.corpus[0])], "train.max_steps": 2,
                               "tokenizer.vocab_size": 320})
    other = tokenizer_stage(cfg, tmp_path / "other-tokenizer", progress=False)
    with pytest.raises(ValueError, match="was made with another tokenizer"):
        pretrain(cfg, prepared["shards"], tmp_path / "a", tokenizer_dir=other)
    # a run trained with the shards' tokenizer, run again after its tokenizer folder was replaced: refused
    tiny = load_config("tiny", {"data.corpus": [str(prepared["cfg"].data.corpus[0])], "train.max_steps": 2})
    swapped = tmp_path / "tok"
    shutil.copytree(prepared["tokenizer"], swapped)
    pretrain(tiny, prepared["shards"], tmp_path / "b", tokenizer_dir=swapped)
    shutil.rmtree(swapped)
    shutil.copytree(other, swapped)
    with pytest.raises((CheckpointError, ValueError), match="another tokenizer"):
        pretrain(load_config("tiny", {"data.corpus": [str(prepared["cfg"].data.corpus[0])], "train.max_steps": 4}),
                 prepared["shards"], tmp_path / "b", tokenizer_dir=swapped)


@pytest.mark.parametrize("piece_bytes", [7, 64, 1 << 20])  # lines up to PIECE_BYTES come whole
def test_text_read_in_pieces_is_cut_as_the_whole_text_would_be(piece_bytes, tmp_path, monkeypatch):
    """A long line is read in bounded pieces (split inside multi-byte characters too) and cut while it
    streams; the documents equal those of cutting the whole text at once."""
    from tinylm import corpus
    from tinylm.config import DataConfig
    from tinylm.corpus import Document, cut_document, read_text_file

    monkeypatch.setattr(corpus, "PIECE_BYTES", piece_bytes)
    long_line = " ".join(f"wörd{i}—日本" for i in range(3_000))
    text = f"\n\nShort first document.\n\n{long_line}\nand its last line\n\n=====\nA third one.\n"
    path = tmp_path / "mixed.txt"
    path.write_text(text, encoding="utf-8")
    cfg = DataConfig(max_doc_chars=4_000, txt_chunk_chars=10, doc_separator="=====")
    got = list(read_text_file(path, cfg))
    whole = f"{long_line}\nand its last line"
    expected = [Document("Short first document.", f"{path}:1"), *cut_document(Document(whole, f"{path}:5"), 4_000),
                Document("A third one.", f"{path}:9")]
    assert [(d.text, d.source) for d in got] == [(d.text, d.source) for d in expected]


def test_a_json_line_too_long_to_parse_whole_is_named(tmp_path, monkeypatch):
    from tinylm import corpus
    from tinylm.corpus import CorpusError, jsonl_records

    monkeypatch.setattr(corpus, "MAX_RECORD_BYTES", 1000)
    path = tmp_path / "big.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "%s"}\n' % ("x" * 5000))
    with pytest.raises(CorpusError, match=r"big.jsonl:2: a line of more than"):
        list(jsonl_records(path))


@pytest.mark.slow
def test_memory_stays_bounded_for_one_huge_gzipped_line(tmp_path):
    """A single 256 MB line in a .txt.gz (a few hundred kB on disk) is read with memory that does not
    grow with the line: peak RSS measured in a fresh process."""
    import gzip

    path = tmp_path / "one-line.txt.gz"
    chunk = ("the cat sat on the mat and looked at the dog " * 20_000).encode()
    with gzip.open(path, "wb", compresslevel=1) as f:
        for _ in range(256 * 2**20 // len(chunk)):
            f.write(chunk)
        f.write(b"\n")
    code = (
        "import resource, sys\n"
        "from tinylm.config import DataConfig\n"
        "from tinylm.corpus import read_documents\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"n = chars = 0\n"
        f"for d in read_documents(DataConfig(corpus=[{str(path)!r}])):\n"
        "    n += 1; chars += len(d.text)\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(n, chars, (after - before) // 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    docs, chars, grew_mb = map(int, out.stdout.split())
    assert chars >= 256 * 2**20 - len(chunk) and docs > 250  # all of it, in ~1 MB pieces
    assert grew_mb < 64, f"peak memory grew by {grew_mb} MB reading a {chars >> 20} MB line"
