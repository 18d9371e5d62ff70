"""Rows of a stored array read on demand: the one lazy reader behind a view's features (N, D) and a
patch view's tokens (N, h, w, C).

Indexing reads only the chunks it touches, so a 10 GB store can be inspected on a laptop;
``np.asarray(a)`` or ``a.read()`` reads every selected row, each stored chunk once;
``a.select(rows)`` narrows the selection without reading. A verifying store checks what is read
against its unit digests, whole units at a time (``_block``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

import numpy as np

Rows = TypeVar("Rows", bound="LazyRows")


class LazyRows:
    default_chunk_rows = 64  # rows per read of an array that declares no chunks (an h5py contiguous dataset)

    def __init__(self, array: Any, rows: Any = None, check: Any = None) -> None:
        self._array = array  # a zarr array or an h5py dataset: both read row slices
        self._rows: np.ndarray | None = None if rows is None else np.arange(array.shape[0], dtype=np.int64)[rows]
        chunks = getattr(array, "chunks", None)
        self.chunk_rows = int(chunks[0]) if chunks else self.default_chunk_rows
        self._check = check  # (split, array name, ReadCheck) of a verifying store, else None

    def _block(self, lo: int, hi: int) -> np.ndarray:
        """Stored rows lo:hi. A verifying store reads the whole units around them (a digest covers a
        unit, and the codec decodes whole chunks anyway) and checks each against its digest, so a
        read of a few rows is checked too."""
        if self._check is None:
            return np.asarray(self._array[lo:hi])
        split, name, check = self._check
        step = check.chunk_rows
        a, b = lo - lo % step, min(-(-hi // step) * step, int(self._array.shape[0]))
        block = np.asarray(check.read(split, name, a, b, lambda: self._array[a:b]))
        check.check(split, name, block, a)
        return block[lo - a : hi - a]

    @property
    def shape(self) -> tuple[int, ...]:
        n = len(self._rows) if self._rows is not None else int(self._array.shape[0])
        return (n, *(int(s) for s in self._array.shape[1:]))

    @property
    def dtype(self) -> np.dtype[Any]:
        dtype: np.dtype[Any] = np.dtype(self._array.dtype)
        return dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, lazy)"

    def select(self: Rows, rows: Any) -> Rows:
        """These rows (a slice, an index array or a boolean mask), still unread."""
        return type(self)(self._array, rows if self._rows is None else self._rows[rows], self._check)

    def __getitem__(self, key: Any) -> Any:
        rows = key[0] if isinstance(key, tuple) else key
        rest = key[1:] if isinstance(key, tuple) else ()
        if isinstance(rows, (int, np.integer)):
            return self.select([rows]).read()[0][rest]
        if self._rows is None and isinstance(rows, slice) and rows.step in (None, 1):
            lo, hi, _ = rows.indices(int(self._array.shape[0]))
            return self._block(lo, max(lo, hi))[(slice(None), *rest)]  # contiguous: one read
        return self.select(rows).read()[(slice(None), *rest)]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        values = self.read()
        return values if dtype is None else values.astype(dtype)

    def astype(self, dtype: Any) -> np.ndarray:
        return self.read().astype(dtype)

    def chunks(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(offset, block) for consecutive blocks of at most ``rows`` selected rows (default one chunk)."""
        step = rows or self.chunk_rows
        for start in range(0, len(self), step):
            yield start, self[start : start + step] if self._rows is None else self.select(slice(start, start + step)).read()

    def read(self) -> np.ndarray:
        """Every selected row, in selection order, read chunk by chunk (each chunk once)."""
        n = len(self)
        out = np.empty(self.shape, self.dtype)
        if self._rows is None:
            for start in range(0, n, self.chunk_rows):
                out[start : start + self.chunk_rows] = self._block(start, min(start + self.chunk_rows, n))
            return out
        if n == 0:
            return out
        order = np.argsort(self._rows, kind="stable")
        ordered = self._rows[order]
        cuts = np.flatnonzero(np.diff(ordered // self.chunk_rows)) + 1
        for group in np.split(np.arange(n), cuts):
            lo, hi = int(ordered[group[0]]), int(ordered[group[-1]]) + 1
            block = self._block(lo, hi)
            out[order[group]] = block[ordered[group] - lo]
        return out
