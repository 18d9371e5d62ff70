"""Patch-token views: ``features/<view>`` arrays of shape (N, h, w, C), one spatial grid per row.

A view's *row shape* is ``D`` for a global view (an int) and ``(h, w, C)`` for a patch view. The
store records the channel count in ``views`` (so every reader of ``views`` keeps seeing an int)
and the grid in ``patch_views``. Patch arrays are chunked by whole rows like every feature array,
but compressed (blosc-zstd with byte shuffle: float16 tokens shrink by a fifth to a third, and a
patch store is tens of times larger than a global one, so the disk matters more than write speed).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FeatstoreError
from .rows import LazyRows

RowShape = int | tuple[int, ...]
UNIT_BYTES = 64 << 20  # a unit of patch tokens in memory (the writer holds two): rows are capped to fit


def row_shape(dim: RowShape) -> tuple[int, ...]:
    """The shape of one row: ``(D,)`` for a global view, ``(h, w, C)`` for a patch view."""
    return (int(dim),) if isinstance(dim, (int, np.integer)) else tuple(int(d) for d in dim)


def is_patch_shape(dim: RowShape) -> bool:
    return len(row_shape(dim)) == 3


def row_bytes(views: Mapping[str, RowShape], dtype: str) -> int:
    """Bytes of one row over every view, uncompressed."""
    return sum(int(np.prod(row_shape(d))) for d in views.values()) * np.dtype(dtype).itemsize


def capped_chunk_rows(chunk_rows: int, views: Mapping[str, RowShape], dtype: str) -> int:
    """``chunk_rows``, lowered so one unit of patch tokens stays near :data:`UNIT_BYTES` (8192 rows of
    16×16×384 float16 tokens would be 800 MB per unit). Global-only stores keep ``chunk_rows``."""
    patch = sum(int(np.prod(row_shape(d))) for d in views.values() if is_patch_shape(d)) * np.dtype(dtype).itemsize
    if patch == 0:
        return chunk_rows
    return max(1, min(chunk_rows, UNIT_BYTES // patch))


def expected_bytes(rows: int, views: Mapping[str, RowShape], dtype: str) -> int:
    """The features' size before compression: what a store of ``rows`` rows needs at most."""
    return rows * row_bytes(views, dtype)


def refuse_if_no_space(folder: str | Path, needed: int) -> None:
    """A one-line error when the disk under ``folder`` has less free space than ``needed`` bytes."""
    path = Path(folder).resolve()
    while not path.exists():  # the store's folder (or its parents) may not exist yet
        path = path.parent
    free = shutil.disk_usage(path).free
    if needed > free:
        raise FeatstoreError(
            f"the store needs up to {human_bytes(needed)} but {str(path)!r} has {human_bytes(free)} free",
            "free disk space, extract fewer views (--views), or pass --out on a larger disk",
        )


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # unreachable; keeps the return type total


def patch_dims(view: str, shape: tuple[int, ...], grids: Mapping[str, tuple[int, ...]]) -> tuple[str, str, str, str]:
    """xarray's dimension names of a patch view: ``row, y, x, <view>_channel``. The channel dim is
    named per view (patch and patch4 differ in C, and xarray opens a split's views as one dataset);
    ``y, x`` are shared by views on the same grid, ``<view>_y, <view>_x`` otherwise."""
    first = next(iter(grids.values()), shape[:2])
    same = tuple(first[:2]) == tuple(shape[:2])
    return ("row", "y" if same else f"{view}_y", "x" if same else f"{view}_x", f"{view}_channel")


def create_patch_array(group: Any, view: str, n: int, shape: tuple[int, ...], rows: int, dtype: str, dims: tuple[str, ...]) -> Any:
    """The presized (n, h, w, C) array of a patch view in ``group`` (a split's ``features``)."""
    from zarr.codecs import BloscCodec, BloscShuffle

    return group.create_array(
        view,
        shape=(n, *shape),
        dtype=dtype,
        chunks=(rows, *shape),
        fill_value=np.nan,
        compressors=[BloscCodec(cname="zstd", clevel=1, shuffle=BloscShuffle.shuffle, typesize=np.dtype(dtype).itemsize)],
        dimension_names=dims,
    )


class PatchArray(LazyRows):
    """The (N, h, w, C) tokens of one patch view, read on demand (:class:`~featstore.store.rows.LazyRows`).
    ``chunks(rows)`` yields row blocks in order, so a probe holds one block at a time."""

    ndim = 4

    @property
    def shape(self) -> tuple[int, int, int, int]:
        n, h, w, c = super().shape
        return (n, h, w, c)
