"""Duplicate indexes that stay small: 64-bit keys in sorted numpy arrays, MinHash signatures on disk.

datasketch computes the MinHash signatures and chooses the LSH banding (b bands of r rows) for a
Jaccard threshold. Its own in-memory LSH index keeps Python dicts of byte strings, about 5 KB per
document (3.8 GB at 1M documents, measured by benchmarks/dedup.py). Here each band of a kept
document's signature becomes one 64-bit key in a sorted array (12 bytes per band), and the signature
itself goes to a file that is read back only to verify a candidate. Because candidates are verified
(estimated Jaccard >= threshold), the banding can favour recall: false candidates cost a disk read,
not a wrongly dropped document.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

MAX_CANDIDATES = 32  # verified per document; a larger bucket only means many near-identical kept documents


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

    def get(self, keys: np.ndarray) -> list[int]:
        """The ids stored under any of the keys, ascending, without repeats."""
        found: set[int] = set()
        lo = np.searchsorted(self.keys, keys, "left")
        for key, start in zip(keys.tolist(), lo.tolist()):
            end = start
            while end < len(self.keys) and self.keys[end] == key:
                end += 1
            if end > start:
                found.update(self.ids[start:end].tolist())
            found.update(self.recent.get(key, ()))
        return sorted(found)

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
        self.fd = os.open(signature_file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def band_keys(self, signature: np.ndarray) -> np.ndarray:
        bands = signature[: self.bands * self.rows].astype(np.uint64).reshape(self.bands, self.rows)
        return (bands * self.mix).sum(axis=1, dtype=np.uint64)  # multipliers differ per band: so do the keys

    def _stored(self, id_: int) -> np.ndarray:
        size = self.num_perm * 4
        return np.frombuffer(os.pread(self.fd, size, id_ * size), dtype=np.uint32)

    def find(self, signature: np.ndarray) -> int | None:
        """The first kept document whose estimated Jaccard similarity reaches the threshold, or None."""
        sig = signature.astype(np.uint32)
        for candidate in self.index.get(self.band_keys(signature))[:MAX_CANDIDATES]:
            if np.count_nonzero(self._stored(candidate) == sig) >= self.threshold * self.num_perm:
                return candidate
        return None

    def add(self, signature: np.ndarray) -> int:
        os.pwrite(self.fd, signature.astype(np.uint32).tobytes(), self.count * self.num_perm * 4)
        self.index.add(self.band_keys(signature), self.count)
        self.count += 1
        return self.count - 1

    def close(self) -> None:
        os.close(self.fd)
