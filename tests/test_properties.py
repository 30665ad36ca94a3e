"""Property-based tests (hypothesis): the tokenizer, the chat renderer and the corpus readers hold
their promises for any input, not just the examples we thought of."""

import gzip
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinylm.config import DataConfig
from tinylm.corpus import CorpusError, read_documents
from tinylm.tokenizer import SPECIAL_TOKENS

FIXTURES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# any Unicode (surrogates cannot be UTF-8 encoded, so no text file or JSON could carry them)
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)
TEXT_WITH_SPECIALS = st.lists(TEXT | st.sampled_from(SPECIAL_TOKENS), max_size=6).map("".join)


@FIXTURES
@given(text=TEXT_WITH_SPECIALS)
def test_tokenizer_round_trip(tokenizer, text):
    """Byte-level BPE loses nothing, and special-token strings typed as text stay text."""
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(i >= len(SPECIAL_TOKENS) for i in ids)  # no text can forge a control token


ROLES = st.sampled_from(["user", "assistant"])
MESSAGES = st.lists(st.fixed_dictionaries({"role": ROLES, "content": TEXT_WITH_SPECIALS}), min_size=1, max_size=5)


@FIXTURES
@given(messages=MESSAGES, system=st.none() | TEXT)
def test_chat_renderer_marks_exactly_the_assistant_replies(tokenizer, messages, system):
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    ids, mask = tokenizer.render_chat(messages)
    assert len(ids) == len(mask) and ids[0] == tokenizer.bos_id and mask[0] == 0
    # the marked tokens decode to the assistant replies, each closed by <|end|>, in order
    marked = tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special=False)
    assert marked == "".join(m["content"] + "<|end|>" for m in messages if m["role"] == "assistant")
    # and the whole rendering decodes to the template, whatever the contents hold
    rendered = "<|bos|>" + "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
    assert tokenizer.decode(ids, skip_special=False) == rendered


DOCS = st.lists(TEXT.filter(lambda t: t.strip()), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(docs=DOCS, gz=st.booleans())
def test_jsonl_and_json_readers_give_back_every_document(tmp_path_factory, docs, gz):
    folder = tmp_path_factory.mktemp("corpus")
    opener = (lambda p: gzip.open(p, "wt", encoding="utf-8")) if gz else (lambda p: open(p, "w", encoding="utf-8"))
    suffix = ".gz" if gz else ""
    with opener(folder / f"a.jsonl{suffix}") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    with opener(folder / f"b.json{suffix}") as f:
        json.dump([{"content": d, "source": "x"} for d in docs], f)
    for name in (f"a.jsonl{suffix}", f"b.json{suffix}"):
        got = [d.text for d in read_documents(DataConfig(corpus=[str(folder / name)]))]
        assert got == docs


@settings(max_examples=60, deadline=None)
@given(docs=st.lists(TEXT.filter(lambda t: t.strip()).map(lambda t: t.replace("\r", "")), min_size=1, max_size=6),
       bad_line=st.integers(0, 5), damage=st.sampled_from(["cut", "bytes", "field", "type"]))
def test_a_damaged_jsonl_line_is_named_by_file_and_line(tmp_path_factory, docs, bad_line, damage):
    folder = tmp_path_factory.mktemp("damaged")
    lines = [json.dumps({"text": d}).encode() for d in docs]
    at = bad_line % len(lines)
    lines[at] = {"cut": lines[at][:-1], "bytes": b'{"text": "\xff\xfe"}', "field": b'{"body": "x"}',
                 "type": b'{"text": 42}'}[damage]
    path = folder / "c.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(CorpusError, match=rf"c\.jsonl:{at + 1}: "):
        list(read_documents(DataConfig(corpus=[str(path)])))
