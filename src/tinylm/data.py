"""Batches for the training loop: packed windows of token shards, rank-aware and resumable.

A loader yields (inputs, targets) pairs of shape (batch, seq_len) and has a small `state_dict()`
(epoch and cursor) that a checkpoint stores, so a resumed run sees exactly the batches an
uninterrupted run would have seen. Targets of -100 carry no loss (the SFT loader uses that).
"""

from __future__ import annotations

import numpy as np
import torch


class PackedBatches:
    """Non-overlapping windows of seq_len + 1 tokens over memory-mapped shards.

    Each epoch visits every window once in an order fixed by (seed, epoch). With `world` ranks,
    one global batch is world * batch_size consecutive windows of that order; rank r takes the r-th
    slice, so the union over ranks equals what a single process with world * batch_size would see.
    """

    def __init__(self, arrays: list[np.ndarray], seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world: int = 1, shuffle: bool = True):
        self.arrays, self.seq_len, self.batch_size = arrays, seq_len, batch_size
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world, shuffle
        counts = np.array([max(0, (len(a) - 1) // seq_len) for a in arrays], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])  # window index -> shard via searchsorted
        self.n_windows = int(self.offsets[-1])
        if self.n_windows < world * batch_size:
            total = sum(len(a) for a in arrays)
            raise ValueError(
                f"{total} tokens give {self.n_windows} windows of {seq_len + 1} tokens; one step needs "
                f"{world * batch_size} (batch {batch_size} x {world} ranks): use more data, a shorter "
                f"model.max_seq_len or a smaller train.batch_size")
        self.epoch, self.cursor = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_windows)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)

    @property
    def windows_per_step(self) -> int:
        return self.world * self.batch_size

    @property
    def steps_per_epoch(self) -> int:
        return self.n_windows // self.windows_per_step

    @property
    def progress(self) -> float:
        """Epochs completed, fractional."""
        return self.epoch + self.cursor / max(1, self.steps_per_epoch * self.windows_per_step)

    def _window(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        start = (index - int(self.offsets[shard])) * self.seq_len
        return self.arrays[shard][start:start + self.seq_len + 1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cursor + self.windows_per_step > self.n_windows:  # drop the ragged tail of an epoch
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._make_order()
        mine = self._order[self.cursor + self.rank * self.batch_size:][: self.batch_size]
        self.cursor += self.windows_per_step
        rows = np.stack([self._window(int(i)) for i in mine]).astype(np.int64)  # (B, T + 1)
        tokens = torch.from_numpy(rows)
        return tokens[:, :-1], tokens[:, 1:]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n_windows") != self.n_windows:
            raise ValueError(f"data changed since the checkpoint: {state.get('n_windows')} windows then, "
                             f"{self.n_windows} now")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._make_order()
