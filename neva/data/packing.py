"""Sequence packing: put samples of known lengths into rows of ``max_len`` tokens.

* ``first_fit_decreasing``: longest first, each into the first row with room (few rows, the
  classic bound of 11/9 OPT + 6/9).
* ``first_fit_shuffle``: a seeded random order, first fit (rows mix lengths; less length bias).

Both use a max-segment-tree over the rows' free space, so a sample finds its first row in
O(log rows). Packing is a pure function of (lengths, max_len, seed): every rank computes the same
rows. Within a packed row, position ids restart per sample and attention never crosses samples
(``segment_ids`` in the batch; see ``neva.data.collate``).
"""
from __future__ import annotations

import numpy as np


class _FirstFit:
    """Rows with free space; ``put(length)`` -> the first row with ``free >= length`` (new if none)."""

    def __init__(self, max_len: int, cap: int):
        self.max_len = max_len
        self.size = 1
        while self.size < max(1, cap):
            self.size *= 2
        self.tree = np.full(2 * self.size, max_len, np.int64)   # leaves: free space of each (future) row
        self.n_rows = 0

    def put(self, length: int) -> int:
        i = 1
        while i < self.size:                  # descend to the leftmost leaf with enough room
            i = 2 * i if self.tree[2 * i] >= length else 2 * i + 1
        row = i - self.size
        self.n_rows = max(self.n_rows, row + 1)
        self.tree[i] -= length
        i //= 2
        while i:
            self.tree[i] = max(self.tree[2 * i], self.tree[2 * i + 1])
            i //= 2
        return row


def first_fit(lengths: np.ndarray, order: np.ndarray, max_len: int) -> list[list[int]]:
    """Rows of sample indices, visiting samples in ``order``."""
    lengths = np.asarray(lengths)
    too_long = np.nonzero(lengths > max_len)[0]
    if len(too_long):
        raise ValueError(f"sample {int(too_long[0])} has {int(lengths[too_long[0]])} tokens > max_len={max_len}: "
                         f"truncate before packing")
    ff = _FirstFit(max_len, len(lengths))
    rows: list[list[int]] = [[] for _ in range(len(lengths))]
    for i in order:
        rows[ff.put(int(lengths[i]))].append(int(i))
    return rows[:ff.n_rows]


def first_fit_decreasing(lengths, max_len: int) -> list[list[int]]:
    lengths = np.asarray(lengths)
    return first_fit(lengths, np.argsort(-lengths, kind="stable"), max_len)


def first_fit_shuffle(lengths, max_len: int, seed: int = 0) -> list[list[int]]:
    lengths = np.asarray(lengths)
    return first_fit(lengths, np.random.default_rng([seed, 7]).permutation(len(lengths)), max_len)


def pack(lengths, max_len: int, algorithm: str = "first_fit_decreasing", seed: int = 0) -> list[list[int]]:
    if algorithm == "first_fit_decreasing":
        return first_fit_decreasing(lengths, max_len)
    if algorithm == "first_fit_shuffle":
        return first_fit_shuffle(lengths, max_len, seed)
    raise ValueError(f"unknown packing algorithm {algorithm!r}: use first_fit_decreasing or first_fit_shuffle")


def padding_fraction(lengths, rows: list[list[int]], row_len: int) -> float:
    """Share of the slots of packed rows (each padded to ``row_len``) that are padding."""
    lengths = np.asarray(lengths)
    tokens = sum(int(lengths[r].sum()) for r in rows)
    slots = len(rows) * row_len
    return 1.0 - tokens / slots


def batched_padding_fraction(lengths, batches: list[list[int]], pad_to: int | None = None) -> float:
    """Unpacked batches of samples, each padded to its longest sample (or to ``pad_to``)."""
    lengths = np.asarray(lengths)
    tokens = slots = 0
    for b in batches:
        ls = lengths[b]
        tokens += int(ls.sum())
        slots += len(b) * (pad_to if pad_to is not None else int(ls.max()))
    return 1.0 - tokens / slots
