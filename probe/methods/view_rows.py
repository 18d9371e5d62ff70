"""The augmented views of a role's train rows, as the linear heads train on them (``probe fit
--augment``): the stored (N, K, D) views of the whole train split, held once per store × view in
their stored dtype — on the device when they fit ``--max-memory``, else in host memory — and, each
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

_STATS_ELEMENTS = 1 << 21  # values per block of the standardize statistics (8 MB in float32)


def place(views: NDArray[np.floating], device: torch.device, budget: int) -> torch.Tensor:
    """A split's (N, K, D) views as a tensor: on ``device`` when they take at most ``budget`` bytes,
    else in host memory (the same array, not copied), from where each epoch's gather is uploaded."""
    host = torch.from_numpy(views)
    return host.to(device) if views.nbytes <= budget else host


@dataclass(frozen=True)
class ViewRows:
    """Some rows of the train split and the K stored views of each (held by :func:`place`)."""

    views: torch.Tensor  # (N, K, D) of the whole split, as stored; on the device or in host memory
    rows: torch.Tensor  # (n,) int64 indices into the split, in the order of the role's labels, on ``views``' device

    @classmethod
    def of(cls, views: torch.Tensor, rows: NDArray[np.int64]) -> ViewRows:
        return cls(views, torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)).to(views.device))

    @property
    def num_views(self) -> int:
        return int(self.views.shape[1])

    @property
    def dim(self) -> int:
        return int(self.views.shape[2])

    def __len__(self) -> int:
        return len(self.rows)

    def gather(self, choice: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(n, D) as stored, on ``device``: view ``choice[i]`` of row ``i`` (one epoch's inputs)."""
        flat = self.views.reshape(-1, self.dim)
        at = self.rows * self.num_views + choice.to(self.views.device)
        return flat.index_select(0, at).to(device)

    def blocks(self, device: torch.device) -> Iterator[torch.Tensor]:
        """Every view of every row, as (m·K, D) blocks on ``device`` (the standardize statistics)."""
        step = max(1, _STATS_ELEMENTS // (self.num_views * max(self.dim, 1)))
        for start in range(0, len(self.rows), step):
            yield self.views.index_select(0, self.rows[start : start + step]).reshape(-1, self.dim).to(device)

    def join(self, other: ViewRows) -> ViewRows:
        """These rows and ``other``'s of the same split, in split order (a refit's train + holdout)."""
        assert other.views is self.views, "rows of one split's views"
        return ViewRows(self.views, torch.sort(torch.cat([self.rows, other.rows])).values)
