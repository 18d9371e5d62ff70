"""The augmented views of a role's train rows, as the linear heads train on them (``probe fit
--augment``): the stored (N, K, D) views of the whole train split, placed once per store × view in
their stored dtype — on the device when they fit ``--max-memory``, else in host memory when they
fit half the RAM, else left in the store and read a block of rows at a time each epoch — and, each
epoch, the chosen view of each row gathered into one (n, D) matrix on the device.

Why not the K views in the heads' compute dtype: at K = 10 that is 10 × the center crops' memory,
twice over in float32 (ImageNet's 1.28 M rows at D = 768: ~40 GB on the device). Gathered per epoch,
the heads hold one view per row, as they hold the center crops without views."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from featstore.machine import ram_bytes
from featstore.store.augmented import AugmentedArray

_BLOCK_ELEMENTS = 1 << 21  # values per block of rows read or reduced at once (8 MB in float32)


@dataclass(frozen=True)
class StoredViews:
    """A split's views left in the store (they fit no memory budget): read a block of rows at a
    time, each epoch; a view with NaN/Inf values is replaced by its row's center crop as it is read."""

    array: AugmentedArray  # (N, K, D), as stored
    center: NDArray[np.floating]  # (N, D): the split's center crops

    @property
    def shape(self) -> tuple[int, int, int]:
        n, k, d = self.array.shape
        return int(n), int(k), int(d)

    def blocks(self, rows: NDArray[np.int64], block_rows: int) -> Iterator[tuple[int, NDArray[np.floating]]]:
        """(position in ``rows``, (b, K, D) views) of consecutive blocks of at most ``block_rows`` of ``rows``."""
        for start, block in self.array.select(rows).chunks(block_rows):
            r, k = nonfinite(block)
            block[r, k] = self.center[rows[start + r]]
            yield start, block


def nonfinite(views: NDArray[np.floating]) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """(rows, views) of the (N, K, D) ``views`` holding a NaN or Inf, a block of rows at a time
    (no (N, K, D) temporary beside them)."""
    step = max(1, _BLOCK_ELEMENTS // max(int(np.prod(views.shape[1:])), 1))
    rows, which = [np.zeros(0, np.intp)], [np.zeros(0, np.intp)]
    for i in range(0, len(views), step):
        r, k = np.nonzero(~np.isfinite(views[i : i + step]).all(axis=2))
        rows.append(r + i)
        which.append(k)
    return np.concatenate(rows), np.concatenate(which)


def host_memory() -> int:
    """Half the machine's RAM: views beyond it are left in the store."""
    return ram_bytes() // 2


def place(
    stored: AugmentedArray, center: NDArray[np.floating], device: torch.device, budget: int, host: int | None = None
) -> tuple[torch.Tensor | StoredViews, int]:
    """A split's (N, K, D) views, placed: on ``device`` when they take at most ``budget`` bytes, else
    in host memory when they take at most ``host`` (default :func:`host_memory`; on a CPU device the
    budget is the host's), else left in the store. NaN/Inf views are replaced by their rows' center
    crops ``center`` (the split's (N, D) features); returns the placed views and how many of those
    were views of a row with a finite center crop (an undecodable row's views are NaN too, and the
    row is left out of the probe anyway: no view of it stands replaced)."""
    n, k, d = (int(x) for x in stored.shape)
    nbytes = n * k * d * np.dtype(stored.dtype).itemsize
    host_budget = budget if device.type == "cpu" else (host_memory() if host is None else host)
    usable = np.isfinite(center).all(axis=1)
    if nbytes > budget and nbytes > host_budget:  # left in the store: counted now (one read), replaced as each epoch reads them
        bad = sum(int(usable[start + nonfinite(block)[0]].sum()) for start, block in stored.chunks())
        return StoredViews(stored, center), bad
    views = stored.read()
    r, v = nonfinite(views)
    views[r, v] = center[r]
    held = torch.from_numpy(views)
    return (held.to(device) if nbytes <= budget else held), int(usable[r].sum())


@dataclass(frozen=True)
class ViewRows:
    """Some rows of the train split and the K views of each (placed by :func:`place`)."""

    views: torch.Tensor | StoredViews  # (N, K, D) of the whole split, as stored: on the device, in host memory or in the store
    rows: torch.Tensor  # (n,) int64 indices into the split, in the order of the role's labels; on ``views``' device (host when stored)

    @classmethod
    def of(cls, views: torch.Tensor | StoredViews, rows: NDArray[np.int64]) -> ViewRows:
        at = views.device if isinstance(views, torch.Tensor) else torch.device("cpu")
        return cls(views, torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)).to(at))

    @property
    def where(self) -> str:
        """Where the views are held: ``cuda``, ``cpu`` (host memory) or ``store``."""
        return self.views.device.type if isinstance(self.views, torch.Tensor) else "store"

    @property
    def num_views(self) -> int:
        return int(self.views.shape[1])

    @property
    def dim(self) -> int:
        return int(self.views.shape[2])

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def _block_rows(self) -> int:
        return max(1, _BLOCK_ELEMENTS // (self.num_views * max(self.dim, 1)))

    def gather(self, choice: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(n, D) as stored, on ``device``: view ``choice[i]`` of row ``i`` (one epoch's inputs)."""
        if isinstance(self.views, torch.Tensor):
            flat = self.views.reshape(-1, self.dim)
            at = self.rows * self.num_views + choice.to(self.views.device)
            return flat.index_select(0, at).to(device)
        picked = choice.cpu().numpy()
        out = np.empty((len(self.rows), self.dim), dtype=self.views.array.dtype)
        for start, block in self.views.blocks(self.rows.numpy(), self._block_rows):
            out[start : start + len(block)] = block[np.arange(len(block)), picked[start : start + len(block)]]
        return torch.from_numpy(out).to(device)

    def blocks(self, device: torch.device) -> Iterator[torch.Tensor]:
        """Every view of every row, as (m·K, D) blocks on ``device`` (the standardize statistics)."""
        step = self._block_rows
        if isinstance(self.views, torch.Tensor):
            for start in range(0, len(self.rows), step):
                yield self.views.index_select(0, self.rows[start : start + step]).reshape(-1, self.dim).to(device)
            return
        for _, block in self.views.blocks(self.rows.numpy(), step):
            yield torch.from_numpy(block.reshape(-1, self.dim)).to(device)

    def join(self, other: ViewRows) -> ViewRows:
        """These rows and ``other``'s of the same split, in split order (a refit's train + holdout)."""
        assert other.views is self.views, "rows of one split's views"
        return ViewRows(self.views, torch.sort(torch.cat([self.rows, other.rows])).values)
