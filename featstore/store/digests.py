"""Content digests of a store's units: one per unit per array, so a damaged chunk is found before a
number is computed from it.

A unit is a chunk-aligned row range of a split (``FeatureStore.units``). The digest of an array's
unit is a SHA-256 of the *values* of its rows (dtype, trailing shape and little-endian bytes; text
as length-prefixed UTF-8), not of the chunk files: it does not depend on the codec, so an HDF5
export carries the digests of the store it came from and is checked the same way.

Every array under a split's group is covered (``labels``, ``paths``, ``valid``, every
``features/<view>`` whatever its shape, and whatever arrays a later schema adds): the arrays
written when a store is created get their digests then (:data:`ATTRIBUTE`), the others with each
unit's completion marker, gathered into :data:`ATTRIBUTE` when the store is finalized.

Attribute layout::

    "digests": {"algorithm": "sha256-128", "splits": {split: {array: [hex per unit]}},
                "created": {split: [the arrays written when the store was created]}}
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import FeatstoreError
from .locations import is_url

ALGORITHM = "sha256-128"  # SHA-256 (hardware-accelerated on x86 and ARM) cut to 128 bits: damage, not forgery
ATTRIBUTE = "digests"
_HEX = 32


def rows_digest(values: Any) -> str:
    """The digest of some rows of one array (any dtype, any trailing shape)."""
    values = np.asarray(values)
    h = hashlib.sha256()
    if values.dtype.kind in "OUST":  # text (paths): each value's UTF-8 bytes, length-prefixed
        h.update(f"text {values.shape}\n".encode())
        for v in values.reshape(-1).tolist():
            b = v if isinstance(v, bytes) else str(v).encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    else:
        dtype = values.dtype.newbyteorder("<") if values.dtype.byteorder == ">" else values.dtype
        h.update(f"{dtype.str} {values.shape}\n".encode())
        h.update(np.ascontiguousarray(values, dtype=dtype).data)
    return h.hexdigest()[:_HEX]


def unit_bounds(rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    """The row ranges of a split's units (as ``FeatureStore.units``)."""
    return [(start, min(start + chunk_rows, rows)) for start in range(0, rows, chunk_rows)]


def array_names(group: Any) -> list[str]:
    """Every array under a split's group, as paths relative to it (``features/cls``), sorted. Works
    on a zarr group and an h5py group."""
    names: list[str] = []
    if hasattr(group, "visititems"):  # h5py
        import h5py

        group.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        return sorted(names)
    for name, member in group.members(max_depth=None):
        if hasattr(member, "shape") and hasattr(member, "dtype"):
            names.append(name)
    return sorted(names)


def digests_of(values: Any, bounds: list[tuple[int, int]], offset: int = 0) -> dict[int, str]:
    """unit index → digest for each unit of ``bounds`` that lies wholly within ``values``, the rows
    ``offset`` … ``offset + len(values)`` of an array."""
    end = offset + len(values)
    return {i: rows_digest(values[a - offset : b - offset]) for i, (a, b) in enumerate(bounds) if a >= offset and b <= end}


class StoreDamaged(FeatstoreError):
    """A store whose content is not what was written: a refusal naming the split, array and rows."""


def rows_text(start: int, stop: int) -> str:
    return f"row {start}" if stop - start == 1 else f"rows {start}-{stop - 1}"


@dataclass
class Recorded:
    """The digests a store records (its :data:`ATTRIBUTE`), or none for a store written before them."""

    splits: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    algorithm: str | None = None
    created: dict[str, list[str]] = field(default_factory=dict)  # split → arrays written at creation, not by units

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> Recorded:
        d = attrs.get(ATTRIBUTE)
        if not isinstance(d, dict):
            return cls()
        splits: dict[str, Any] = d["splits"] if isinstance(d.get("splits"), dict) else {}
        created: dict[str, Any] = d["created"] if isinstance(d.get("created"), dict) else {}
        return cls(
            {str(s): {str(a): list(v) for a, v in arrays.items()} for s, arrays in splits.items()},
            d.get("algorithm"),
            {str(s): [str(a) for a in names] for s, names in created.items()},
        )

    @property
    def present(self) -> bool:
        return self.algorithm is not None

    def to_attrs(self) -> dict[str, Any]:
        return {
            "algorithm": ALGORITHM,
            "splits": {s: dict(sorted(a.items())) for s, a in sorted(self.splits.items())},
            "created": {s: sorted(a) for s, a in sorted(self.created.items())},
        }

    def of(self, split: str, array: str) -> list[str] | None:
        return self.splits.get(split, {}).get(array)


@dataclass
class ReadCheck:
    """Checks the rows a reader loads against the recorded digests (each unit the read covers
    wholly; a partial read of a unit cannot be checked). A mismatch or an unreadable chunk raises
    :class:`StoreDamaged` with the split, array, rows and the command that repairs the store."""

    recorded: Recorded
    rows: dict[str, int]  # split → rows
    chunk_rows: int
    location: str
    repair: str  # the hint: how to repair the store
    checked: set[tuple[str, str, int]] = field(default_factory=set)  # (split, array, unit) seen intact
    seconds: float = 0.0  # time spent hashing: what verification costs a reader

    def bounds(self, split: str) -> list[tuple[int, int]]:
        return unit_bounds(self.rows.get(split, 0), self.chunk_rows)

    def damaged(self, split: str, array: str, start: int, stop: int, what: str) -> StoreDamaged:
        return StoreDamaged(f"store {self.location!r} is damaged: {split}/{array} {rows_text(start, stop)} {what}", self.repair)

    def read(self, split: str, array: str, start: int, stop: int, reader: Callable[[], Any]) -> Any:
        """``reader()`` (the rows ``start:stop`` of one array), with a damaged chunk made a refusal."""
        try:
            return reader()
        except FeatstoreError:
            raise
        except Exception as e:  # zarr/numcodecs/h5py raise many types for a truncated or garbled chunk
            raise self.damaged(split, array, start, stop, f"cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from e

    def check(self, split: str, array: str, values: Any, offset: int = 0) -> None:
        expected = self.recorded.of(split, array)
        if expected is None:
            return
        import time

        t0 = time.perf_counter()
        bounds = self.bounds(split)
        try:
            for i, digest in digests_of(values, bounds, offset).items():
                if i >= len(expected) or digest != expected[i]:
                    a, b = bounds[i]
                    raise self.damaged(split, array, a, b, "do not match their digest (changed or lost since they were written)")
                self.checked.add((split, array, i))
        finally:
            self.seconds += time.perf_counter() - t0


def blocks(rows: int, step: int) -> Iterator[tuple[int, int]]:
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


def repair_hint(attrs: dict[str, Any], hdf5: bool = False, location: str | None = None) -> str:
    """How to repair a damaged store: its own extract command with ``--repair`` (which re-extracts
    just the damaged units); for an HDF5 export, repair its source and export it again. ``location``:
    where the store is now; a copy or a moved store gets its own path as ``--out``, never the
    original's (which would "repair" the intact original); a store at a URL is repaired as a local
    copy (``--repair`` refuses URLs)."""
    command = attrs.get("command")
    if location is not None and is_url(location) and not hdf5:
        return _url_repair_hint(command, location)
    if isinstance(command, str) and location is not None and not hdf5:
        command = _with_out(command, location)
    fix = f"repair it: {command} --repair" if command else "repair it with its `featstore extract ...` command and --repair"
    if hdf5:
        source = attrs.get("exported_from") or "the store it was exported from"
        return f"an HDF5 export: {fix.replace('repair it', f'repair {source}')}, then export it again"
    return fix


def _url_repair_hint(command: Any, url: str) -> str:
    """--repair works on local stores (job.py refuses a URL): the store copied down, repaired there, uploaded back."""
    local = "its `featstore extract ...` command with --out DIR --repair"
    if isinstance(command, str):
        local = f"{_out_as(command, 'DIR')} --repair"
    return f"copy it down ({_sync(url, 'DIR')}), repair it there: {local}, and upload it back ({_sync('DIR', url, delete=True)})"


def _sync(source: str, target: str, delete: bool = False) -> str:
    """The command that copies ``source`` to ``target`` (one of them an s3:// or gs:// URL); ``delete``:
    what the repair removed (a dropped unit marker) goes at the target too."""
    if any(p.lower().startswith("s3://") for p in (source, target)):
        return shlex.join(["aws", "s3", "sync", *(["--delete"] if delete else []), source, target])
    return shlex.join(["gcloud", "storage", "rsync", "-r", *(["--delete-unmatched-destination-objects"] if delete else []), source, target])


def _out_as(command: str, out: str) -> str:
    """``command`` writing to ``out``: its --out replaced, or added (a store of the cache has none)."""
    try:
        args = shlex.split(command)
    except ValueError:
        return f"{command} --out {out}"
    if "--out" in args[:-1]:
        args[args.index("--out") + 1] = out
    else:
        args += ["--out", out]
    return shlex.join(args)


def _with_out(command: str, location: str) -> str:
    """``command`` with its ``--out`` made ``location`` where it names another place (featstore records
    --out absolute: a relative one is left as it is, its base unknown)."""
    import os

    try:
        args = shlex.split(command)
    except ValueError:
        return command
    if "--out" not in args or args.index("--out") + 1 >= len(args):
        return command
    i = args.index("--out") + 1
    url = is_url(location)
    here = location if url else os.path.abspath(location)
    there = args[i]
    if there == here or not (url or os.path.isabs(there)) or (not url and os.path.realpath(there) == os.path.realpath(here)):
        return command
    args[i] = here
    return shlex.join(args)
