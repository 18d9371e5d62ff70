"""The feature store schema (Zarr v3): create, resume, write whole units, finalize, read.

Layout (see DESIGN.md)::

    feats.zarr/zarr.json            attrs: provenance, views, cache key, complete
    feats.zarr/<split>/labels       int32 (N,)
    feats.zarr/<split>/paths        str   (N,)   relative to the dataset root
    feats.zarr/<split>/valid        bool  (N,)   false where the image could not be decoded
    feats.zarr/<split>/features/<view>  float16|float32 (N, D), chunks of whole rows
    feats.zarr/_progress/           only while extracting: lock and one marker per finished unit

A unit is a chunk-aligned row range. Its rows are written whole, then its marker is written
atomically (temp file + rename); ``complete`` is set last, after every unit is verified. A killed
extraction therefore resumes with no duplicate and no missing row.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .errors import FeatstoreError, UsageError
from .lock import pid_alive

SCHEMA_VERSION = 1
PROGRESS = "_progress"
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


def _zarr():
    import zarr

    return zarr


def is_store(path: str | os.PathLike) -> bool:
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return False
    try:
        return "schema_version" in json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False


def _remove_stale_builds(path: Path) -> None:
    """Delete half-built stores of ``path`` left by killed processes (their pid is gone)."""
    for build in path.parent.glob(f".{path.name}.creating-*"):
        pid = build.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(build, ignore_errors=True)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class FeatureStore:
    """A feature store on disk. Use :meth:`create` to start one and :meth:`open` to read or resume."""

    def __init__(self, path: str | os.PathLike, group, writable: bool):
        self.path = Path(path)
        self._group = group
        self.writable = writable
        self.attrs: dict = group.attrs.asdict()

    # ---------------------------------------------------------------- create / open

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        splits: dict[str, tuple[list[str], np.ndarray]],
        views: dict[str, int],
        dtype: str = "float16",
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        attrs: dict | None = None,
    ) -> "FeatureStore":
        """Presize every array and freeze the plan. ``splits``: name → (relative paths, labels)."""
        if dtype not in FEATURE_DTYPES:
            raise UsageError(f"unknown feature dtype {dtype!r}", f"use one of {', '.join(FEATURE_DTYPES)}")
        if chunk_rows < 1:
            raise UsageError(f"chunk rows must be positive, got {chunk_rows}", "pass a positive --chunk-rows")
        zarr = _zarr()
        path = Path(path)
        if path.exists():
            raise FeatstoreError(f"{str(path)!r} already exists", "remove it or choose another path")
        # build beside the target and rename: a store is either absent or fully planned, never half-created
        _remove_stale_builds(path)
        build = path.with_name(f".{path.name}.creating-{os.getpid()}")
        shutil.rmtree(build, ignore_errors=True)
        group = zarr.open_group(str(build), mode="w")
        for split, (paths, labels) in splits.items():
            n = len(paths)
            sg = group.create_group(split)
            rows = max(1, min(chunk_rows, n))
            sg.create_array("labels", shape=(n,), dtype="int32", chunks=(max(1, n),))[:] = np.asarray(labels, np.int32)
            sg.create_array("paths", shape=(n,), dtype=str, chunks=(max(1, n),))[:] = np.asarray(paths, dtype=object)
            sg.create_array("valid", shape=(n,), dtype="bool", chunks=(rows,), fill_value=False)
            fg = sg.create_group("features")
            for view, dim in views.items():
                # no codec: zstd saves ~8% on float features but caps writes near 100 MB/s (benchmarks/RESULTS.md)
                fg.create_array(view, shape=(n, dim), dtype=dtype, chunks=(rows, dim), fill_value=np.nan, compressors=None)
        progress = group.create_group(PROGRESS)
        for split in splits:
            progress.create_group(split)
        meta = dict(attrs or {})
        meta.update(
            schema_version=SCHEMA_VERSION,
            featstore_version=__version__,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            splits={s: len(p) for s, (p, _) in splits.items()},
            views=dict(views),
            dtype=dtype,
            chunk_rows=chunk_rows,
            complete=False,
        )
        group.attrs.update(meta)
        try:
            os.replace(build, path)
        except OSError as e:
            shutil.rmtree(build, ignore_errors=True)
            raise FeatstoreError(f"{str(path)!r} appeared while the store was being created ({e.strerror})",
                                 "another extraction writes there; wait for it or choose another --out") from e
        return cls.open(path, mode="r+")

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> "FeatureStore":
        path = Path(path)
        if not path.exists():
            raise UsageError(f"store {str(path)!r} not found", "run `featstore extract … --out STORE` first")
        if not is_store(path):
            raise UsageError(f"{str(path)!r} is not a featstore store", "pass a folder written by `featstore extract`")
        group = _zarr().open_group(str(path), mode="r+" if mode != "r" else "r")
        store = cls(path, group, writable=mode != "r")
        if store.attrs.get("schema_version", 0) > SCHEMA_VERSION:
            raise FeatstoreError(
                f"store {str(path)!r} has schema version {store.attrs['schema_version']}, newer than this featstore ({SCHEMA_VERSION})",
                "upgrade featstore",
            )
        return store

    # ---------------------------------------------------------------- plan

    @property
    def splits(self) -> list[str]:
        return list(self.attrs["splits"])

    @property
    def views(self) -> dict[str, int]:
        return dict(self.attrs["views"])

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    @property
    def chunk_rows(self) -> int:
        return int(self.attrs["chunk_rows"])

    def num_rows(self, split: str) -> int:
        return int(self.attrs["splits"][split])

    def units(self, split: str) -> list[Unit]:
        n, rows = self.num_rows(split), self.chunk_rows
        return [Unit(split, i, start, min(start + rows, n)) for i, start in enumerate(range(0, n, rows))]

    def _marker(self, unit: Unit) -> Path:
        return self.path / PROGRESS / unit.split / f"unit-{unit.index:06d}.json"

    def is_done(self, unit: Unit) -> bool:
        return self.complete or self._marker(unit).is_file()

    def pending_units(self, split: str | None = None) -> list[Unit]:
        splits = [split] if split else self.splits
        return [u for s in splits for u in self.units(s) if not self.is_done(u)]

    def clean_temp_files(self) -> int:
        """Remove temp files a killed writer left behind (ours and zarr's). Returns how many."""
        removed = 0
        for p in self.path.rglob("*"):
            if p.is_file() and (p.name.endswith(".tmp") or p.name.endswith(".partial")):
                p.unlink(missing_ok=True)
                removed += 1
        return removed

    # ---------------------------------------------------------------- write

    def write_unit(self, unit: Unit, features: dict[str, np.ndarray], valid: np.ndarray, invalid: dict[int, str] | None = None) -> None:
        """Write all rows of ``unit`` (every view, and ``valid``), then its completion marker."""
        if not self.writable:
            raise FeatstoreError(f"store {str(self.path)!r} is open read-only", "open it with mode='r+'")
        if set(features) != set(self.views):
            raise FeatstoreError(f"unit features have views {sorted(features)}, the store {sorted(self.views)}")
        split = self._group[unit.split]
        for view, values in features.items():
            if values.shape != (unit.rows, self.views[view]):
                raise FeatstoreError(f"unit {unit.split}#{unit.index} view {view!r}: got shape {values.shape}, expected {(unit.rows, self.views[view])}")
            split["features"][view][unit.start : unit.stop] = values
        split["valid"][unit.start : unit.stop] = np.asarray(valid, bool)
        marker = {
            "rows": [unit.start, unit.stop],
            "invalid": {str(k): v for k, v in sorted((invalid or {}).items())},
            "written": time.time(),
        }
        write_atomic(self._marker(unit), json.dumps(marker))

    def finalize(self, extra_attrs: dict | None = None) -> None:
        """Verify every unit, gather the invalid rows' reasons, set ``complete``, drop progress files."""
        missing = self.pending_units()
        if missing:
            raise FeatstoreError(f"cannot finalize: {len(missing)} units not written yet", "rerun the same extract command to resume")
        invalid: dict[str, list[dict]] = {}
        for split in self.splits:
            paths = self._group[split]["paths"]
            rows = []
            for unit in self.units(split):
                marker = json.loads(self._marker(unit).read_text())
                if marker["rows"] != [unit.start, unit.stop]:
                    raise FeatstoreError(f"unit marker {self._marker(unit).name} of split {split!r} does not match the plan", "rerun with --overwrite")
                rows.extend((int(r), reason) for r, reason in marker["invalid"].items())
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
        attrs.update(invalid=invalid, complete=True, completed=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self.update_attrs(attrs)
        shutil.rmtree(self.path / PROGRESS, ignore_errors=True)

    def update_attrs(self, attrs: dict) -> None:
        self._group.attrs.update(attrs)
        self.attrs.update(attrs)

    # ---------------------------------------------------------------- read

    def require_complete(self) -> "FeatureStore":
        if not self.complete:
            raise UsageError(
                f"store {str(self.path)!r} is incomplete ({len(self.pending_units())} units not written)",
                "rerun the same `featstore extract` command to finish it",
            )
        return self

    def _split(self, split: str):
        if split not in self.attrs["splits"]:
            raise UsageError(f"split {split!r} not in store {str(self.path)!r}", f"it has: {', '.join(self.splits)}")
        return self._group[split]

    def labels(self, split: str) -> np.ndarray:
        return np.asarray(self._split(split)["labels"][:], dtype=np.int64)

    def paths(self, split: str) -> np.ndarray:
        return np.asarray(self._split(split)["paths"][:], dtype=object)

    def valid(self, split: str) -> np.ndarray:
        return np.asarray(self._split(split)["valid"][:], dtype=bool)

    def features(self, split: str, view: str, rows: slice | None = None) -> np.ndarray:
        """The (N, D) features of ``view`` (NaN rows where ``valid`` is false)."""
        group = self._split(split)
        if view not in self.views:
            raise UsageError(f"view {view!r} not in store {str(self.path)!r}", f"it has: {', '.join(self.views)}")
        arr = group["features"][view]
        return arr[rows] if rows is not None else arr[:]

    def invalid_rows(self, split: str | None = None) -> list[dict]:
        invalid = self.attrs.get("invalid", {})
        if split is not None:
            return list(invalid.get(split, []))
        return [dict(r, split=s) for s, rows in invalid.items() for r in rows]

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs.get("dataset", {}).get("class_names", []))

    def size_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def info(self) -> dict:
        """Everything `featstore info` shows."""
        a = self.attrs
        return {
            "path": str(self.path),
            "complete": self.complete,
            "schema_version": a.get("schema_version"),
            "featstore_version": a.get("featstore_version"),
            "created": a.get("created"),
            "splits": {s: {"rows": self.num_rows(s), "invalid": len(self.invalid_rows(s))} for s in self.splits},
            "pending_units": 0 if self.complete else len(self.pending_units()),
            "views": self.views,
            "dtype": a.get("dtype"),
            "encoder": a.get("encoder", {}),
            "preprocessing": a.get("preprocessing", {}),
            "loader": a.get("loader"),
            "dataset": {k: v for k, v in a.get("dataset", {}).items() if k != "class_names"},
            "cache_key": a.get("cache_key"),
            # the last run: where it ran and how fast; the command that resumes or reruns it
            "device": a.get("device"),
            "images_per_second": a.get("images_per_second"),
            "completed": a.get("completed"),
            "command": a.get("command"),
            "invalid": self.invalid_rows(),
            "size_bytes": self.size_on_disk(),
        }
