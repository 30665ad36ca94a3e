"""Cleaning: each filter, exact and near-duplicate removal with planted duplicates, the report."""

import json
import random
import re
import unicodedata

import pytest

from tinylm.clean import clean_corpus, failed_rule, normalise
from tinylm.cli import main
from tinylm.config import CleanConfig
from tinylm.corpus import Document

from conftest import STORIES


def stories(n: int, min_words: int = 60) -> list[str]:
    texts = [s.strip() for s in STORIES.read_text(encoding="utf-8").split("<|endoftext|>")]
    return [t for t in texts if len(t.split()) >= min_words][:n]


def with_a_few_words_changed(text: str, rng: random.Random) -> str:
    """One word in a hundred replaced (at least one): 5-gram Jaccard stays around 0.9."""
    words = text.split()
    for i in rng.sample(range(len(words)), max(1, len(words) // 100)):
        words[i] = "zebra"
    return " ".join(words)


def run(tmp_path, docs, **overrides):
    report = clean_corpus([Document(t, f"doc{i}") for i, t in enumerate(docs)], tmp_path / "out",
                          CleanConfig(**overrides), workers=2, progress=False)
    kept = [json.loads(line) for line in (tmp_path / "out" / "clean.jsonl").read_text().splitlines()]
    return report, kept


def test_planted_near_duplicates_are_removed_and_distinct_documents_kept(tmp_path):
    rng = random.Random(0)
    originals = stories(200, min_words=150)
    planted = [with_a_few_words_changed(t, rng) for t in originals[:40]]
    assert len(originals) == 200
    report, kept = run(tmp_path, originals + planted)
    kept_sources = {d["source"] for d in kept}
    assert kept_sources == {f"doc{i}" for i in range(len(originals))}  # every original, no planted copy
    assert report["dropped"]["near_duplicate"]["docs"] == 40
    example = report["dropped"]["near_duplicate"]["examples"][0]
    assert example["duplicate_of"] == f"doc{int(example['source'][3:]) - len(originals)}"
    assert report["duplicate_clusters"] == 40
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".tinylm-output", "clean.jsonl", "report.json", "report.md"]


def test_exact_duplicates_ignore_case_and_spacing(tmp_path):
    text = stories(1)[0]
    report, kept = run(tmp_path, [text, text.upper(), "  " + text.replace(" ", "   ")])
    assert len(kept) == 1 and report["dropped"]["exact_duplicate"]["docs"] == 2


def test_near_dedup_can_be_switched_off(tmp_path):
    rng = random.Random(1)
    text = stories(1)[0]
    _, kept = run(tmp_path, [text, with_a_few_words_changed(text, rng)], near_dup_threshold=0.0)
    assert len(kept) == 2


GOOD = ("The little dog ran to the park with his friend. They played with a red ball all day. "
        "When the sun went down, they walked home and ate a big dinner together. ") * 2


@pytest.mark.parametrize("text, rule", [
    ("Too short.", "too_short"),
    (GOOD * 300, "too_long"),
    ("a" * 150, "too_few_words"),
    ("Buy now. Click here. Sign up. " * 10, "short_sentences"),
    ("word " * 120, "long_sentences"),
    (GOOD + " ### @@@ ~~~ ^^^ *** ### @@@ ~~~ ^^^ *** " * 4, "symbols"),
    (GOOD + " 1234567890 9876543210 " * 8, "digits"),
    ("\n".join(["Subscribe to our newsletter for more news."] * 6 + [GOOD]), "repeated_lines"),
    ("We went to the shop. " + "and then the dog and then the dog. " * 12, "repeated_ngrams"),
])
def test_each_filter_catches_its_case(text, rule):
    cfg = CleanConfig()
    assert failed_rule(normalise(text, cfg), cfg) == rule
    assert failed_rule(normalise(GOOD, cfg), cfg) is None


def test_language_filter_keeps_the_chosen_languages():
    german = ("Es war einmal ein kleines Mädchen, das jeden Tag mit seinem Hund im Garten spielte. Der Hund "
              "hieß Bello und war sehr freundlich. Eines Tages fanden sie einen alten Schlüssel unter dem Baum.")
    cfg = CleanConfig(languages=["en"])
    assert failed_rule(normalise(GOOD, cfg), cfg) is None
    assert failed_rule(normalise(german, cfg), cfg) == "language"
    assert failed_rule(normalise(german, cfg), CleanConfig(languages=["en", "de"])) is None
    assert failed_rule(normalise(german, cfg), CleanConfig()) is None  # no check unless asked


def test_normalisation():
    cfg = CleanConfig(nfkc=True, rejoin_wrapped=True)
    assert normalise("ﬁne\u00a0 day\r\nnext\x07 line\n\n\n\nnew para", cfg) == "fine day next line\n\nnew para"
    assert normalise("e\u0301", CleanConfig()) == "é"  # NFC by default


def test_report_counts_bytes_and_examples_per_rule(tmp_path):
    docs = stories(20) + ["short", "short"]
    report, kept = run(tmp_path, docs)
    assert report["docs_in"] == 22 and report["docs_out"] == len(kept)
    assert report["dropped"]["too_short"]["docs"] == 2 and report["dropped"]["too_short"]["bytes"] == 10
    assert report["bytes_in"] == report["bytes_out"] + sum(d["bytes"] for d in report["dropped"].values())
    assert "too_short" in (tmp_path / "out" / "report.md").read_text()


def test_clean_verb(tmp_path, capsys):
    corpus = tmp_path / "in.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in stories(10) + stories(3)))
    assert main(["clean", "--config", "tiny", f"--data.corpus={corpus}", "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "exact_duplicate | 3" in out and (tmp_path / "c" / "config.toml").is_file()


def test_contamination_finds_benchmark_text_in_training_data():
    from tinylm.clean import contamination_report

    train = stories(50)
    leaked = train[7].split(". ")[1] + ". " + train[7].split(". ")[2]  # two sentences lifted from training text
    clean_probe = "A purple elephant flew over the mountains while singing songs about the quiet sea and the stars."
    report = contamination_report(iter(train), {"bench": [leaked, clean_probe, "too short"]}, n=8)
    assert report["bench"]["contaminated"] == 1 and report["bench"]["examples"] == [leaked[:200]]
    assert report["bench"]["too_short_to_check"] == 1


def test_clean_verb_checks_a_benchmark_file(tmp_path, capsys):
    docs = stories(30)
    corpus = tmp_path / "in.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"ctx": docs[3][:400]}) + "\n" + json.dumps({"ctx": "Nothing like the stories at all, " * 5}) + "\n")
    assert main(["clean", f"--data.corpus={corpus}", "--out", str(tmp_path / "c"), f"--clean.contamination={bench}",
                 "--data.val_fraction=0.0"]) == 0
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["contamination"]["bench.jsonl"]["contaminated"] == 1
    assert "1 of 2 bench.jsonl documents" in capsys.readouterr().out


# Paragraphs in scripts written without spaces between words: each passes every rule, as GOOD does
CHINESE = ("小明每天早上七点起床，先吃早饭，然后骑自行车去学校。他最喜欢的课是数学，因为老师讲得很清楚。"
           "下午放学以后，他常常和朋友们一起在公园里踢足球。晚上回家，他先做完作业，再看一会儿书。"
           "周末的时候，他会跟爸爸妈妈去爷爷奶奶家吃饭，大家一起聊天，非常开心。")
JAPANESE = ("私は毎朝七時に起きて、朝ごはんを食べてから学校へ行きます。学校では友達と一緒に勉強したり、"
            "昼休みにサッカーをしたりします。放課後は図書館で本を読むのが好きです。"
            "週末には家族と一緒に公園へ行って、お弁当を食べながらゆっくり過ごします。")
THAI = ("ทุกเช้าฉันตื่นนอนตอนเจ็ดโมง แล้วกินข้าวเช้ากับครอบครัว หลังจากนั้นฉันเดินไปโรงเรียนกับเพื่อน "
        "ที่โรงเรียนเราเรียนภาษาไทยและคณิตศาสตร์ ตอนเย็นฉันชอบอ่านหนังสือที่ห้องสมุด "
        "วันหยุดเราไปเที่ยวสวนสาธารณะและกินอาหารอร่อยด้วยกัน")


@pytest.mark.parametrize("text, language", [(CHINESE, "zh"), (JAPANESE, "ja"), (THAI, "th")])
def test_text_without_spaces_between_words_is_kept_in_its_language(text, language):
    cfg = CleanConfig(languages=[language, "en"])
    assert failed_rule(normalise(text, cfg), cfg) is None
    assert failed_rule(normalise(GOOD, cfg), cfg) is None


@pytest.mark.parametrize("text, sentence_ends", [(CHINESE, 5), (JAPANESE, 4), (THAI, 5), (GOOD, 6)])
def test_words_and_sentences_are_counted_in_every_script(text, sentence_ends):
    from tinylm.clean import SENTENCE_END, WORD

    assert len(SENTENCE_END.findall(text)) == sentence_ends  # Thai: the spaces between its clauses
    words = WORD.findall(text)
    assert 60 <= len(words) <= 200  # a letter per word in the unspaced scripts; marks go with their letter
    assert not any(unicodedata.category(w[0]).startswith("M") for w in words)


@pytest.mark.parametrize("text", [CHINESE, JAPANESE, THAI])
def test_each_filter_catches_its_case_in_scripts_without_spaces(text):
    cfg = CleanConfig()
    first = re.split(r"(?<=。)|(?<=\S) (?=\S)", text)[0]
    assert failed_rule(normalise("\n".join([first] * 8 + [text]), cfg), cfg) == "repeated_lines"
    assert failed_rule(normalise(text.replace("。", "").replace(" ", "") * 2, cfg), cfg) == "long_sentences"
    assert failed_rule(normalise(text + " @@@ ### ~~~ ^^^ " * 6, cfg), cfg) == "symbols"
    assert failed_rule(normalise(text + " 1234567890 9876543210 " * 8, cfg), cfg) == "digits"
    if text != THAI:  # a Thai word is several letters, each counted as a word: a Thai menu passes
        assert failed_rule(normalise("首页。关于。联系。登录。" * 12, cfg), cfg) == "short_sentences"


def test_a_near_copy_in_chinese_is_a_near_duplicate(tmp_path):
    copy = CHINESE.replace("足球", "篮球")
    report, kept = run(tmp_path, [CHINESE * 2, copy * 2, JAPANESE * 2])
    assert [k["source"] for k in kept] == ["doc0", "doc2"] and report["dropped"]["near_duplicate"]["docs"] == 1
