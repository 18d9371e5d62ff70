"""``featstore verify``: every check a store can be given, streaming unit by unit.

- **Schema**: every split has its arrays; every array has the split's row count (the store's
  attributes, the consolidated metadata and each array's own ``zarr.json`` agree), the view's
  dimensions and the schema's dtype.
- **Content**: each unit of each array is read (one unit's rows in memory at a time; the small
  create-time arrays, whose one chunk is the whole split, once) and its digest compared with the
  recorded one. A chunk that cannot be read (truncated, garbled) and a chunk file that is missing
  are problems too.
- **Meaning**: labels in ``[0, classes)``; the rows ``valid`` marks false are exactly the rows
  recorded invalid (with their reasons).

A store written before digests existed (no ``digests`` attribute) gets every check but the
digests, plus the ones that stand in for them: a missing chunk of ``labels`` or ``paths`` (their
old fill values 0 and "" pass for data), a missing ``features`` chunk of a unit with valid rows,
and the dataset's manifest digest recomputed from the stored paths and labels.

HDF5 exports carry their source's digests (they are digests of values, not of files) and get the
same checks, but for chunk files and ``zarr.json``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..manifest import Manifest, SplitManifest, unstored_paths
from .augmented import augmented_splits, required_arrays
from .digests import Recorded, StoreDamaged, array_names, repair_hint, rows_digest, rows_text, unit_bounds
from .feature_store import MARKER_MISSING, FeatureStore


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a store, located as precisely as it can be."""

    what: str
    split: str | None = None
    array: str | None = None
    rows: tuple[int, int] | None = None  # [start, stop)

    def line(self) -> str:
        where = "/".join(p for p in (self.split, self.array) if p)
        if self.rows is not None:
            where = f"{where} {rows_text(*self.rows)}".strip()
        return f"{where}: {self.what}" if where else self.what


@dataclass
class VerifyReport:
    """What :func:`verify_store` found: ``problems`` (empty: the store is intact), ``notes`` (what
    could not be checked, and why), the damaged units by split (what ``--repair`` re-extracts) and
    the splits whose create-time arrays (labels, paths) are damaged (rewritten from the dataset)."""

    store: str
    digests: bool
    complete: bool
    units: int = 0  # units checked
    bytes: int = 0  # bytes of values read
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    damaged_units: dict[str, set[int]] = field(default_factory=dict)
    damaged_plan: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, problem: Problem, unit: int | None = None, plan: bool = False) -> None:
        self.problems.append(problem)
        if problem.split is not None and unit is not None:
            self.damaged_units.setdefault(problem.split, set()).add(unit)
        if problem.split is not None and plan:
            self.damaged_plan.add(problem.split)

    def to_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "ok": self.ok,
            "digests": self.digests,
            "complete": self.complete,
            "units": self.units,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "problems": [p.line() for p in self.problems],
            "notes": self.notes,
        }


def _trailing(dim: Any) -> tuple[int, ...] | None:
    """A view's per-row shape from its recorded dimension (an int, or a list for a patch view);
    None (not checked) for a record of another form."""
    try:
        return tuple(int(d) for d in dim) if isinstance(dim, (list, tuple)) else (int(dim),)
    except (TypeError, ValueError):
        return None


def _required(store: FeatureStore) -> dict[str, tuple[tuple[int, ...] | None, str]]:
    """Array → (per-row shape or None for any, dtype kind) that the schema requires of every split."""
    arrays: dict[str, tuple[tuple[int, ...] | None, str]] = {"labels": ((), "i"), "paths": ((), "text"), "valid": ((), "b")}
    for view, dim in store.views.items():
        arrays[f"features/{view}"] = (_trailing(dim), "f")
    return arrays


def _kind(dtype: Any) -> str:
    kind = np.dtype(dtype).kind
    return "text" if kind in "OUST" else kind


def schema_problems(store: FeatureStore) -> list[Problem]:
    """What disagrees with the schema (metadata only, no chunk read): missing arrays, row counts,
    per-row shapes, dtypes; for a local Zarr store also each array's own ``zarr.json``."""
    problems: list[Problem] = []
    required = _required(store)
    root = store.path if isinstance(store.path, Path) and store.format == "zarr" else None
    consolidated = consolidated_entries(root) if root is not None else {}
    for split, n in store.meta.splits.items():
        try:
            group = store.split_group(split)
        except KeyError:
            problems.append(Problem("the split's group is missing", split))
            continue
        names = set(array_names(group))
        # an augmented split (the train split of `extract --augment`) holds its views' arrays too
        wanted = {**required, **required_arrays(store.attrs, store.views)} if split in augmented_splits(store.attrs) else required
        for name in wanted:
            if name not in names:
                problems.append(Problem("the array is missing", split, name))
        for name in sorted(names):
            array = group[name]
            shape = tuple(int(d) for d in array.shape)
            if not shape or shape[0] != n:
                problems.append(Problem(f"has {shape[0] if shape else 0} rows, the store records {n}", split, name))
            want = wanted.get(name)
            if want is not None:
                trailing, kind = want
                # a view recorded by its channels alone (an int) may hold (h, w, C) rows: patch tokens
                patch = trailing is not None and len(trailing) == 1 and len(shape) > 2 and shape[-1] == trailing[0]
                if trailing is not None and shape[1:] != trailing and not patch:
                    problems.append(Problem(f"has rows of shape {shape[1:]}, the schema says {trailing}", split, name))
                if _kind(array.dtype) != kind:
                    problems.append(Problem(f"has dtype {array.dtype}, the schema says {kind}", split, name))
                if name.startswith("features/") and store.meta.dtype and str(np.dtype(array.dtype)) != store.meta.dtype:
                    problems.append(Problem(f"has dtype {array.dtype}, the store records {store.meta.dtype}", split, name))
            if root is not None:
                problems += _own_metadata_problems(
                    root / split / name / "zarr.json", consolidated.get(f"{split}/{name}"), shape, split, name
                )
    return problems


# what an array's own zarr.json must say as the consolidated metadata (which featstore reads) says it: a reader
# without consolidation (xarray's default, a re-consolidation after a repair) reads the array's own file
_OWN_METADATA = ("data_type", "fill_value", "chunk_grid", "chunk_key_encoding", "codecs", "dimension_names")


OWN_METADATA_MISSING = "its own zarr.json is missing (readers without the consolidated metadata find no array)"
OWN_METADATA_UNREADABLE = "its own zarr.json is unreadable (not the JSON metadata of a Zarr array)"


def consolidated_entries(root: Path) -> dict[str, Any]:
    """The consolidated metadata of the store at ``root``, by array path ({} when it cannot be read)."""
    try:
        metadata = json.loads((root / "zarr.json").read_text())["consolidated_metadata"]["metadata"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return metadata if isinstance(metadata, dict) else {}


def _own_metadata_problems(path: Path, entry: Any, shape: tuple[int, ...], split: str, name: str) -> list[Problem]:
    try:
        own = json.loads(path.read_text())
        own_shape = tuple(int(d) for d in own["shape"])
    except FileNotFoundError:
        # featstore reads the consolidated entry and would not notice; zarr without it (xarray, the
        # re-consolidation a repair makes) finds no array here
        return [Problem(OWN_METADATA_MISSING, split, name)]
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return [Problem(OWN_METADATA_UNREADABLE, split, name)]
    problems = []
    if own_shape != shape:
        problems.append(Problem(f"its zarr.json says shape {list(own_shape)}, the store's metadata {list(shape)}", split, name))
    if isinstance(entry, dict):
        for key in _OWN_METADATA:
            if key in entry and own.get(key) != entry[key]:
                said = json.dumps(own.get(key))[:60]
                problems.append(
                    Problem(f"its zarr.json says {key} {said}, the store's metadata {json.dumps(entry[key])[:60]}", split, name)
                )
    return problems


def _chunk_rows(array: Any) -> int:
    chunks = getattr(array, "chunks", None)
    return int(chunks[0]) if chunks else max(1, int(array.shape[0]))


def _missing_chunks(store: FeatureStore, split: str, name: str, array: Any) -> set[int] | None:
    """Row-chunk indices whose chunk files are absent (local Zarr only; None where not checkable)."""
    if store.format != "zarr" or not isinstance(store.path, Path):
        return None
    try:
        encode = array.metadata.encode_chunk_key
        rows = _chunk_rows(array)
        trailing = (0,) * (len(array.shape) - 1)
        folder = store.path / split / name
        count = -(-int(array.shape[0]) // rows)
        return {i for i in range(count) if not (folder / encode((i, *trailing))).is_file()}
    except (AttributeError, TypeError):
        return None


def _done_units(store: FeatureStore, split: str, report: VerifyReport) -> tuple[set[int], dict[str, list[str | None]]]:
    """An incomplete store: the units with a marker, and the digests their markers hold. A marker
    that is there but does not record its unit (cut short, edited) is named: its unit is pending."""
    units = store.units(split)
    # at a URL one listing, not a request per unit (a local store's markers are looked at one by one, below)
    pending = set() if isinstance(store.path, Path) else {u.index for u in store.pending_units(split)}
    done: set[int] = set()
    digests: dict[str, list[str | None]] = {}
    for unit in units:
        if isinstance(store.path, Path):
            marker, why = store.unit_marker(unit)
            if marker is None and why == MARKER_MISSING:
                continue
            if marker is None:
                name = store._marker(unit).relative_to(store._local)
                report.add(Problem(f"its progress marker {name} does not record the unit ({why}): the unit counts as not written, resuming writes it again",
                                   split, rows=(unit.start, unit.stop)), unit.index)  # fmt: skip
                continue
        else:  # at a URL: one listing says which units have a marker, each read through the store
            marker = None if unit.index in pending else store.marker(unit)
            if marker is None:
                continue
        done.add(unit.index)
        for name, digest in (marker.get("digests") or {}).items():
            digests.setdefault(name, [None] * len(units))[unit.index] = digest
    return done, digests


def num_classes(store: FeatureStore) -> int | None:
    """The number of classes the store records (its dataset's), or None when it records none."""
    dataset = store.meta.dataset
    counts = [c for c in (dataset.num_classes, len(dataset.class_names) or None) if c]
    return max(counts) if counts else None


def label_problems(split: str, labels: np.ndarray, classes: int | None, offset: int = 0) -> list[Problem]:
    """Labels outside ``[0, classes)`` (only ``>= 0`` when the store records no class count)."""
    bad = labels < 0 if classes is None else (labels < 0) | (labels >= classes)
    if not bad.any():
        return []
    rows = np.flatnonzero(bad) + offset
    values = labels[bad]
    lost = " (-1: a lost chunk)" if (values == -1).any() else ""
    allowed = f"[0, {classes})" if classes is not None else ">= 0"
    return [
        Problem(
            f"{len(rows)} label{'s' if len(rows) != 1 else ''} outside {allowed}{lost}, e.g. {int(values[0])} at row {int(rows[0])}",
            split,
            "labels",
            (int(rows[0]), int(rows[-1]) + 1),
        )
    ]


def verify_store(store: FeatureStore, log: Callable[[str], None] = lambda s: None) -> VerifyReport:
    """Check every unit of every array of ``store`` (see the module docstring)."""
    start = time.perf_counter()
    recorded = store.digests
    report = VerifyReport(str(store.path), recorded.present, store.complete)
    if not recorded.present:
        report.notes.append(
            "no content digests (a store written before featstore recorded them): checked the schema, chunk files, "
            "labels, invalid rows and the manifest digest; `featstore extract ... --repair` adds digests"
        )
    if not store.complete:
        report.notes.append(f"incomplete: {len(store.pending_units())} units not written yet; checked the written ones")
    for problem in schema_problems(store):
        report.add(problem)
    classes = num_classes(store)
    for split in store.splits:
        _verify_split(store, split, recorded, classes, report)
        log(f"{split}: checked")
    if store.complete:
        _check_manifest(store, report, recorded.present)
    report.seconds = time.perf_counter() - start
    return report


def _verify_split(store: FeatureStore, split: str, recorded: Recorded, classes: int | None, report: VerifyReport) -> None:
    try:
        group = store.split_group(split)
    except KeyError:
        return
    n = store.num_rows(split)
    if n < 0:  # a recorded split size edited below zero: named by schema_problems, nothing here to stream
        return
    bounds = unit_bounds(n, store.chunk_rows)
    expected: dict[str, list[str | None]] = {k: list(v) for k, v in recorded.splits.get(split, {}).items()}
    done = set(range(len(bounds)))
    if not store.complete and store.format == "zarr":  # local or at a URL: the markers say which units are written
        done, markers = _done_units(store, split, report)
        for name, from_markers in markers.items():
            expected.setdefault(name, from_markers)
    created = set(recorded.created.get(split, [])) | {"labels", "paths"}
    valid = np.zeros(n, bool)
    valid_read = np.zeros(n, bool)
    missing_features: dict[str, set[int]] = {}
    for name in array_names(group):
        array = group[name]
        if int(array.shape[0]) != n:
            continue  # a schema problem, reported; its rows cannot be lined up with the units
        plan = name in created
        missing = _missing_chunks(store, split, name, array)
        chunk = _chunk_rows(array)
        digests: list[str | None] | None = expected.get(name)
        if report.digests and store.complete and digests is None and bounds:
            report.add(Problem("no digest recorded for this array", split, name))
        elif digests is not None and len(digests) != len(bounds):
            report.add(Problem(f"{len(digests)} digests recorded for {len(bounds)} units", split, name))
        # whole units at a time (a create-time array's one chunk once); the next block is read while
        # this one is hashed (zarr's decoding and hashlib both release the GIL)
        unit_rows = store.chunk_rows
        step = max(unit_rows, -(-chunk // unit_rows) * unit_rows)
        blocks = []
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            ids = [i for i in range(lo // unit_rows, -(-hi // unit_rows)) if plan or i in done]
            if ids:
                blocks.append((lo, hi, ids))
        for (lo, hi, ids), read in zip(blocks, _prefetched(array, [(lo, hi) for lo, hi, _ in blocks])):
            if isinstance(read, Exception):  # truncated/garbled chunk: zarr, numcodecs and h5py raise many types
                what = f"cannot be read ({type(read).__name__}: {' '.join(str(read).split())[:120]})"
                if plan:
                    report.add(Problem(what, split, name, (lo, hi)), None, plan)
                for i in [] if plan else ids:
                    report.add(Problem(what, split, name, bounds[i]), i)
                continue
            values = read
            report.bytes += values.nbytes
            lost_here = sorted(c for c in (missing or ()) if lo <= c * chunk < hi)
            if lost_here and (report.digests or plan):
                for c in lost_here:  # one line per chunk file (a create-time array's one chunk spans every unit)
                    rows = (c * chunk, min((c + 1) * chunk, n))
                    if not plan:
                        units = [i for i in ids if bounds[i][0] < rows[1] and bounds[i][1] > rows[0]]
                        report.damaged_units.setdefault(split, set()).update(units)
                    report.add(Problem(f"chunk file missing (reads as the fill value {_fill(array)})", split, name, rows), None, plan)
                continue
            for i in ids:
                a, b = bounds[i]
                report.units += 1
                rows_ = values[a - lo : b - lo]
                if _lost_chunks(missing, a, b, chunk) and name.startswith("features/"):
                    missing_features.setdefault(name, set()).add(i)
                if digests is not None and i < len(digests) and digests[i] is not None and rows_digest(rows_) != digests[i]:
                    problem = Problem("does not match its digest (changed or lost since it was written)", split, name, (a, b))
                    report.add(problem, None if plan else i, plan)
            if name == "labels":
                for problem in label_problems(split, values.astype(np.int64), classes, lo):
                    report.add(problem, None, True)
            if name == "valid":
                valid[lo:hi] = values.astype(bool)
                valid_read[lo:hi] = True
    for name, lost_units in missing_features.items():  # a store without digests: a lost chunk reads as NaN
        for i in sorted(lost_units):
            a, b = bounds[i]
            if valid[a:b].any():
                report.add(Problem("chunk file missing: valid rows read as NaN", split, name, (a, b)), i)
    if store.complete and valid_read.all():
        _check_invalid_rows(store, split, valid, bounds, report)


def _prefetched(array: Any, ranges: list[tuple[int, int]]) -> Iterator[np.ndarray | Exception]:
    """The rows of each range, in order, each read while the previous one is used (one read ahead);
    a read that fails yields its exception."""

    def read(lo: int, hi: int) -> np.ndarray | Exception:
        try:
            return np.asarray(array[lo:hi])
        except Exception as e:
            return e

    with ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(read, *ranges[0]) if ranges else None
        for k in range(len(ranges)):
            assert ahead is not None
            current = ahead.result()
            ahead = pool.submit(read, *ranges[k + 1]) if k + 1 < len(ranges) else None
            yield current


def _lost_chunks(missing: set[int] | None, a: int, b: int, chunk: int) -> bool:
    return bool(missing) and any(c in missing for c in range(a // chunk, (b - 1) // chunk + 1))  # type: ignore[operator]


def _fill(array: Any) -> Any:
    fill = getattr(array, "fill_value", None)
    return getattr(fill, "item", lambda: fill)()


def _check_invalid_rows(store: FeatureStore, split: str, valid: np.ndarray, bounds: list[tuple[int, int]], report: VerifyReport) -> None:
    """The rows ``valid`` marks false are the rows recorded invalid, with their reasons."""
    recorded = np.zeros(len(valid), bool)
    for row in store.invalid_rows(split):
        r = int(row.get("row", -1))
        if 0 <= r < len(valid):
            recorded[r] = True
    for i, (a, b) in enumerate(bounds):
        lost = ~valid[a:b] & ~recorded[a:b]
        if lost.any():
            report.add(Problem(f"{int(lost.sum())} rows read as invalid but none is recorded invalid", split, "valid", (a, b)), i)
        extra = valid[a:b] & recorded[a:b]
        if extra.any():
            report.add(Problem(f"{int(extra.sum())} rows recorded invalid read as valid", split, "valid", (a, b)), i)


_SHA = re.compile(r"^[0-9a-f]{64}$")


def _check_manifest(store: FeatureStore, report: VerifyReport, digests: bool) -> None:
    """The labels, paths and class names against the manifest digest the store was made from. With
    content digests (which cover labels and paths) this checks the class names recorded in the
    attributes: renamed or reordered, they would put other names on every per-class result."""
    dataset = store.meta.dataset
    if not dataset.manifest_sha256 or not _SHA.match(dataset.manifest_sha256) or not dataset.class_names:
        if not digests:
            report.notes.append("no manifest digest to check the labels and paths against")
        return
    if digests:
        if any(p.array in ("labels", "paths") for p in report.problems):
            return  # damaged labels or paths: reported, and they change the digest anyway
        splits = {s: SplitManifest(s, _manifest_paths(store, s), store.labels(s)) for s in store.splits}
        manifest = Manifest(dataset.name or "", Path(dataset.root or "."), tuple(dataset.class_names), splits)
        if manifest.sha256 != dataset.manifest_sha256:
            report.add(Problem("the class names in the store's attributes do not match the dataset's manifest digest (edited)"))
        return
    try:
        splits = {s: SplitManifest(s, _manifest_paths(store, s), store.labels(s)) for s in store.splits}
    except Exception as e:  # an unreadable chunk, reported by the split checks
        report.notes.append(f"the manifest digest was not checked: {type(e).__name__}")
        return
    manifest = Manifest(dataset.name or "", Path(dataset.root or "."), tuple(dataset.class_names), splits)
    if manifest.sha256 != dataset.manifest_sha256:
        report.add(Problem("the labels and paths do not match the dataset's manifest digest (a label or path changed or was lost)"))
        report.damaged_plan.update(store.splits)


def _manifest_paths(store: FeatureStore, split: str) -> tuple[str, ...]:
    """The split's paths as the manifest digest took them: a name that is not UTF-8 is stored as
    ``\\xNN`` text, its raw bytes recorded in the ``raw_paths`` of the dataset attribute."""
    raw = store.meta.dataset.raw.get("raw_paths")
    return unstored_paths(store.paths(split).tolist(), raw.get(split) if isinstance(raw, dict) else None)


def refusal(report: VerifyReport, hint: str) -> StoreDamaged:
    """The one-line error of a failed verification: the first problem, how many more, the repair."""
    first = report.problems[0].line()
    more = f" (and {len(report.problems) - 1} more problems: featstore verify {report.store})" if len(report.problems) > 1 else ""
    return StoreDamaged(f"store {report.store!r} is damaged: {first}{more}", hint)


MAX_UNRECORDED_CLASSES = 1 << 20  # without a recorded class count: beyond this a label is damage, not a class


def require_readable(store: FeatureStore) -> None:
    """Refuse a store whose arrays disagree with its schema (metadata only: cheap, before any read)."""
    problems = schema_problems(store)
    if problems:
        report = VerifyReport(str(store.path), store.digests.present, store.complete, problems=problems)
        raise refusal(report, repair_hint(store.attrs, store.format == "hdf5", str(store.path)))


def require_labels(store: FeatureStore, labels: dict[str, np.ndarray]) -> int:
    """Refuse labels outside ``[0, classes)``; return the number of classes (the recorded count,
    else the labels' maximum + 1, at most :data:`MAX_UNRECORDED_CLASSES`)."""
    classes = num_classes(store)
    hint = repair_hint(store.attrs, store.format == "hdf5", str(store.path))
    for split, y in labels.items():
        problems = label_problems(split, y, classes)
        if problems:
            raise refusal(VerifyReport(str(store.path), store.digests.present, store.complete, problems=problems), hint)
    top = max((int(y.max()) + 1 for y in labels.values() if len(y)), default=0)
    if classes is None and top > MAX_UNRECORDED_CLASSES:
        split = next(s for s, y in labels.items() if len(y) and int(y.max()) + 1 == top)
        raise StoreDamaged(
            f"store {str(store.path)!r}: split {split!r} has label {top - 1} and the store records no class count",
            "a label that large is damage, not a class; record the dataset's num_classes in the store, or repair it",
        )
    return classes if classes is not None else top
