"""The patch tokens of a role's rows, as a token method (the attentive probe) reads them: float16
as stored, (n, T, D) with T = h·w, held in memory when they fit ``--max-memory`` and otherwise
streamed from the store in blocks of rows, one block resident at a time."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from featstore.machine import ram_bytes
from featstore.store import FeatureStore


def minibatches_per_epoch(rows: int, block_rows: int, batch_size: int) -> int:
    """The minibatches of one epoch over ``rows`` token rows read in blocks of ``block_rows`` (all at once
    when it covers them), each block cut into its own minibatches: the length a schedule must span."""
    return sum(math.ceil(min(block_rows, rows - s) / batch_size) for s in range(0, rows, max(block_rows, 1)))


def default_memory(device: torch.device) -> int:
    """A quarter of the GPU's memory, or of the machine's RAM (the dense probes' rule too)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory // 4)
    return ram_bytes() // 4


def finite_rows(store: FeatureStore, split: str, view: str) -> NDArray[np.bool_]:
    """Per row of a split: every token value finite (read once, a stored chunk at a time)."""
    patches = store.patches(split, view)
    ok = np.empty(patches.shape[0], dtype=bool)
    for start, block in patches.chunks():
        ok[start : start + len(block)] = np.isfinite(block).reshape(len(block), -1).all(axis=1)
    return ok


@dataclass(frozen=True)
class TokenRows:
    """Some rows of one split of a store's patch view, read lazily."""

    store: FeatureStore
    split: str
    view: str
    rows: NDArray[np.int64]  # indices into the split, in the order of the role's labels

    @property
    def shape(self) -> tuple[int, int]:
        """(T, D): tokens per row and their width."""
        h, w, c = self.store.patches(self.split, self.view).shape[1:]
        return h * w, c

    @property
    def row_bytes(self) -> int:
        t, d = self.shape
        return t * d * 2  # float16

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, positions: NDArray[np.int64] | None = None) -> NDArray[np.float16]:
        """(n, T, D) float16 tokens of ``positions`` (into :attr:`rows`; default all)."""
        rows = self.rows if positions is None else self.rows[positions]
        block = self.store.patches(self.split, self.view).select(rows).read()
        return block.reshape(len(rows), -1, block.shape[-1])

    def blocks(self, block_rows: int) -> Iterator[tuple[int, NDArray[np.float16]]]:
        """(start position, (n, T, D) float16) of consecutive blocks of at most ``block_rows`` rows."""
        for start, block in self.store.patches(self.split, self.view).select(self.rows).chunks(block_rows):
            yield start, block.reshape(len(block), -1, block.shape[-1])

    def join(self, other: TokenRows) -> TokenRows:
        """These rows and ``other``'s of the same split, in split order (a refit's train + holdout)."""
        assert (other.store, other.split, other.view) == (self.store, self.split, self.view)
        return TokenRows(self.store, self.split, self.view, np.sort(np.concatenate([self.rows, other.rows])))
