"""The compact duplicate indexes against plain references: a dict of lists, and all-pairs MinHash comparison."""

import random

import numpy as np

from tinylm.clean import WORD, signature
from tinylm.config import CleanConfig
from tinylm.dedup import KeyIndex, MinHashIndex

from test_clean import stories, with_a_few_words_changed


def test_key_index_matches_a_dict_of_lists_across_merges():
    rng = np.random.default_rng(0)
    index = KeyIndex(merge_every=50)  # many merges in 2,000 inserts
    reference: dict[int, list[int]] = {}
    pool = rng.integers(0, 2**64, size=600, dtype=np.uint64)  # keys repeat: a multimap
    for id_ in range(2000):
        keys = rng.choice(pool, size=3, replace=False)
        expected = sorted({i for k in keys.tolist() for i in reference.get(k, [])})
        assert index.get(keys) == expected
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
