"""Batches for the training loop: packed windows of token shards, rank-aware and resumable.

A loader yields (inputs, targets) pairs of shape (batch, seq_len) and has a small `state_dict()`
(epoch and cursor) that a checkpoint stores, so a resumed run sees exactly the batches an
uninterrupted run would have seen. Targets of -100 carry no loss (the SFT loader uses that).
"""

from __future__ import annotations

import numpy as np
import torch


class EpochBatches:
    """Visits items 0..n-1 once per epoch in an order fixed by (seed, epoch), split across ranks.

    One global batch is world * batch_size consecutive items of that order; rank r takes the r-th
    slice, so the union over ranks equals what one process with world * batch_size would see.
    The ragged tail of an epoch waits for the next one. Subclasses turn item indices into tensors.
    """

    changed_because = "other data or context length"  # what a refused resume names as the likely cause

    def __init__(self, n_items: int, batch_size: int, seed: int, rank: int, world: int, shuffle: bool):
        self.n_windows, self.batch_size = n_items, batch_size
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world, shuffle
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

    def _next_indices(self) -> list[int]:
        if self.cursor + self.windows_per_step > self.n_windows:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._make_order()
        mine = self._order[self.cursor + self.rank * self.batch_size:][: self.batch_size]
        self.cursor += self.windows_per_step
        return [int(i) for i in mine]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fetch(self._next_indices())

    def fetch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        if "short" in state:
            raise ValueError("the checkpoint trained on a short context first (train.short_seq_len, "
                             f"{state['short'].get('seq_len')} tokens): set it as then to resume")
        if state.get("n_windows") != self.n_windows:
            raise ValueError(f"the training items changed since the checkpoint: {state.get('n_windows')} then, "
                             f"{self.n_windows} now ({self.changed_because})")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._make_order()


class PackedBatches(EpochBatches):
    """Windows of seq_len + 1 tokens over memory-mapped shards (pretraining), non-overlapping within
    an epoch.

    With `recut` (training; the default is `shuffle`), each epoch after the first cuts its windows at
    a fresh offset in [0, seq_len), drawn from (seed, epoch): a text seen many times is not cut at the
    same places every pass, so no token is always the first of a window (with no context) and the
    model does not see the same (context, target) pairs again. Each shard keeps seq_len - 1 tokens
    spare for that (one window fewer), so every epoch has the same number of windows.

    Validation shuffles its order (a part of the split is then a sample spread over all of it) but
    does not recut: its windows are every full window at offset 0, each scored once per epoch.
    """

    changed_because = ("other data or context length; or a checkpoint from before the per-epoch shift, "
                       "which counted one window more per shard")

    def __init__(self, arrays: list[np.ndarray], seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world: int = 1, shuffle: bool = True, recut: bool | None = None):
        self.arrays, self.seq_len = arrays, seq_len
        self.recut = shuffle if recut is None else recut
        lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        counts = np.maximum(0, (lengths - 1) // seq_len)
        if self.recut:  # room to shift, where a shard has more than one window
            counts = np.where(counts >= 2, (lengths - seq_len) // seq_len, counts)
        self.slack = np.maximum(0, lengths - 1 - counts * seq_len)  # the most a shard's windows can shift
        self.offsets = np.concatenate([[0], np.cumsum(counts)])  # window index -> shard via searchsorted
        n_windows = int(self.offsets[-1])
        if n_windows < world * batch_size:
            total = int(lengths.sum())
            raise ValueError(
                f"{total} tokens give {n_windows} windows of {seq_len + 1} tokens; one step needs "
                f"{world * batch_size} (batch {batch_size} x {world} ranks): use more data, a shorter "
                f"model.max_seq_len or a smaller train.batch_size")
        super().__init__(n_windows, batch_size, seed, rank, world, shuffle)

    def _make_order(self) -> np.ndarray:
        self.shift = 0
        if self.recut and self.epoch > 0:
            self.shift = int(np.random.default_rng([self.seed, self.epoch, 1]).integers(self.seq_len))
        return super()._make_order()

    def _window(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        start = min(self.shift, int(self.slack[shard])) + (index - int(self.offsets[shard])) * self.seq_len
        return self.arrays[shard][start:start + self.seq_len + 1]

    def fetch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self._window(i) for i in indices]).astype(np.int64)  # (B, T + 1)
        tokens = torch.from_numpy(rows)
        return tokens[:, :-1], tokens[:, 1:]


class GrowingBatches:
    """Sequence-length warm-up in two phases: packed windows of `short_len` tokens at
    `seq_len // short_len` times the batch until `grow()`, then windows of `seq_len` tokens at
    `batch_size`; every step has the same tokens (batch x context). After Li et al. 2022, "The
    Stability-Efficiency Dilemma: Investigating Sequence Length Warmup for Training GPT Models",
    which grows the context in many steps; two suffice here (`train.short_seq_len`).

    The short steps cost less (attention's work per token grows with the context) and the model
    learns the near context first; the full phase teaches the far one. Each phase is a PackedBatches
    over the same shards with the same seed; the state holds both and the phase, so a resumed run
    continues in the phase, epoch and cursor it stopped at. `progress` (passes over the training
    tokens) adds the two phases' passes.

    Raises ValueError if `seq_len` is not a multiple of `short_len`, or (PackedBatches) if the shards
    hold too few windows for one step of either phase.
    """

    def __init__(self, arrays: list[np.ndarray], short_len: int, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world: int = 1):
        if not 0 < short_len < seq_len or seq_len % short_len:
            raise ValueError(f"a short context of {short_len} tokens does not divide the full {seq_len}")
        self.short = PackedBatches(arrays, short_len, batch_size * (seq_len // short_len), seed, rank, world)
        self.full = PackedBatches(arrays, seq_len, batch_size, seed, rank, world)
        self.grown = False

    @property
    def current(self) -> PackedBatches:
        return self.full if self.grown else self.short

    def grow(self) -> None:
        """From the next batch on, windows of the full context."""
        self.grown = True

    @property
    def seq_len(self) -> int:
        return self.current.seq_len

    @property
    def batch_size(self) -> int:
        return self.current.batch_size

    @property
    def windows_per_step(self) -> int:
        return self.current.windows_per_step

    @property
    def steps_per_epoch(self) -> int:
        return self.current.steps_per_epoch

    @property
    def progress(self) -> float:
        return self.short.progress + self.full.progress

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.current.next_batch()

    def state_dict(self) -> dict:
        return {"grown": self.grown, "short": {**self.short.state_dict(), "seq_len": self.short.seq_len},
                "full": self.full.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "short" not in state:
            raise ValueError("the checkpoint trained on the full context from the start: resume it without "
                             "train.short_seq_len")
        if state["short"].get("seq_len") != self.short.seq_len:
            raise ValueError(f"the checkpoint trained on a short context of {state['short'].get('seq_len')} tokens "
                             f"first, this run on {self.short.seq_len}: set train.short_seq_len as then to resume")
        self.short.load_state_dict(state["short"])
        self.full.load_state_dict(state["full"])
        self.grown = bool(state["grown"])
