"""A split's dense targets read in row blocks, never the whole split at full resolution at once: the
train targets at the loss resolution (what training indexes every step: N × loss pixels, 16 KiB an
image at 64×64 float32), the evaluated ones batch by batch at target resolution."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from featstore.store import FeatureStore

BLOCK_ROWS = 64  # rows of full-resolution targets read at once (the stored chunk)


class TargetRows:
    """The (N, H, W) targets of some rows of a split, read on demand: each read touches only the
    stored chunks its rows live in."""

    def __init__(self, array: Any, rows: np.ndarray, check: Any = None) -> None:
        self._array, self.rows = array, np.asarray(rows, np.int64)
        self._check = check  # (split, array name, ReadCheck) of a store opened with verify=True, else None
        self.chunk_rows = int(array.chunks[0])
        self.shape = (len(self.rows), *(int(s) for s in array.shape[1:]))

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, positions: np.ndarray | None = None) -> np.ndarray:
        """The targets at ``positions`` (into ``rows``; all when None), in that order."""
        rows = self.rows if positions is None else self.rows[np.asarray(positions, np.int64)]
        out = np.empty((len(rows), *self.shape[1:]), self._array.dtype)
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        if len(rows):
            for group in np.split(np.arange(len(rows)), np.flatnonzero(np.diff(ordered // self.chunk_rows)) + 1):
                lo, hi = int(ordered[group[0]]), int(ordered[group[-1]]) + 1
                out[order[group]] = self._block(lo, hi)[ordered[group] - lo]
        return out

    def _block(self, lo: int, hi: int) -> np.ndarray:
        """Stored rows lo:hi; a verifying store reads the whole units around them and checks each
        against its digest (as featstore.store.PatchArray does for tokens)."""
        if self._check is None:
            return np.asarray(self._array[lo:hi])
        split, name, check = self._check
        step = int(check.chunk_rows)
        a, b = lo - lo % step, min(-(-hi // step) * step, int(self._array.shape[0]))
        block = np.asarray(check.read(split, name, a, b, lambda: self._array[a:b]))
        check.check(split, name, block, a)
        return block[lo - a : hi - a]

    def chunks(self, block: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start, targets) of consecutive blocks of at most ``block`` rows."""
        for start in range(0, len(self), block):
            yield start, self.read(np.arange(start, min(start + block, len(self))))


def targets(fs: FeatureStore, split: str, kind: str, rows: np.ndarray) -> TargetRows:
    """The targets ``kind`` of ``rows`` of ``split``, lazily."""
    check = getattr(fs, "read_check", None)  # stores that verify their reads (featstore ≥ the dense-report merge)
    return TargetRows(fs.split_group(split)["targets"][kind], rows, None if check is None else (split, f"targets/{kind}", check))


def read(array: TargetRows, positions: np.ndarray | None = None) -> np.ndarray:
    """Targets as :func:`featstore.store.read_targets` returns them (depth float32, masks uint8)."""
    values = array.read(positions)
    return values.astype(np.float32) if values.dtype == np.float16 else values


def at_size(target: np.ndarray, size: tuple[int, int], task: str) -> torch.Tensor:
    """(B, H, W) targets sampled to ``size`` with nearest-exact (no blended depths or classes)."""
    t = torch.from_numpy(target.astype(np.float32))[:, None]
    if tuple(t.shape[-2:]) != size:
        t = torch.nn.functional.interpolate(t, size=size, mode="nearest-exact")
    return t[:, 0] if task == "depth" else t[:, 0].round().to(torch.uint8)


def loss_targets(array: TargetRows, size: tuple[int, int], task: str) -> torch.Tensor:
    """Every row's target at the loss resolution, read and resampled block by block."""
    out = torch.empty((len(array), *size), dtype=torch.float32 if task == "depth" else torch.uint8)
    for start, block in array.chunks(BLOCK_ROWS):
        out[start : start + len(block)] = at_size(block, size, task)
    return out


def depth_range(array: TargetRows) -> tuple[float, float | None]:
    """The largest depth and the mean log depth over pixels with depth (None without any)."""
    top, total, count = -math.inf, 0.0, 0
    for _, block in array.chunks(BLOCK_ROWS):
        d = block.astype(np.float32)
        top = max(top, float(d.max())) if d.size else top
        valid = d[d > 0]
        total += float(np.log(valid).astype(np.float64).sum())
        count += valid.size
    return (top if math.isfinite(top) else 10.0), (total / count if count else None)
