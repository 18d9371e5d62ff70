"""The feature store schema (Zarr v3): create, resume, write whole units, finalize, read.

Layout (see docs/design.md)::

    feats.zarr/zarr.json            attrs: provenance, views, cache key, complete
    feats.zarr/<split>/labels       int32 (N,)
    feats.zarr/<split>/paths        str   (N,)   relative to the dataset root
    feats.zarr/<split>/valid        bool  (N,)   false where the image could not be decoded
    feats.zarr/<split>/features/<view>  float16|float32 (N, D), chunks of whole rows
    feats.zarr/_progress/           only while extracting: lock and one marker per finished unit

A unit is a chunk-aligned row range. Its rows are written whole, then its marker is written
atomically (temp file + rename); ``complete`` is set last, after every unit is verified. A killed
extraction therefore resumes with no duplicate and no missing row.

Each unit's marker carries a content digest of every array's rows (:mod:`.digests`), gathered into
the ``digests`` attribute when the store is finalized; a store opened with ``verify=True`` checks
every unit it reads against them and refuses a damaged one (``featstore verify`` checks them all).
Fill values cannot pass for data: a lost chunk of ``labels`` reads -1, of ``features`` NaN, of
``valid`` False (and every chunk is written, so a missing one is damage).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_folder, write_atomic
from ..errors import FeatstoreError, UsageError
from ..home import mark_used
from ..timestamps import utc_stamp
from ..version import __version__
from .attributes import StoreAttributes
from .augmented import PARAMS_ARRAY, AugmentedArray, augmented_splits, create_arrays, recorded, views_array
from .digests import ATTRIBUTE, ReadCheck, Recorded, array_names, digests_of, repair_hint, rows_digest, unit_bounds
from .hdf5 import open_hdf5
from .locations import FRESH, PROGRESS, fsspec_fs, is_hdf5_path, is_url, refuse_credentials, store_attrs, tree_size
from .lock import pid_alive
from .patch import PatchArray, RowShape, capped_chunk_rows, create_patch_array, is_patch_shape, patch_dims, row_shape
from .remote import Remote, refuse_unwritable
from .rows import LazyRows

SCHEMA_VERSION = 1
LABEL_FILL = -1  # what a lost labels chunk reads as: never a class
DEFAULT_CHUNK_ROWS = 8192
FEATURE_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class Unit:
    split: str
    index: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


MARKER_MISSING = "missing"  # unit_marker's reason for a unit not written yet (no marker at all)


def marker_problem(marker: Any, unit: Unit) -> str:
    """Why ``marker`` (a unit's progress marker, parsed) does not record ``unit``; "" when it does. A
    unit whose marker does not is pending: resuming writes it again."""
    if not isinstance(marker, dict):
        return "not a JSON object"
    if marker.get("rows") != [unit.start, unit.stop]:
        return f"its rows are {marker.get('rows')!r}, not [{unit.start}, {unit.stop}]"
    invalid = marker.get("invalid")
    if not isinstance(invalid, dict) or not all(str(r).isdigit() for r in invalid):
        return "its invalid rows are not a record of rows"
    if not isinstance(marker.get("digests") or {}, dict):
        return "its digests are not a record"
    return ""


def _zarr() -> Any:
    import zarr

    return zarr


def is_store(path: str | os.PathLike[str]) -> bool:
    """A local featstore Zarr store (exports and URLs are opened by :meth:`FeatureStore.open`)."""
    return store_attrs(path) is not None


class FeatureArray(LazyRows):
    """The (N, D) features of one view, read on demand (:class:`~featstore.store.rows.LazyRows`)."""

    default_chunk_rows = DEFAULT_CHUNK_ROWS
    ndim = 2

    @property
    def shape(self) -> tuple[int, int]:
        n, dim = super().shape
        return (n, dim)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, tuple) and len(key) > 2:
            raise IndexError(f"too many indices for a 2-d feature array: {key!r}")
        return super().__getitem__(key)


def _remove_stale_builds(path: Path) -> None:
    """Delete half-built (and half-deleted) stores of ``path`` left by killed processes (their pid is gone)."""
    for build in [*path.parent.glob(f".{path.name}.creating-*"), *path.parent.glob(f".{path.name}.removing-*")]:
        pid = build.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(build, ignore_errors=True)


class FeatureStore:
    """A feature store on disk. Use :meth:`create` to start one and :meth:`open` to read or resume."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        group: Any,
        writable: bool,
        attrs: dict[str, Any] | None = None,
        fs: tuple[Any, str] | None = None,
    ) -> None:
        self.path: Path | str = os.fspath(path) if is_url(path) else Path(path)  # a URL stays a str (Path would mangle its //)
        self._fs = fs  # (fsspec filesystem, path in it) of a URL; None for a local store
        self._group = group
        self.writable = writable
        self.attrs: dict[str, Any] = attrs if attrs is not None else group.attrs.asdict()
        self._meta: StoreAttributes | None = None
        self.read_check: ReadCheck | None = None  # set by open(): checks reads (digests too with verify=True)
        self._unit_arrays: dict[str, list[str]] = {}  # split → arrays each unit writes (not the create-time ones)
        self._kept_digests: dict[str, dict[str, list[str]]] = {}  # split → array → the digests recorded at completion
        self._writers: dict[str, Any] = {}  # "split/array" → the array, opened once (:meth:`_writer`)
        # called before each object a unit writes: raises once this process may no longer write here
        # (a lease at a URL lost: store/lease.py); set by the extraction, None for other writers
        self.confirm_writer: Callable[[], None] | None = None

    @property
    def meta(self) -> StoreAttributes:
        """The attributes, typed (:attr:`attrs` is their JSON; change both through :meth:`update_attrs`)."""
        if self._meta is None:
            self._meta = StoreAttributes.from_dict(self.attrs)
        return self._meta

    @property
    def location(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        """The store's folder name (``x.zarr`` of ``/data/x.zarr`` and of ``s3://bucket/x.zarr``)."""
        return str(self.path).rstrip("/").rsplit("/", 1)[-1]

    @property
    def format(self) -> str:
        return "hdf5" if is_hdf5_path(str(self.path)) else "zarr"

    # ---------------------------------------------------------------- create / open

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        splits: dict[str, tuple[list[str], np.ndarray]],
        views: dict[str, RowShape],
        dtype: str = "float16",
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        attrs: dict[str, Any] | None = None,
        augment: dict[str, Any] | None = None,
    ) -> FeatureStore:
        """Presize every array and freeze the plan. ``splits``: name → (relative paths, labels);
        ``views``: name → D, or (h, w, C) for a patch view (:mod:`featstore.store.patch`);
        ``augment``: the augmented views' record (:mod:`.augmented`; its ``splits`` get the arrays)."""
        if dtype not in FEATURE_DTYPES:
            raise UsageError(f"unknown feature dtype {dtype!r}", f"use one of {', '.join(FEATURE_DTYPES)}")
        if chunk_rows < 1:
            raise UsageError(f"chunk rows must be positive, got {chunk_rows}", "pass a positive --chunk-rows")
        # a unit of patch tokens stays near 64 MB whoever creates the store (a reader decodes whole units)
        chunk_rows = capped_chunk_rows(chunk_rows, views, dtype)
        if is_url(path):  # planned in a local temp folder, then uploaded with zarr.json last (store/remote.py)
            url = os.fspath(path)
            remote = Remote.of(url)
            if remote.attrs() is not None or not remote.is_empty():
                raise FeatstoreError(f"{url!r} already exists", "remove it or choose another path")
            with tempfile.TemporaryDirectory(prefix="featstore-plan-") as tmp:
                plan = cls.create(
                    Path(tmp) / "plan.zarr", splits=splits, views=views, dtype=dtype, chunk_rows=chunk_rows, attrs=attrs, augment=augment
                )
                remote.upload_plan(Path(tmp) / "plan.zarr")
                del plan
            return cls.open(url, mode="r+")
        zarr = _zarr()
        path = Path(path)
        if path.exists():
            raise FeatstoreError(f"{str(path)!r} already exists", "remove it or choose another path")
        # build beside the target and rename: a store is either absent or fully planned, never half-created
        _remove_stale_builds(path)

        def place(build: Path, path: Path) -> None:
            try:
                os.replace(build, path)
            except OSError as e:
                raise FeatstoreError(
                    f"{str(path)!r} appeared while the store was being created ({e.strerror})",
                    "another extraction writes there; wait for it or choose another --out",
                ) from e

        with atomic_folder(path, "creating", place) as build:
            group = zarr.open_group(str(build), mode="w")
            for split, (paths, labels) in splits.items():
                n = len(paths)
                sg = group.create_group(split)
                rows = max(1, min(chunk_rows, n))
                # dimension names let xarray and dask open the arrays (row is shared by a split's arrays)
                label_array = sg.create_array(
                    "labels", shape=(n,), dtype="int32", chunks=(max(1, n),), fill_value=LABEL_FILL, dimension_names=("row",)
                )
                label_array[:] = np.asarray(labels, np.int32)
                sg.create_array("paths", shape=(n,), dtype=str, chunks=(max(1, n),), dimension_names=("row",))[:] = np.asarray(
                    paths, dtype=object
                )
                sg.create_array("valid", shape=(n,), dtype="bool", chunks=(rows,), fill_value=False, dimension_names=("row",))
                fg = sg.create_group("features")
                for view, dim in views.items():
                    if is_patch_shape(dim):
                        grids = {v: row_shape(d) for v, d in views.items() if is_patch_shape(d)}
                        create_patch_array(fg, view, n, row_shape(dim), rows, dtype, patch_dims(view, row_shape(dim), grids))
                        continue
                    # no codec: zstd saves ~8% on float features but caps writes near 100 MB/s (benchmarks/RESULTS.md)
                    fg.create_array(
                        view,
                        shape=(n, dim),
                        dtype=dtype,
                        chunks=(rows, dim),
                        fill_value=np.nan,
                        compressors=None,
                        dimension_names=("row", f"{view}_dim"),
                    )
                if augment and split in augment["splits"]:
                    create_arrays(sg, n, rows, {v: row_shape(d)[-1] for v, d in views.items()}, int(augment["views"]), dtype)
            progress = group.create_group(PROGRESS)
            for split in splits:
                progress.create_group(split)
            meta = dict(attrs or {})
            if augment:
                meta["augment"] = augment
            meta[ATTRIBUTE] = _created_digests(group, {s: len(p) for s, (p, _) in splits.items()}, chunk_rows).to_attrs()
            meta.update(
                schema_version=SCHEMA_VERSION,
                featstore_version=__version__,
                created=utc_stamp(),
                splits={s: len(p) for s, (p, _) in splits.items()},
                views={v: row_shape(d)[-1] for v, d in views.items()},  # a patch view's channels: readers of views see ints
                patch_views={v: {"shape": list(row_shape(d))} for v, d in views.items() if is_patch_shape(d)},
                dtype=dtype,
                chunk_rows=chunk_rows,
                complete=False,
            )
            group.attrs.update(meta)
        return cls.open(path, mode="r+")

    @classmethod
    def open(cls, path: str | os.PathLike[str], mode: str = "r", verify: bool = False) -> FeatureStore:
        """A local Zarr store, an exported ``.h5`` file, or either at an ``s3://``, ``gs://`` or
        ``http(s)://`` URL (read-only, through fsspec; credentials from its usual configuration).
        ``verify``: check every unit read against the store's digests (a damaged one raises
        :class:`~featstore.store.digests.StoreDamaged`); a store written before digests is read unchecked."""
        text = os.fspath(path)
        if is_url(text):
            if mode != "r":
                refuse_unwritable(text)
                if is_hdf5_path(text):
                    raise UsageError(f"{text!r} is an HDF5 export, read-only", "resume or extend the Zarr store it came from")
            store = cls._open_url(text, writable=mode != "r")
        elif is_hdf5_path(text) and Path(text).is_file():
            if mode != "r":
                raise UsageError(f"{text!r} is an HDF5 export, read-only", "resume or extend the Zarr store it came from")
            group, attrs = open_hdf5(text)
            store = cls(text, group, writable=False, attrs=attrs)
        else:
            path = Path(path)
            if not path.exists():
                raise UsageError(f"store {str(path)!r} not found", "run `featstore extract` first, or see `featstore ls`")
            if not is_store(path):
                raise UsageError(f"{str(path)!r} is not a featstore store", "pass a folder written by `featstore extract`")
            group = _zarr().open_group(str(path), mode="r+" if mode != "r" else "r")
            store = cls(path, group, writable=mode != "r")
            mark_used(path, store.meta.cache_key)
        version = store.meta.schema_version
        if version > SCHEMA_VERSION:
            raise FeatstoreError(
                f"store {str(path)!r} has schema version {version}, newer than this featstore ({SCHEMA_VERSION})",
                "upgrade featstore",
            )
        # reads always turn an unreadable chunk into a one-line refusal; with verify they check digests too
        store.read_check = ReadCheck(
            Recorded.from_attrs(store.attrs) if verify else Recorded(),
            dict(store.meta.splits),
            store.meta.chunk_rows or DEFAULT_CHUNK_ROWS,
            str(store.path),
            repair_hint(store.attrs, store.format == "hdf5", str(store.path)),
        )
        return store

    @classmethod
    def _open_url(cls, url: str, writable: bool = False) -> FeatureStore:
        refuse_credentials(url)
        fs, inner = fsspec_fs(url)
        try:
            if is_hdf5_path(url):
                if not fs.exists(inner):
                    raise UsageError(f"store {url!r} not found", "check the URL")
                group, attrs = open_hdf5(fs.open(inner, "rb"), name=url)
                return cls(url, group, writable=False, attrs=attrs, fs=(fs, inner))
            try:
                meta = json.loads(fs.cat_file(f"{inner.rstrip('/')}/zarr.json"))
            except FileNotFoundError:
                raise UsageError(f"store {url!r} not found", "check the URL (a store is the folder holding zarr.json)") from None
            if "schema_version" not in (meta.get("attributes") or {}):
                raise UsageError(f"{url!r} is not a featstore store", "pass the URL of a folder written by `featstore extract`")
            zarr = _zarr()
            from zarr.storage import FsspecStore

            store = FsspecStore.from_url(
                url, read_only=not writable, storage_options=dict(FRESH)
            )  # its own async filesystem, on zarr's event loop
            group = zarr.open_group(store=store, mode="r+" if writable else "r", zarr_format=3)
            return cls(url, group, writable=writable, fs=(fs, inner))
        except FeatstoreError:
            raise
        except (OSError, ValueError) as e:
            raise FeatstoreError(
                f"cannot read {url!r}: {type(e).__name__}: {e}", "check the URL and your credentials (fsspec configuration)"
            ) from e

    # ---------------------------------------------------------------- plan

    @property
    def splits(self) -> list[str]:
        return list(self.meta.splits)

    @property
    def views(self) -> dict[str, int]:
        return dict(self.meta.views)

    @property
    def patch_views(self) -> dict[str, tuple[int, ...]]:
        """Patch view → (h, w, C) of each row; empty for a store of global views only."""
        recorded = self.attrs.get("patch_views") or {}
        return {str(v): tuple(int(s) for s in info["shape"]) for v, info in recorded.items()}

    def row_shape(self, view: str) -> tuple[int, ...]:
        """(D,) of a global view, (h, w, C) of a patch view."""
        return self.patch_views.get(view) or (self.views[view],)

    @property
    def complete(self) -> bool:
        return self.meta.complete

    @property
    def chunk_rows(self) -> int:
        rows = self.meta.chunk_rows
        if rows is None:
            raise FeatstoreError(f"store {str(self.path)!r} records no chunk_rows", "the store is damaged; rerun with --overwrite")
        return rows

    def num_rows(self, split: str) -> int:
        return self.meta.splits[split]

    def units(self, split: str) -> list[Unit]:
        n, rows = self.num_rows(split), self.chunk_rows
        return [Unit(split, i, start, min(start + rows, n)) for i, start in enumerate(range(0, n, rows))]

    @staticmethod
    def _marker_name(unit: Unit) -> str:
        return f"{PROGRESS}/{unit.split}/unit-{unit.index:06d}.json"

    def _marker(self, unit: Unit) -> Path:
        return self._local / self._marker_name(unit)

    @property
    def _local(self) -> Path:
        """The path of a local store or export (a URL store is read-only and never reaches the callers)."""
        if isinstance(self.path, Path):
            return self.path
        raise FeatstoreError(f"store {self.path!r} is not local", "featstore only writes local stores")

    @property
    def _remote(self) -> Remote:
        """The prefix of a store at a URL (its markers are objects, each written by one PUT)."""
        if self._fs is None:
            raise FeatstoreError(f"store {str(self.path)!r} is not at a URL")
        return Remote(str(self.path).rstrip("/"), self._fs[0], self._fs[1].rstrip("/"))

    def is_done(self, unit: Unit) -> bool:
        if self.complete:
            return True
        if self._fs is not None:
            return self._remote.exists(self._marker_name(unit))
        return self.unit_marker(unit)[0] is not None  # a missing, cut-short or foreign marker: pending

    def pending_units(self, split: str | None = None) -> list[Unit]:
        splits = [split] if split else self.splits
        if self._fs is not None and not self.complete:  # one listing, not a request per unit
            done = set(self._remote.names(PROGRESS))
            return [u for s in splits for u in self.units(s) if self._marker_name(u) not in done]
        return [u for s in splits for u in self.units(s) if not self.is_done(u)]

    def _write_marker(self, unit: Unit, text: str) -> None:
        if self._fs is not None:
            self._remote.put(self._marker_name(unit), text.encode())  # one PUT: atomic
        else:
            write_atomic(self._marker(unit), text)

    def _read_marker(self, unit: Unit) -> Any:
        if self._fs is not None:
            return json.loads(self._remote.read(self._marker_name(unit)) or b"null")
        return json.loads(self._marker(unit).read_text())

    def unit_marker(self, unit: Unit) -> tuple[dict[str, Any] | None, str]:
        """The unit's progress marker and "", or None and why it is not one: missing, cut short,
        not the unit's (then the unit is pending: resuming writes it again)."""
        try:
            marker = self._read_marker(unit)
        except FileNotFoundError:
            return None, MARKER_MISSING
        except (OSError, ValueError) as e:  # a marker cut short or garbled: json's errors are ValueErrors
            return None, f"unreadable: {type(e).__name__}"
        problem = marker_problem(marker, unit)
        return (None, problem) if problem else (marker, "")

    def marker(self, unit: Unit) -> dict[str, Any] | None:
        """The marker of a finished unit (its rows, invalid rows and digests), local or at a URL;
        None where it has none or it is not one (:meth:`unit_marker` says why; resuming writes that unit again)."""
        return self.unit_marker(unit)[0]

    def clean_temp_files(self) -> int:
        """Remove temp files a killed writer left behind (ours and zarr's). Returns how many."""
        if self._fs is not None:
            return 0  # object storage has no temp files: each object is one PUT
        removed = 0
        for p in self._local.rglob("*"):
            if p.is_file() and (p.name.endswith(".tmp") or p.name.endswith(".partial")):
                p.unlink(missing_ok=True)
                removed += 1
        return removed

    # ---------------------------------------------------------------- write

    def write_unit(
        self,
        unit: Unit,
        features: dict[str, np.ndarray],
        valid: np.ndarray,
        invalid: dict[int, str] | None = None,
        augmented: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Write all rows of ``unit`` (every view, ``valid``, and in an augmented split the augmented
        arrays ``augmented``: array name → rows, :mod:`.augmented`), then its completion marker."""
        if not self.writable:
            raise FeatstoreError(f"store {str(self.path)!r} is open read-only", "open it with mode='r+'")
        if set(features) != set(self.views):
            raise FeatstoreError(f"unit features have views {sorted(features)}, the store {sorted(self.views)}")
        written: dict[str, np.ndarray] = {}  # array → the unit's rows as stored (their digests need no read back)
        for view, values in features.items():
            expected = (unit.rows, *self.row_shape(view))
            if values.shape != expected:
                raise FeatstoreError(f"unit {unit.split}#{unit.index} view {view!r}: got shape {values.shape}, expected {expected}")
            written[f"features/{view}"] = np.asarray(values, dtype=self._writer(unit.split, f"features/{view}").dtype)
        written["valid"] = np.asarray(valid, bool)
        expected_augmented = self.augmented_arrays(unit.split)
        if set(augmented or {}) != set(expected_augmented):
            raise FeatstoreError(
                f"unit {unit.split}#{unit.index}: augmented arrays {sorted(augmented or {})}, the store {expected_augmented}"
            )
        for name, values in (augmented or {}).items():
            array = self._writer(unit.split, name)
            if values.shape[0] != unit.rows or tuple(values.shape[1:]) != tuple(array.shape[1:]):
                raise FeatstoreError(f"unit {unit.split}#{unit.index} array {name!r}: got shape {values.shape}")
            written[name] = np.asarray(values, dtype=array.dtype)
        for name, values in written.items():
            self._confirm_writer()
            self._writer(unit.split, name)[unit.start : unit.stop] = values
        marker = {
            "rows": [unit.start, unit.stop],
            "invalid": {str(k): v for k, v in sorted((invalid or {}).items())},
            "written": time.time(),
            "digests": self._unit_digests(unit, written),
        }
        self._confirm_writer()
        self._write_marker(unit, json.dumps(marker))

    def _confirm_writer(self) -> None:
        if self.confirm_writer is not None:
            self.confirm_writer()

    def _writer(self, split: str, name: str) -> Any:
        """The array a unit writes, opened once per store (at a URL each open is a metadata request).
        Every chunk is written, even one equal to the fill value: a missing chunk is then always damage."""
        key = f"{split}/{name}"
        if key not in self._writers:
            self._writers[key] = self._group[key].with_config({"write_empty_chunks": True})
        return self._writers[key]

    def _unit_digests(self, unit: Unit, written: dict[str, np.ndarray]) -> dict[str, str]:
        """The digest of each array's rows of ``unit``: every array of the split but those written
        when the store was created (their digests are in the attributes already). An array this unit
        did not write itself (dense targets) keeps the digest the store recorded when it was complete
        (a repaired unit: what the array held then, so damage there is never recorded as its content),
        else is read back."""
        if unit.split not in self._unit_arrays:
            recorded = Recorded.from_attrs(self.attrs)
            created = recorded.created.get(unit.split, [])
            self._unit_arrays[unit.split] = [a for a in array_names(self._group[unit.split]) if a not in created]
            self._kept_digests[unit.split] = recorded.splits.get(unit.split, {})
        kept = self._kept_digests[unit.split]
        out = {}
        for name in self._unit_arrays[unit.split]:
            if name in written:
                out[name] = rows_digest(written[name])
            elif unit.index < len(kept.get(name, [])):
                out[name] = kept[name][unit.index]
            else:
                out[name] = rows_digest(self._group[f"{unit.split}/{name}"][unit.start : unit.stop])
        return out

    def remove_attrs(self, *names: str) -> None:
        """Delete top-level attributes (absent ones are ignored)."""
        if not self.writable:
            raise FeatstoreError(f"store {str(self.path)!r} is open read-only", "open it with mode='r+'")
        for name in names:
            if name in self.attrs:
                del self._group.attrs[name]
                del self.attrs[name]
        self._meta = None

    def finalize(self, extra_attrs: dict[str, Any] | None = None) -> None:
        """Verify every unit, gather the invalid rows' reasons, set ``complete``, drop progress files."""
        missing = self.pending_units()
        if missing:
            raise FeatstoreError(f"cannot finalize: {len(missing)} units not written yet", "rerun the same extract command to resume")
        invalid: dict[str, list[dict[str, Any]]] = {}
        recorded = Recorded.from_attrs(self.attrs)
        for split in self.splits:
            paths = self._group[split]["paths"]
            rows: list[tuple[int, str]] = []
            arrays = recorded.splits.setdefault(split, {})
            created = set(recorded.created.get(split, []))
            from_units: dict[str, list[str]] = {}
            for unit in self.units(split):
                marker, _ = self.unit_marker(unit)
                if marker is None:
                    raise FeatstoreError(
                        f"unit marker {self._marker_name(unit)} of split {split!r} does not match the plan", "rerun with --overwrite"
                    )
                rows.extend((int(r), reason) for r, reason in marker["invalid"].items())
                # a marker of an older featstore (a resumed store) has none: its rows as they are now
                digests = marker.get("digests") or self._unit_digests(unit, {})
                for name, digest in digests.items():
                    if name not in created:
                        from_units.setdefault(name, []).append(digest)
            arrays.update(from_units)  # a repaired store's units replace what it recorded before
            if rows:
                path_values = paths[:]
                invalid[split] = [{"row": r, "path": str(path_values[r]), "reason": reason} for r, reason in sorted(rows)]
            valid_count = int(np.count_nonzero(self._group[split]["valid"][:]))
            if valid_count + len(rows) != self.num_rows(split):
                raise FeatstoreError(
                    f"split {split!r}: {valid_count} valid + {len(rows)} invalid rows != {self.num_rows(split)}",
                    "the store is damaged; rerun with --overwrite",
                )
        attrs = dict(extra_attrs or {})
        attrs[ATTRIBUTE] = recorded.to_attrs()
        attrs.update(invalid=invalid, complete=True, completed=utc_stamp())
        self._confirm_writer()  # reading every marker takes a while: the lease may have lapsed meanwhile
        self.update_attrs(attrs)  # at a URL: one PUT of zarr.json, the completion record, atomic
        if self._fs is not None:
            self._remote.remove(PROGRESS)
            self._group.store.fs.invalidate_cache()  # zarr's own filesystem may have listed _progress
        else:
            shutil.rmtree(self._local / PROGRESS, ignore_errors=True)
        # one read of zarr.json describes the whole tree: fast remote opens, xarray's consolidated=True
        with warnings.catch_warnings():  # "not part of the v3 spec yet": zarr-python, xarray and dask read it
            warnings.simplefilter("ignore", UserWarning)
            self._group = _zarr().consolidate_metadata(self._group.store if self._fs is not None else str(self._local))

    def update_attrs(self, attrs: dict[str, Any]) -> None:
        if not self.writable:
            raise FeatstoreError(f"store {str(self.path)!r} is open read-only", "open it with mode='r+'")
        self._group.attrs.update(attrs)
        self.attrs.update(attrs)
        self._meta = None

    # ---------------------------------------------------------------- read

    def require_complete(self) -> FeatureStore:
        if not self.complete:
            raise UsageError(
                f"store {str(self.path)!r} is incomplete ({len(self.pending_units())} units not written)",
                "rerun the same `featstore extract` command to finish it",
            )
        return self

    def split_group(self, split: str) -> Any:
        if split not in self.meta.splits:
            raise UsageError(f"split {split!r} not in store {str(self.path)!r}", f"it has: {', '.join(self.splits)}")
        return self._group[split]

    def _whole(self, split: str, name: str) -> np.ndarray:
        """Every row of a split's array, checked against its digests when the store verifies reads."""
        array = self.split_group(split)[name]
        if self.read_check is None:
            return np.asarray(array[:])
        n = int(array.shape[0])
        values = np.asarray(self.read_check.read(split, name, 0, n, lambda: array[:]))
        self.read_check.check(split, name, values)
        return values

    def labels(self, split: str) -> np.ndarray:
        return np.asarray(self._whole(split, "labels"), dtype=np.int64)

    def paths(self, split: str) -> np.ndarray:
        values = self._whole(split, "paths")
        return np.asarray([v.decode() if isinstance(v, bytes) else v for v in values.tolist()], dtype=object)

    def valid(self, split: str) -> np.ndarray:
        return np.asarray(self._whole(split, "valid"), dtype=bool)

    def features(self, split: str, view: str, rows: Any = None) -> FeatureArray:
        """The (N, D) features of ``view``, lazily (NaN rows where ``valid`` is false); ``rows``
        (a slice, index array or boolean mask) selects rows. Nothing is read until indexed or
        converted: ``np.asarray(...)``, ``[...]`` or ``.read()``. A patch view: :meth:`patches`."""
        group = self.split_group(split)
        if view not in self.views:
            raise UsageError(f"view {view!r} not in store {str(self.path)!r}", f"it has: {', '.join(self.views)}")
        if view in self.patch_views:
            raise UsageError(f"view {view!r} is a patch view of shape (N, {', '.join(map(str, self.patch_views[view]))})",
                             "read it with store.patches(split, view), or probe it with `probe fit --task depth|seg`")  # fmt: skip
        check = None if self.read_check is None else (split, f"features/{view}", self.read_check)
        return FeatureArray(group["features"][view], rows, check)

    def patches(self, split: str, view: str, rows: Any = None) -> PatchArray:
        """The (N, h, w, C) tokens of patch view ``view``, lazily, like :meth:`features`."""
        group = self.split_group(split)
        if view not in self.patch_views:
            patch = ", ".join(self.patch_views) or "none"
            raise UsageError(f"view {view!r} is not a patch view of store {str(self.path)!r}", f"its patch views: {patch}")
        check = None if self.read_check is None else (split, f"features/{view}", self.read_check)
        return PatchArray(group["features"][view], rows, check)

    @property
    def augment(self) -> dict[str, Any] | None:
        """The augmented views' record (method, views K, seed, parameters, splits); None: none stored."""
        return recorded(self.attrs)

    def augmented_arrays(self, split: str) -> list[str]:
        """The augmented arrays of ``split`` (empty where it has none), sorted."""
        if split not in augmented_splits(self.attrs):
            return []
        return sorted([views_array(v) for v in self.views] + [PARAMS_ARRAY])

    def augmented(self, split: str, view: str | None = None, rows: Any = None) -> AugmentedArray:
        """The (N, K, D) augmented features of ``view``, or with ``view=None`` the (N, K, 5) crop
        parameters (top, left, height, width, flip; -1: none), lazily like :meth:`features`."""
        group = self.split_group(split)
        if split not in augmented_splits(self.attrs):
            where = ", ".join(augmented_splits(self.attrs)) or "none"
            raise UsageError(f"split {split!r} of store {str(self.path)!r} has no augmented views (splits with them: {where})",
                             "extract with --augment rrc-flip --augment-views K; only the train split gets them")  # fmt: skip
        if view is not None and view not in self.views:
            raise UsageError(f"view {view!r} not in store {str(self.path)!r}", f"it has: {', '.join(self.views)}")
        name = PARAMS_ARRAY if view is None else views_array(view)
        check = None if self.read_check is None else (split, name, self.read_check)
        return AugmentedArray(group[name], rows, check)

    def invalid_rows(self, split: str | None = None) -> list[dict[str, Any]]:
        """The rows that could not be decoded, with their reasons: all of them in a complete store;
        in an incomplete one, those its finished units found (the others are not read yet)."""
        invalid = self.meta.invalid if self.complete else self._invalid_so_far()
        if split is not None:
            return list(invalid.get(split, []))
        return [dict(r, split=s) for s, rows in invalid.items() for r in rows]

    def _invalid_so_far(self) -> dict[str, list[dict[str, Any]]]:
        """What ``finalize`` will record, from the markers of the units written so far."""
        pending = {(u.split, u.index) for u in self.pending_units()}
        out: dict[str, list[dict[str, Any]]] = {}
        for split in self.splits:
            rows: list[tuple[int, str]] = []
            for unit in self.units(split):
                if (split, unit.index) in pending:
                    continue
                try:
                    marker = self._read_marker(unit)
                except (OSError, ValueError):
                    continue  # unreadable: resuming writes the unit again
                if isinstance(marker, dict) and isinstance(marker.get("invalid"), dict):
                    rows.extend((int(r), str(reason)) for r, reason in marker["invalid"].items())
            if rows:
                paths = self._group[split]["paths"]
                out[split] = [{"row": r, "path": str(paths[r]), "reason": reason} for r, reason in sorted(rows)]
        return out

    @property
    def digests(self) -> Recorded:
        """The content digests the store records (none for a store written before them)."""
        return Recorded.from_attrs(self.attrs)

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.dataset.class_names)

    def size_on_disk(self) -> int:
        if self._fs is not None:
            fs, inner = self._fs
            return int(fs.du(inner)) if fs.isdir(inner) else int(fs.size(inner))
        path = self._local
        if path.is_file():
            return path.stat().st_size
        return tree_size(path)

    def info(self) -> dict[str, Any]:
        """Everything `featstore info` shows."""
        m = self.meta
        return {
            "path": str(self.path),
            "format": self.format,
            "complete": m.complete,
            "schema_version": m.schema_version,
            "featstore_version": m.featstore_version,
            "created": m.created,
            "splits": {s: {"rows": self.num_rows(s), "invalid": len(self.invalid_rows(s))} for s in self.splits},
            "pending_units": 0 if m.complete else len(self.pending_units()),
            "views": {v: list(self.row_shape(v)) if v in self.patch_views else d for v, d in m.views.items()},
            "dtype": m.dtype,
            "encoder": m.encoder.raw,
            "preprocessing": m.preprocessing,
            "loader": m.loader,
            "dataset": {k: v for k, v in m.dataset.raw.items() if k != "class_names"},
            "cache_key": m.cache_key,
            # the last run: where it ran and how fast; the command that resumes or reruns it
            "device": m.device,
            "images_per_second": m.images_per_second,
            "completed": m.completed,
            "command": m.command,
            "invalid": self.invalid_rows(),
            "size_bytes": self.size_on_disk(),
            "augment": self._augment_info(),
            "targets": self._targets_info(),
        }

    def _targets_info(self) -> dict[str, Any] | None:
        """A dense dataset's targets for `featstore info`: the record without its long fields, invalid rows counted."""
        info = self.attrs.get("targets")
        if not isinstance(info, dict):
            return None
        invalid = info.get("invalid") or {}
        return {k: v for k, v in info.items() if k != "invalid"} | {"invalid_rows": sum(len(v) for v in invalid.values())}

    def _augment_info(self) -> dict[str, Any] | None:
        """The augmented views for `featstore info`: the record, and the bytes their arrays take."""
        info = self.augment
        if info is None:
            return None
        size = 0
        for split in augmented_splits(self.attrs):
            for name in self.augmented_arrays(split):
                array = self.split_group(split)[name]
                size += int(np.prod(array.shape)) * np.dtype(array.dtype).itemsize
        return {**info, "bytes": size}


def _created_digests(group: Any, rows: dict[str, int], chunk_rows: int) -> Recorded:
    """The digests of the arrays :meth:`FeatureStore.create` filled (labels, paths): each unit's
    rows, read back once; the arrays left to the units are not written yet and have none."""
    recorded = Recorded(algorithm=None)
    for split, n in rows.items():
        sg = group[split]
        bounds = unit_bounds(n, chunk_rows)
        arrays = {}
        for name in array_names(sg):
            array = sg[name]
            if n and array.nchunks_initialized:
                arrays[name] = [d for _, d in sorted(digests_of(np.asarray(array[:]), bounds).items())]
        recorded.splits[split] = arrays
        recorded.created[split] = sorted(arrays)
    return recorded
