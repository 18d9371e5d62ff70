"""A split's patch tokens (and CLS tokens) for a dense probe: standardized with train statistics,
held on the device when they fit ``max_bytes``, else streamed from the store in row blocks.

In memory, every epoch draws one permutation of the rows. Streaming, an epoch visits the blocks in a
seeded random order and shuffles the rows within each block (a two-level shuffle: the minibatches
differ from the in-memory ones, the rows each epoch sees do not); at most one block of float32
tokens is resident, so memory stays bounded as N grows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from featstore.store import FeatureStore

BN_EPS = 1e-5  # torch.nn.BatchNorm's eps: standardizing is the eval-mode BatchNorm of DINOv2's head


@dataclass(frozen=True)
class Stats:
    """Per-channel mean and 1/std (biased, as BatchNorm) of the train tokens and CLS vectors."""

    mean: torch.Tensor
    inv_std: torch.Tensor
    cls_mean: torch.Tensor | None
    cls_inv_std: torch.Tensor | None


def _moments(blocks: Iterator[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    count, total, squares = 0, None, None
    for block in blocks:
        x = block.reshape(-1, block.shape[-1]).astype(np.float64)
        s, q = x.sum(0), np.einsum("ij,ij->j", x, x)
        total = s if total is None else total + s
        squares = q if squares is None else squares + q
        count += x.shape[0]
    assert total is not None and squares is not None and count > 0, "no train rows"
    mean = total / count
    return mean, 1.0 / np.sqrt(np.maximum(squares / count - mean * mean, 0.0) + BN_EPS)


def train_stats(
    store: FeatureStore, split: str, view: str, cls_view: str | None, rows: np.ndarray, block_rows: int, device: torch.device
) -> Stats:
    """Statistics over the train rows, read block by block."""
    patches = store.patches(split, view).select(rows)
    mean, inv = _moments(b for _, b in patches.chunks(block_rows))
    as_t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
    if cls_view is None:
        return Stats(as_t(mean), as_t(inv), None, None)
    cls = store.features(split, cls_view).select(rows).read()
    cmean, cinv = _moments(iter([cls]))
    return Stats(as_t(mean), as_t(inv), as_t(cmean), as_t(cinv))


class Tokens:
    """The tokens of ``rows`` of one split, ready for the heads: ``batch(positions)``, ``blocks()``."""

    def __init__(self, store: FeatureStore, split: str, view: str, cls_view: str | None, rows: np.ndarray, stats: Stats,
                 device: torch.device, max_bytes: int) -> None:  # fmt: skip
        self.store, self.split, self.view, self.cls_view = store, split, view, cls_view
        self.rows = np.asarray(rows, np.int64)
        self.stats, self.device = stats, device
        self.shape = store.patches(split, view).shape[1:]
        row_bytes = int(np.prod(self.shape)) * 4
        self.block_rows = max(1, min(len(self.rows), max_bytes // max(row_bytes, 1)))
        self.in_memory = self.block_rows >= len(self.rows)
        self._cache: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Standardized float32 (B, h, w, C) tokens and (B, C_cls) CLS of ``positions`` (into ``rows``)."""
        if self.in_memory:
            if self._cache is None:
                self._cache = self._read(np.arange(len(self.rows)))
            patches, cls = self._cache
            index = torch.as_tensor(positions, device=self.device)
            return patches.index_select(0, index), None if cls is None else cls.index_select(0, index)
        return self._read(positions)

    def _read(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = self.rows[positions]
        raw = self.store.patches(self.split, self.view).select(rows).read()
        patches = torch.from_numpy(raw).to(self.device, torch.float32)
        patches.sub_(self.stats.mean).mul_(self.stats.inv_std)
        cls = None
        if self.cls_view is not None:
            assert self.stats.cls_mean is not None and self.stats.cls_inv_std is not None
            values = self.store.features(self.split, self.cls_view).select(rows).read()
            cls = (torch.from_numpy(values).to(self.device, torch.float32) - self.stats.cls_mean) * self.stats.cls_inv_std
        return patches, cls

    def epoch(self, generator: torch.Generator, batch: int) -> Iterator[tuple[np.ndarray, tuple[torch.Tensor, torch.Tensor | None]]]:
        """(positions, tokens) minibatches of one epoch: one permutation in memory; streaming, the blocks
        in a random order, each read once and cut into minibatches of its rows in a random order."""
        n = len(self.rows)
        if self.in_memory:
            order = torch.randperm(n, generator=generator).numpy()
            for s in range(0, n, batch):
                yield order[s : s + batch], self.load(order[s : s + batch])
            return
        starts = list(range(0, n, self.block_rows))
        for b in torch.randperm(len(starts), generator=generator).tolist():
            block = np.arange(starts[b], min(starts[b] + self.block_rows, n))
            patches, cls = self._read(block)  # the one resident block
            shuffled = torch.randperm(len(block), generator=generator)
            for s in range(0, len(block), batch):
                local = shuffled[s : s + batch].to(self.device)
                yield block[local.cpu().numpy()], (patches.index_select(0, local), None if cls is None else cls.index_select(0, local))
            del patches, cls

    def in_order(self, batch: int) -> Iterator[tuple[np.ndarray, tuple[torch.Tensor, torch.Tensor | None]]]:
        """(positions, tokens) of consecutive batches, in row order (evaluation)."""
        for start in range(0, len(self.rows), batch):
            positions = np.arange(start, min(start + batch, len(self.rows)))
            yield positions, self.load(positions)
