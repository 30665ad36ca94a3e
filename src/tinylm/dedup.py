"""Duplicate indexes that stay small: 64-bit keys in sorted numpy arrays, MinHash signatures on disk.

datasketch computes the MinHash signatures and chooses the LSH banding (b bands of r rows) for a
Jaccard threshold. Its own in-memory LSH index keeps Python dicts of byte strings, about 5 KB per
document (3.8 GB at 1M documents, measured by benchmarks/dedup.py). Here each band of a kept
document's signature becomes one 64-bit key in a sorted array (12 bytes per band), the signature
itself goes to a file that is read back only to verify a candidate, and its low bytes (one per
permutation) stay in memory. Because candidates are verified (estimated Jaccard >= threshold), the
banding can favour recall: a false candidate costs a comparison, not a wrongly dropped document.

Every candidate is verified, however many there are: pages built on one template share LSH bands
by the thousand, and a cap on the candidates checked would keep a near-copy of a page beyond it.
Checking stays cheap: equal values have equal low bytes, so a candidate whose low bytes agree in
fewer than threshold x permutations places cannot reach the threshold and is ruled out in memory,
in one vectorised comparison for all candidates; only the few left are read from disk. The cost
per document is proportional to its number of candidates (the size of the largest template group
it belongs to), at about a nanosecond per candidate and permutation.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np


class KeyIndex:
    """A multimap uint64 key -> int id: a sorted array, plus a dict of recent inserts merged in bulk.

    Lookups are a binary search; inserts go to the dict until `merge_every` keys are pending, then
    are merged into the sorted arrays in one pass (so the arrays are rewritten O(n / merge_every) times).
    """

    def __init__(self, merge_every: int = 1 << 18):
        self.keys = np.empty(0, np.uint64)
        self.ids = np.empty(0, np.uint32)
        self.recent: dict[int, list[int]] = {}
        self.pending = 0
        self.merge_every = merge_every

    def __len__(self) -> int:
        return len(self.keys) + self.pending

    def get(self, keys: np.ndarray) -> np.ndarray:
        """The ids stored under any of the keys, ascending, without repeats (uint32)."""
        lo = np.searchsorted(self.keys, keys, "left")
        hi = np.searchsorted(self.keys, keys, "right")
        parts = [self.ids[a:b] for a, b in zip(lo.tolist(), hi.tolist()) if b > a]
        parts += [np.asarray(ids, np.uint32) for key in keys.tolist() if (ids := self.recent.get(key))]
        if not parts:
            return np.empty(0, np.uint32)
        return np.unique(np.concatenate(parts))

    def add(self, keys: np.ndarray, id_: int) -> None:
        for key in keys.tolist():
            self.recent.setdefault(key, []).append(id_)
        self.pending += len(keys)
        if self.pending >= self.merge_every:
            self.merge()

    def merge(self) -> None:
        if not self.pending:
            return
        new_keys = np.fromiter((k for k, ids in self.recent.items() for _ in ids), np.uint64, self.pending)
        new_ids = np.fromiter((i for ids in self.recent.values() for i in ids), np.uint32, self.pending)
        order = np.argsort(new_keys, kind="stable")
        where = np.searchsorted(self.keys, new_keys[order], "right")
        self.keys = np.insert(self.keys, where, new_keys[order])
        self.ids = np.insert(self.ids, where, new_ids[order])
        self.recent.clear()
        self.pending = 0


def text_key(digest: bytes) -> np.ndarray:
    """An 8-byte digest as a one-element key array (collisions: ~1e-8 at a billion pairs)."""
    return np.frombuffer(digest[:8], dtype=np.uint64)


class MinHashIndex:
    """Kept documents' MinHash signatures: `find` a kept near-duplicate, `add` a new kept document.

    Ids are 0, 1, 2... in the order documents are added, so the caller can map them to its records.
    """

    def __init__(self, threshold: float, num_perm: int, signature_file: str | Path,
                 weights: tuple[float, float] = (0.1, 0.9)):
        from datasketch import MinHashLSH

        banding = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=weights)  # for its (b, r) choice only
        self.bands, self.rows = banding.b, banding.r
        self.threshold = threshold
        self.num_perm = num_perm
        rng = np.random.default_rng(20240611)
        # random odd multipliers: a band's key is a universal hash of its r values, mod 2^64
        self.mix = rng.integers(1, 2**63, size=(self.bands, self.rows), dtype=np.uint64) | np.uint64(1)
        self.index = KeyIndex()
        self.count = 0
        self.low_bytes = np.empty((1024, num_perm), np.uint8)  # grows by doubling
        self.needed = math.ceil(threshold * num_perm - 1e-9)  # equal values a near-duplicate has at least
        self.fd = os.open(signature_file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def band_keys(self, signature: np.ndarray) -> np.ndarray:
        bands = signature[: self.bands * self.rows].astype(np.uint64).reshape(self.bands, self.rows)
        return (bands * self.mix).sum(axis=1, dtype=np.uint64)  # multipliers differ per band: so do the keys

    def _stored(self, id_: int) -> np.ndarray:
        size = self.num_perm * 4
        return np.frombuffer(os.pread(self.fd, size, id_ * size), dtype=np.uint32)

    def find(self, signature: np.ndarray) -> int | None:
        """The first kept document whose estimated Jaccard similarity reaches the threshold, or None.
        Every kept document that shares a band with the signature is considered (no cap)."""
        sig = signature.astype(np.uint32)
        candidates = self.index.get(self.band_keys(signature))
        if not len(candidates):
            return None
        agree = np.count_nonzero(self.low_bytes[candidates] == sig.astype(np.uint8), axis=1)
        for candidate in candidates[agree >= self.needed].tolist():  # ascending: the first kept copy wins
            if np.count_nonzero(self._stored(candidate) == sig) >= self.needed:
                return candidate
        return None

    def add(self, signature: np.ndarray) -> int:
        sig = signature.astype(np.uint32)
        os.pwrite(self.fd, sig.tobytes(), self.count * self.num_perm * 4)
        if self.count == len(self.low_bytes):
            self.low_bytes = np.concatenate([self.low_bytes, np.empty_like(self.low_bytes)])
        self.low_bytes[self.count] = sig.astype(np.uint8)
        self.index.add(self.band_keys(signature), self.count)
        self.count += 1
        return self.count - 1

    def close(self) -> None:
        os.close(self.fd)
