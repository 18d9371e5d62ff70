"""Rows of a stored array read on demand: the one lazy reader behind a view's features (N, D) and a
patch view's tokens (N, h, w, C).

Indexing reads only the chunks it touches, so a 10 GB store can be inspected on a laptop;
``np.asarray(a)`` or ``a.read()`` reads every selected row, each stored chunk once;
``a.select(rows)`` narrows the selection without reading. A verifying store checks what is read
against its unit digests, whole units at a time (``_block``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar, cast

import numpy as np

Rows = TypeVar("Rows", bound="LazyRows")


class LazyRows:
    default_chunk_rows = 64  # rows per read of an array that declares no chunks (an h5py contiguous dataset)

    def __init__(self, array: Any, rows: Any = None, check: Any = None, last: list[Any] | None = None) -> None:
        self._array = array  # a zarr array or an h5py dataset: both read row slices
        self._rows: np.ndarray | None = None if rows is None else np.arange(array.shape[0], dtype=np.int64)[rows]
        chunks = getattr(array, "chunks", None)
        self.chunk_rows = int(chunks[0]) if chunks else self.default_chunk_rows
        self._check = check  # (split, array name, ReadCheck) of a verifying store, else None
        # the last unit read, (start, stop, rows), shared with every selection of this array: block reads
        # that do not fall on unit boundaries (a role's rows, 256-row batches) decode each unit once, not once per block
        self._last: list[Any] = last if last is not None else [None]

    @property
    def _unit_rows(self) -> int:
        """Rows per read: a digest unit of a verifying store (a digest covers a unit), else a chunk
        (the codec decodes whole chunks anyway)."""
        return int(self._check[2].chunk_rows) if self._check is not None else self.chunk_rows

    def _block(self, lo: int, hi: int, fresh: bool = True) -> np.ndarray:
        """Stored rows lo:hi, read unit by unit. A verifying store checks each unit against its digest,
        so a read of a few rows is checked too. ``fresh``: an array of its own (else possibly a view of
        the cached unit, for a caller that copies it at once)."""
        step, n = self._unit_rows, int(self._array.shape[0])
        if hi <= lo:
            return np.asarray(self._array[lo:lo])
        parts = []
        for a in range(lo - lo % step, hi, step):
            unit = self._unit(a, min(a + step, n))
            parts.append(unit[max(lo, a) - a : min(hi, a + step) - a])
        if len(parts) > 1:
            return np.concatenate(parts)
        return parts[0].copy() if fresh else parts[0]

    def _unit(self, a: int, b: int) -> np.ndarray:
        last = self._last[0]
        if last is not None and last[0] == a and last[1] == b:
            return cast(np.ndarray, last[2])
        if self._check is None:
            block = np.asarray(self._array[a:b])
        else:
            split, name, check = self._check
            block = np.asarray(check.read(split, name, a, b, lambda: self._array[a:b]))
            check.check(split, name, block, a)
        self._last[0] = (a, b, block)
        return block

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
        return type(self)(self._array, rows if self._rows is None else self._rows[rows], self._check, self._last)

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
                out[start : start + self.chunk_rows] = self._block(start, min(start + self.chunk_rows, n), fresh=False)
            return out
        if n == 0:
            return out
        order = np.argsort(self._rows, kind="stable")
        ordered = self._rows[order]
        cuts = np.flatnonzero(np.diff(ordered // self.chunk_rows)) + 1
        for group in np.split(np.arange(n), cuts):
            lo, hi = int(ordered[group[0]]), int(ordered[group[-1]]) + 1
            block = self._block(lo, hi, fresh=False)
            out[order[group]] = block[ordered[group] - lo]
        return out
