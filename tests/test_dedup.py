"""The compact duplicate indexes against plain references: a dict of lists, and all-pairs MinHash comparison."""

import random

import numpy as np

from tinylm.clean import WORD, signature
from tinylm.config import CleanConfig
from tinylm.dedup import KeyIndex, MinHashIndex

from test_clean import run, stories, with_a_few_words_changed


def test_key_index_matches_a_dict_of_lists_across_merges():
    rng = np.random.default_rng(0)
    index = KeyIndex(merge_every=50)  # many merges in 2,000 inserts
    reference: dict[int, list[int]] = {}
    pool = rng.integers(0, 2**64, size=600, dtype=np.uint64)  # keys repeat: a multimap
    for id_ in range(2000):
        keys = rng.choice(pool, size=3, replace=False)
        expected = sorted({i for k in keys.tolist() for i in reference.get(k, [])})
        assert index.get(keys).tolist() == expected
        index.add(keys, id_)
        for k in keys.tolist():
            reference.setdefault(k, []).append(id_)
    assert len(index) == 6000 and len(index.keys) >= 5950  # merged into the sorted arrays, not held in the dict
    assert np.all(index.keys[:-1] <= index.keys[1:])


def test_minhash_index_finds_what_all_pairs_comparison_finds(tmp_path):
    cfg = CleanConfig()
    rng = random.Random(0)
    originals = stories(150, min_words=120)
    texts = originals + [with_a_few_words_changed(t, rng) for t in originals[:50]]
    texts += [" ".join(t.split()[: len(t.split()) // 2]) for t in originals[50:70]]  # halves: Jaccard ~0.5, kept
    rng.shuffle(texts)
    sigs = [signature(WORD.findall(t.lower()), cfg).astype(np.uint32) for t in texts]

    index = MinHashIndex(cfg.near_dup_threshold, cfg.minhash_perm, tmp_path / "sigs")
    kept_index, kept_ref = [], []
    for sig in sigs:
        found = index.find(sig)
        if found is None:
            index.add(sig)
            kept_index.append(sig)
        else:  # a hit is always verified against the stored signature
            assert np.mean(kept_index[found] == sig) >= cfg.near_dup_threshold
        if not any(np.mean(k == sig) >= cfg.near_dup_threshold for k in kept_ref):  # the all-pairs reference
            kept_ref.append(sig)
    index.close()
    assert len(kept_ref) == 170  # 150 originals + 20 halves
    assert len(kept_index) == len(kept_ref)


FILTERS_OFF = dict(min_chars=0, max_chars=10**9, min_words=0, min_sentence_words=0, max_sentence_words=10**9,
                   min_unique_chars=0, max_symbol_ratio=1.0, max_digit_ratio=1.0, max_dup_line_ratio=1.0,
                   max_top_ngram_ratio=1.0)


def template_pages(n: int, template_words: int = 250, own_words: int = 55, seed: int = 0) -> list[str]:
    """Pages of one site: a shared template and a few dozen words of their own (5-gram Jaccard ~0.69
    between two pages, under the 0.8 threshold; four pairs in ten share an LSH band)."""
    rng = random.Random(seed)
    template = " ".join(f"t{rng.randrange(10**6)}" for _ in range(template_words))
    return [template + " " + " ".join(f"w{rng.randrange(10**6)}" for _ in range(own_words)) for _ in range(n)]


def test_a_near_copy_of_a_template_page_is_found_among_many_candidates(tmp_path):
    pages = template_pages(150)
    words = pages[140].split()
    words[-20] = "changed"  # Jaccard ~0.97 with page 140
    report, kept = run(tmp_path, [*pages, " ".join(words)], examples_per_rule=1000, **FILTERS_OFF)
    near = report["dropped"]["near_duplicate"]
    assert "doc140" in {k["source"] for k in kept} and "doc150" not in {k["source"] for k in kept}
    assert [e["source"] for e in near["examples"] if e["duplicate_of"] == "doc140"] == ["doc150"]
    # the copy shares a band with far more kept pages than the 32 the old cap verified
    cfg = CleanConfig()
    index = MinHashIndex(cfg.near_dup_threshold, cfg.minhash_perm, tmp_path / "sigs")
    for page in pages[:141]:  # as clean does: a page is added when it is no near-duplicate
        if index.find(sig := signature(WORD.findall(page.lower()), cfg)) is None:
            index.add(sig)
    copy = signature(WORD.findall(" ".join(words).lower()), cfg)
    candidates = index.index.get(index.band_keys(copy)).tolist()
    assert len(candidates) > 32 and candidates.index(index.count - 1) >= 32 and index.find(copy) == index.count - 1
    index.close()
