import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tinylm.config import DataConfig
from tinylm.corpus import CorpusError, Document, is_validation, read_documents, split_documents
from tinylm.data import PackedBatches
from tinylm.files import read_json
from tinylm.shards import build_shards, load_split

from conftest import STORIES


def _docs(n=120):
    stories = STORIES.read_text(encoding="utf-8").split("<|endoftext|>")
    return [Document(s.strip(), f"story{i}") for i, s in enumerate(stories[:n]) if s.strip()]


def with_split(docs, fraction):
    return ((d, is_validation(d.text, fraction)) for d in docs)


def test_tail_split_holds_out_the_end_of_the_text(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(f"Paragraph {i}. " + "words " * 40 for i in range(100)))
    cfg = DataConfig(corpus=[str(book)], txt_chunk_chars=500, val_fraction=0.1, val_split="tail")
    pairs = list(split_documents(cfg))
    flags = [held_out for _, held_out in pairs]
    assert flags == sorted(flags)  # every training document comes before every validation one
    val_chars = sum(len(d.text) for d, held_out in pairs if held_out)
    assert 0.08 < val_chars / sum(len(d.text) for d, _ in pairs) <= 0.12
    assert "Paragraph 99." in pairs[-1][0].text and pairs[-1][1]
    with pytest.raises(CorpusError, match="val_split"):
        list(split_documents(DataConfig(corpus=[str(book)], val_split="random")))


def _split_tokens(folder, split):
    arrays, _ = load_split(folder, split)
    return np.concatenate(arrays) if arrays else np.array([], dtype=np.int64)


def test_shards_hold_every_document_once_in_order(prepared, tokenizer, tmp_path):
    docs = _docs()
    cfg = DataConfig(shard_tokens=5000, workers=2, val_fraction=0.2)
    meta = build_shards(with_split(docs, 0.2), prepared["tokenizer"], tmp_path / "s", cfg, progress=False)
    assert len(meta["splits"]["train"]["files"]) > 1  # several shard files
    for split, want_val in (("train", False), ("val", True)):
        expected = [t for d in docs if is_validation(d.text, 0.2) == want_val for t in tokenizer.encode_document(d.text)]
        assert _split_tokens(tmp_path / "s", split).tolist() == expected
        assert meta["splits"][split]["bytes"] == sum(len(d.text.encode()) for d in docs if is_validation(d.text, 0.2) == want_val)
    assert meta["splits"]["val"]["docs"] > 0 and meta["dtype"] == "uint16"


def test_parallel_sharding_equals_single_process(prepared, tmp_path):
    docs = _docs(200)
    one = build_shards(with_split(docs, 0.05), prepared["tokenizer"], tmp_path / "one", DataConfig(workers=1), progress=False)
    two = build_shards(with_split(docs, 0.05), prepared["tokenizer"], tmp_path / "two", DataConfig(workers=2), progress=False)
    assert one["splits"] == two["splits"]
    for split in ("train", "val"):
        assert np.array_equal(_split_tokens(tmp_path / "one", split), _split_tokens(tmp_path / "two", split))


def test_split_is_stable_and_near_the_fraction():
    texts = [f"document number {i}" for i in range(4000)]
    picks = [is_validation(t, 0.1) for t in texts]
    assert picks == [is_validation(t, 0.1) for t in texts]
    assert 0.08 < sum(picks) / len(picks) < 0.12


def test_readers_for_both_seed_formats_and_text(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "first seed"}\n\n{"text": "second line"}\n')
    (tmp_path / "b.json").write_text(json.dumps([{"content": "second seed", "source": "wiki"}]))
    (tmp_path / "c.txt").write_text("story one\n<|endoftext|>\nstory two\n")
    docs = list(read_documents(DataConfig(corpus=[str(tmp_path)])))
    assert [d.text for d in docs] == ["first seed", "second line", "second seed", "story one", "story two"]
    assert docs[1].source.endswith("a.jsonl:3") and "(wiki)" in docs[2].source


def test_long_text_files_are_cut_at_blank_lines(tmp_path):
    paragraphs = [f"paragraph {i} " + "word " * 50 for i in range(40)]
    (tmp_path / "book.txt").write_text("\n\n".join(paragraphs) + "\n")
    docs = list(read_documents(DataConfig(corpus=[str(tmp_path / "book.txt")], txt_chunk_chars=1000)))
    assert len(docs) > 5 and all(len(d.text) < 1600 for d in docs)
    assert "\n\n".join(d.text for d in docs) == "\n\n".join(paragraphs)


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": broken}\n', r"bad.jsonl:2: invalid JSON"),
    ('{"text": "ok"}\n{"body": "x"}\n', r"bad.jsonl:2: no field 'text' or 'content' \(fields present: body\)"),
    ('{"text": 5}\n', r"bad.jsonl:1: field 'text' must be a string"),
])
def test_bad_records_name_file_line_and_field(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(CorpusError, match=message):
        list(read_documents(DataConfig(corpus=[str(tmp_path / "bad.jsonl")])))


def test_invalid_utf8_names_the_line(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"fine\nbroken \xff here\n")
    with pytest.raises(CorpusError, match=r"bad.txt:2: not valid UTF-8"):
        list(read_documents(DataConfig(corpus=[str(tmp_path / "bad.txt")])))


MEMORY_PROBE = textwrap.dedent("""
    import resource, sys
    from tinylm.config import DataConfig
    from tinylm.corpus import split_documents
    from tinylm.shards import build_shards
    corpus, tokenizer, out = sys.argv[1:4]
    cfg = DataConfig(corpus=[corpus], shard_tokens=2_000_000, workers=2)
    meta = build_shards(split_documents(cfg), tokenizer, out, cfg, progress=False)
    # ru_maxrss of this process survives exec from the (large) test process, so read VmHWM instead
    status = open("/proc/self/status").read()
    own_peak_kb = int(status.split("VmHWM:")[1].split()[0])
    peak_kb = max(own_peak_kb, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # workers
    print(peak_kb * 1024, meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"])
""")


def _peak_rss_building(corpus_mb: int, tmp_path, tokenizer_dir) -> tuple[int, int]:
    corpus = tmp_path / f"corpus{corpus_mb}.txt"
    text = STORIES.read_text(encoding="utf-8")
    with open(corpus, "w", encoding="utf-8") as f:
        for _ in range(corpus_mb * 2**20 // len(text.encode("utf-8"))):
            f.write(text)
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(corpus), str(tokenizer_dir), str(tmp_path / f"s{corpus_mb}")],
                         capture_output=True, text=True, check=True)
    corpus.unlink()
    peak, tokens = map(int, out.stdout.split())
    return peak, tokens


@pytest.mark.slow
def test_sharding_memory_does_not_grow_with_the_corpus(prepared, tmp_path):
    small, small_tokens = _peak_rss_building(4, tmp_path, prepared["tokenizer"])
    large, large_tokens = _peak_rss_building(40, tmp_path, prepared["tokenizer"])
    assert large_tokens > 9 * small_tokens
    assert large - small < 15 * 2**20, (small, large)  # 36 MB more text, under 15 MB more peak memory
    assert large < 40 * 2**20 * 2  # well under the size of the text


@pytest.mark.slow
def test_corpus_larger_than_the_memory_limit(prepared, tmp_path):
    """400 MB of text through a process tree that never holds more than 150 MB."""
    peak, tokens = _peak_rss_building(400, tmp_path, prepared["tokenizer"])
    assert tokens > 100_000_000
    assert peak < 150 * 2**20, peak


# --- the packed loader ----------------------------------------------------------------------------
def _arrays():
    return [np.arange(1000, dtype=np.uint16), np.arange(1000, 1733, dtype=np.uint16)]


def test_windows_are_packed_and_shifted():
    loader = PackedBatches(_arrays(), seq_len=16, batch_size=4, seed=1)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 16)
    assert (y[:, :-1] == x[:, 1:]).all() and (y[:, -1] == x[:, -1] + 1).all()


def test_an_epoch_visits_every_window_once():
    loader = PackedBatches(_arrays(), seq_len=16, batch_size=2, seed=1)
    starts = []
    for _ in range(loader.steps_per_epoch):
        x, _ = loader.next_batch()
        starts += x[:, 0].tolist()
    # each shard keeps 15 tokens spare for the later epochs' shift: (1000 - 16) // 16 + (733 - 16) // 16
    every = [i * 16 for i in range(61)] + [1000 + i * 16 for i in range(44)]  # 105 windows
    assert loader.n_windows == 105
    assert len(set(starts)) == len(starts) == 104 and set(starts) <= set(every)  # the odd one waits
    loader.next_batch()
    assert loader.epoch == 1


def test_later_epochs_cut_the_text_at_a_new_offset():
    """A text seen many times is not cut at the same places each pass: from the second epoch on, every
    window starts at an offset drawn from (seed, epoch), still seq_len + 1 consecutive tokens of one
    shard, and the windows of one epoch do not overlap."""
    text = np.arange(5000, dtype=np.uint16)
    loader = PackedBatches([text], seq_len=16, batch_size=4, seed=7)
    assert loader.n_windows == (5000 - 16) // 16
    offsets = []
    for epoch in range(6):
        loader.load_state_dict({"epoch": epoch, "cursor": 0, "n_windows": loader.n_windows})
        rows = [loader.fetch([i])[0][0].numpy() for i in range(loader.n_windows)]
        starts = np.array([int(r[0]) for r in rows])
        assert all(np.array_equal(r, np.arange(s, s + 16)) for r, s in zip(rows, starts))
        assert (np.diff(starts) == 16).all() and starts[-1] + 17 <= len(text)
        offsets.append(int(starts[0]))
    assert offsets[0] == 0 and len(set(offsets[1:])) > 2 and all(0 <= o < 16 for o in offsets)


@pytest.mark.parametrize("shuffle", [True, False])
def test_validation_windows_do_not_move(shuffle):
    """recut=False (validation, in either order) keeps the fixed windows of offset 0 and every window a shard holds."""
    val = PackedBatches(_arrays(), seq_len=16, batch_size=3, seed=0, shuffle=shuffle, recut=False)
    assert val.n_windows == 999 // 16 + 732 // 16
    for _ in range(2 * val.steps_per_epoch + 1):
        x, _ = val.next_batch()
        assert all(int(s) % 16 == 0 or (int(s) - 1000) % 16 == 0 for s in x[:, 0])


def test_ranks_partition_what_one_process_sees():
    single = PackedBatches(_arrays(), seq_len=16, batch_size=4, seed=3)
    ranks = [PackedBatches(_arrays(), seq_len=16, batch_size=2, seed=3, rank=r, world=2) for r in range(2)]
    for _ in range(30):  # crosses an epoch boundary
        x, _ = single.next_batch()
        parts = [r.next_batch()[0] for r in ranks]
        assert np.array_equal(x.numpy(), np.concatenate([p.numpy() for p in parts]))


def test_loader_resumes_exactly():
    a = PackedBatches(_arrays(), seq_len=16, batch_size=3, seed=5)
    for _ in range(50):  # into the second epoch (35 steps each), whose windows are shifted
        a.next_batch()
    b = PackedBatches(_arrays(), seq_len=16, batch_size=3, seed=5)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(40):
        assert np.array_equal(a.next_batch()[0].numpy(), b.next_batch()[0].numpy())


def test_a_checkpoint_of_other_windows_is_refused_by_name():
    state = PackedBatches(_arrays(), seq_len=16, batch_size=3, seed=5).state_dict()
    with pytest.raises(ValueError, match="105 then, 93 now"):
        PackedBatches(_arrays(), seq_len=18, batch_size=3, seed=5).load_state_dict(state)


def test_too_little_data_is_explained():
    with pytest.raises(ValueError, match="one step needs 8"):
        PackedBatches([np.arange(50, dtype=np.uint16)], seq_len=16, batch_size=8)


def test_shard_meta_records_the_tokenizer(prepared, tokenizer):
    meta = read_json(prepared["shards"] / "meta.json")
    assert meta["tokenizer_fingerprint"] == tokenizer.fingerprint and meta["inputs_hash"]


def test_parquet_is_read_in_batches(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"row {i}" for i in range(2500)]
    pq.write_table(pa.table({"id": list(range(2500)), "content": texts}), tmp_path / "d.parquet", row_group_size=500)
    docs = list(read_documents(DataConfig(corpus=[str(tmp_path / "d.parquet")])))
    assert [d.text for d in docs] == texts and docs[7].source.endswith("d.parquet#7")
    pq.write_table(pa.table({"body": texts}), tmp_path / "e.parquet")
    with pytest.raises(CorpusError, match=r"e.parquet: no column 'text' or 'content' \(columns: body\)"):
        list(read_documents(DataConfig(corpus=[str(tmp_path / "e.parquet")])))
