"""The stores cached in the featstore home: list (``ls``), remove (``rm``, ``gc``) and look up by
model and dataset. It sits above :mod:`featstore.store` and :mod:`featstore.home`, never below.

Everything here reads a store's ``zarr.json`` as plain JSON: no zarr, no torch, so ``featstore ls``
over hundreds of stores and an up-to-date extraction start in about Python's start-up time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .atomic import remove_folder
from .errors import UsageError
from .home import file_sha256, index_dir, last_used, stores_dir
from .store.attributes import StoreAttributes, store_label
from .store.locations import PROGRESS, is_hdf5_path, is_url, store_attrs, tree_size
from .timestamps import stamp_seconds


def _cached(pattern: str = "*/*.zarr") -> list[tuple[Path | str, dict]]:
    """(location, attributes) of every cached store whose name matches ``pattern``, in name order:
    folders of the local cache, or prefixes of a cache at a URL (``FEATSTORE_HOME=s3://…``)."""
    root = stores_dir()
    if isinstance(root, Path):
        return [(p, attrs) for p in sorted(root.glob(pattern)) if (attrs := store_attrs(p)) is not None]
    from .store.remote import Remote

    top = Remote.of(root)
    top.fs.invalidate_cache(top.root)
    found: list[tuple[Path | str, dict]] = []
    try:
        below = sorted(top.fs.glob(f"{top.root}/{pattern}"))
    except FileNotFoundError:  # no bucket yet: an empty cache
        below = []
    for inner in below:
        url = f"{root}/{str(inner)[len(top.root) + 1 :]}"
        if (attrs := Remote.of(url).attrs()) is not None:
            found.append((url, attrs))
    return found


def find_by_key(key: str) -> list[Path | str]:
    """Cached stores whose cache key is ``key``, wherever their name puts them (found by content)."""
    return [p for p, _ in stores_with_key(key)]


def stores_with_key(key: str) -> list[tuple[Path | str, dict]]:
    """(path, attributes) of each cached store whose cache key is ``key``."""
    return [(p, attrs) for p, attrs in _cached(f"*/*-{key[:12]}.zarr") if StoreAttributes.from_dict(attrs).cache_key == key]


# ---------------------------------------------------------------- listing


@dataclass
class StoreEntry:
    """One line of ``featstore ls``."""

    path: str
    label: str
    model: str
    arch: str
    weights: str  # file name + short sha, or "random-init"
    weights_sha256: str
    dataset: str
    dataset_spec: str
    dataset_root: str
    manifest_sha256: str
    views: dict
    dtype: str
    loader: str
    compute: str
    rows: int
    invalid: int
    size_bytes: int
    created: str
    last_used: float
    complete: bool
    units_done: int
    units_total: int
    writing: bool  # a live process holds the store's lock
    cache_key: str
    augment: str = ""  # "rrc-flip x10 (seed 0)": the train images' augmented views (#25); "" none

    @property
    def state(self) -> str:
        if self.complete:
            return "complete"
        pct = 100.0 * self.units_done / self.units_total if self.units_total else 0.0
        return f"{'writing' if self.writing else 'partial'} {self.units_done}/{self.units_total} units ({pct:.0f}%)"

    def to_dict(self) -> dict:
        return dict(asdict(self), state=self.state)


def lock_holder(path: Path) -> dict | None:
    """The live process writing the store at ``path``, or None."""
    from .store.lock import StoreLock, is_stale

    holder = StoreLock(path / PROGRESS / "lock.json").holder()
    return None if not holder or is_stale(holder) else holder


def entry_from_attrs(path: str, attrs: dict, size_bytes: int, units_done: int | None, writing: bool, used: float) -> StoreEntry:
    meta = StoreAttributes.from_dict(attrs)
    enc, data = meta.encoder, meta.dataset
    chunk = meta.chunk_rows or 1
    units_total = sum(-(-n // chunk) for n in meta.splits.values())
    sha = enc.weights_sha256 or ""
    weights = f"{enc.weights_file} ({sha[:8]})" if enc.weights_file else sha or "-"
    return StoreEntry(
        path=path,
        label=store_label(meta, path),
        model=enc.name or "?",
        arch=enc.arch or "?",
        weights=weights,
        weights_sha256=sha,
        dataset=data.name or "?",
        dataset_spec=data.spec or data.name or "?",
        dataset_root=data.root or "",
        manifest_sha256=data.manifest_sha256 or "",
        views=dict(meta.views),
        dtype=meta.dtype or "?",
        loader=meta.loader or "?",
        compute=str(meta.cache_fields.get("compute", "?")),
        rows=meta.rows,
        invalid=meta.invalid_count,
        size_bytes=size_bytes,
        created=meta.created or "",
        last_used=used,
        complete=meta.complete,
        units_done=units_total if meta.complete else (units_done or 0),
        units_total=units_total,
        writing=writing,
        cache_key=meta.cache_key or "",
        augment=_augment_text(attrs.get("augment")),
    )


def _describe_remote(url: str, attrs: dict | None = None) -> StoreEntry | None:
    """The entry of a Zarr store at an object-storage URL (its progress and lease read there), None
    when none is there; ``attrs``: its attributes when the caller has just read them."""
    from .store.lease import LEASE, is_live
    from .store.remote import Remote

    remote = Remote.of(url)
    attrs = attrs if attrs is not None else remote.attrs()
    if attrs is None:
        return None
    meta = StoreAttributes.from_dict(attrs)
    done, writing = 0, False
    if not meta.complete:
        names = remote.names(PROGRESS)
        done = sum(1 for n in names if n.rsplit("/", 1)[-1].startswith("unit-"))
        holder = remote.read_json(LEASE)
        writing = isinstance(holder, dict) and is_live(holder, time.time())
    used = last_used_of(attrs)
    return entry_from_attrs(url, attrs, remote.size(), done, writing, used)


def last_used_of(attrs: dict) -> float:
    """A store at a URL was last used when it was completed (or created): object storage keeps no use times."""
    for field in ("completed", "created"):
        if (seconds := stamp_seconds(attrs.get(field))) is not None:
            return float(seconds)
    return 0.0


def _augment_text(record) -> str:
    """How ``ls`` and ``lookup`` name a store's augmented views: two stores that differ only by them are told apart."""
    if not isinstance(record, dict):
        return ""
    return f"{record.get('method')} x{record.get('views')} (seed {record.get('seed')})"


def describe(path: str | os.PathLike) -> StoreEntry:
    """The ``ls`` entry of one store: a local .zarr folder, an exported .h5 file or a URL."""
    from .store.remote import WRITABLE_SCHEMES, scheme

    if is_url(path) and not is_hdf5_path(str(path)) and scheme(str(path)) in WRITABLE_SCHEMES:
        from .store import FeatureStore

        entry = _describe_remote(os.fspath(path))
        if entry is not None:
            return entry
        FeatureStore.open(path)  # raises the right error (not found / not a store)
    if is_url(path) or is_hdf5_path(str(path)):
        from .store import FeatureStore

        fs = FeatureStore.open(path)
        return entry_from_attrs(fs.location, fs.attrs, fs.size_on_disk(), None, False, 0.0)
    p = Path(path)
    entry = _describe_local(p)
    if entry is not None:
        return entry
    if p.suffix.lower() == ".npz" and p.is_file():
        _require_export(p)
        import numpy as np

        with np.load(p) as z:
            attrs, view = json.loads(str(z["provenance"])), str(z["view"])
        attrs["views"] = {view: attrs.get("views", {}).get(view)}  # the one view it holds
        return entry_from_attrs(str(p), attrs, p.stat().st_size, None, False, 0.0)
    from .store import FeatureStore

    FeatureStore.open(p)  # raises the right error (not found / not a store)
    raise UsageError(f"{str(p)!r} is not a featstore store", "pass a folder written by `featstore extract`")


def _describe_local(p: Path) -> StoreEntry | None:
    """The entry of a local Zarr store (its zarr.json read once), None when ``p`` is not one."""
    attrs = store_attrs(p)
    if attrs is None:
        return None
    done, invalid = 0, None
    if not StoreAttributes.from_dict(attrs).complete:  # its finished units' markers say what is done and invalid so far
        markers = list((p / PROGRESS).glob("*/unit-*.json"))
        done, invalid = len(markers), sum(_invalid_in(m) for m in markers)
    entry = entry_from_attrs(str(p), attrs, tree_size(p), done, lock_holder(p) is not None, last_used(p, attrs))
    return entry if invalid is None else dataclasses.replace(entry, invalid=invalid)


def _invalid_in(marker: Path) -> int:
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return 0
    return len(record.get("invalid") or {}) if isinstance(record, dict) else 0


def list_stores(paths: list[str] | None = None) -> list[StoreEntry]:
    """Every store of the cache, or of ``paths`` (stores, or folders searched for stores)."""
    if not paths:
        root = stores_dir()
        if isinstance(root, Path):  # each zarr.json read once
            return [e for p in sorted(root.glob("*/*.zarr")) if (e := _describe_local(p)) is not None]
        return [e for p, attrs in _cached() if (e := _describe_remote(str(p), attrs)) is not None]
    found: list[StoreEntry] = []
    for raw in paths:
        p = Path(raw)
        if is_url(raw) or store_attrs(p) is not None or p.is_file():
            found.append(describe(raw))
        elif p.is_dir():
            below = _stores_below(p)
            if not below:
                raise UsageError(f"no featstore stores in {raw!r}", "pass store folders, or folders holding them")
            found.extend(describe(s) for s in below)
        else:
            raise UsageError(f"store {raw!r} not found", "see `featstore ls` for the cached stores")
    return found


def _stores_below(folder: Path) -> list[Path]:
    out, stack = [], [folder]
    while stack:
        d = stack.pop()
        try:
            children = sorted((c for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")), reverse=True)
        except OSError:
            continue
        for c in children:
            (out.append(c) if store_attrs(c) is not None else stack.append(c))
    return sorted(out)


# ---------------------------------------------------------------- removal


def refuse_link(path: str | os.PathLike) -> None:
    """A symbolic link is not a store to delete: deleting what it points to is not the link's deletion."""
    if not is_url(path) and os.path.islink(path):
        raise UsageError(
            f"{os.fspath(path)!r} is a symbolic link (to {os.path.realpath(path)!r})",
            "pass the store's own path; featstore deletes no store through a link",
        )


def remove_store(path: str | os.PathLike) -> int:
    """Delete one store (refused while a live process writes it). Returns the bytes freed."""
    if is_url(path):
        return _remove_remote(os.fspath(path))
    refuse_link(path)
    p = Path(os.path.abspath(path))  # "." and ".." have no name to rename by
    if p.is_file() and p.suffix.lower() in (".h5", ".hdf5", ".npz"):
        _require_export(p)
        size = p.stat().st_size
        p.unlink()
        return size
    if store_attrs(p) is None:
        if not p.exists():
            raise UsageError(f"store {str(p)!r} not found", "see `featstore ls` for the cached stores")
        raise UsageError(f"{str(p)!r} is not a featstore store", "featstore only removes stores it wrote")
    from .store.lock import StoreLock

    lock = StoreLock(p / PROGRESS / "lock.json")
    lock.acquire()  # raises while a live writer holds it; holding it keeps a new writer out while we delete
    size, key = tree_size(p), StoreAttributes.from_dict(store_attrs(p)).cache_key
    remove_folder(p)  # renamed first: readers never see a half-deleted store, and a crash leaves only a hidden folder
    if key:
        (index_dir() / "used" / key).unlink(missing_ok=True)
    return size


def _remove_remote(url: str) -> int:
    """Delete one Zarr store at an s3:// or gs:// URL (refused while a live writer holds its lease)."""
    from .store.lease import store_lock
    from .store.remote import Remote, refuse_unwritable

    refuse_unwritable(url)
    remote = Remote.of(url)
    if remote.attrs() is None:
        if not remote.names(""):
            raise UsageError(f"store {url!r} not found", "see `featstore ls` for the cached stores")
        raise UsageError(f"{url!r} is not a featstore store", "featstore only removes stores it wrote")
    with store_lock(url):  # raises while a live writer holds it; holding it keeps a new writer out
        size = remote.size()
        remote.remove_store()  # zarr.json first: from then on no reader sees a store
    return size


def _require_export(path: Path) -> None:
    """Refuse to delete a file that is not a featstore export."""
    if path.suffix.lower() == ".npz":
        import numpy as np

        try:
            with np.load(path) as z:
                ours = "provenance" in z.files and "view" in z.files
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise UsageError(f"{str(path)!r} is not a featstore export", "featstore only removes stores it wrote")
    else:
        from .store import FeatureStore

        FeatureStore.open(path)  # raises for a foreign or unreadable file


@dataclass
class GcPlan:
    remove: list[StoreEntry]
    keep: list[StoreEntry]

    @property
    def freed(self) -> int:
        return sum(e.size_bytes for e in self.remove)


def plan_gc(older_than_days: float | None = None, max_size: int | None = None, partial: bool = False, now: float | None = None) -> GcPlan:
    """Which cached stores ``gc`` removes: partial ones (with ``partial``, never one being written),
    those unused for ``older_than_days``, then least recently used first until the rest fit ``max_size``."""
    if older_than_days is None and max_size is None and not partial:
        raise UsageError("gc needs a rule", "pass --older-than DAYS, --max-size SIZE and/or --partial")
    now = time.time() if now is None else now
    listed = list_stores()  # one scan: it walks every file of every store
    entries = sorted((e for e in listed if not e.writing), key=lambda e: e.last_used)
    remove = [
        e for e in entries if (partial and not e.complete) or (older_than_days is not None and now - e.last_used > older_than_days * 86400)
    ]
    keep = [e for e in entries if e not in remove]
    if max_size is not None:
        total = sum(e.size_bytes for e in keep) + sum(e.size_bytes for e in listed if e.writing)
        while keep and total > max_size:
            oldest = keep.pop(0)
            remove.append(oldest)
            total -= oldest.size_bytes
    return GcPlan(remove, keep)


def parse_size(text: str) -> int:
    """``50G``, ``500M``, ``1.5T``, ``1024`` (bytes) → bytes (binary units, like ``du -h``)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"cannot read the size {text!r}", "use e.g. 50G, 500M or 2T")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


# ---------------------------------------------------------------- lookup by model and dataset


def lookup(model: str, dataset: str, weights: str | None = None) -> str:
    """The one complete cached store of ``model`` on ``dataset`` (and ``weights`` when given),
    matched on what the stores record; no model is built. Errors list what exists."""
    cached = _cached()
    entries = _entries_from_attrs(cached)
    sha = None
    if weights is not None:
        if not Path(weights).expanduser().is_file():
            raise UsageError(f"weights file {weights!r} not found", "pass --weights with the checkpoint the store was extracted with")
        sha = file_sha256(Path(weights).expanduser())
    root = str(Path(dataset).expanduser().resolve()) if Path(dataset).expanduser().exists() else None

    def same_data(e: StoreEntry) -> bool:
        return dataset in (e.dataset_spec, e.dataset) or (root is not None and root == e.dataset_root)

    matches = [
        e for e in entries if model in (e.model, e.arch, f"timm:{model}") and same_data(e) and (sha is None or e.weights_sha256 == sha)
    ]
    complete = [e for e in matches if e.complete]
    command = f"featstore extract --model {model} --dataset {dataset}" + (f" --weights {weights}" if weights else "")
    if len(complete) == 1:
        return complete[0].path
    if len(complete) > 1:
        attrs = {str(p): a for p, a in cached}  # read once above, for the match
        differ = _differing_fields([dict(attrs[e.path].get("cache_fields") or {}) for e in complete])
        listed = "; ".join(
            f"{e.path} [created {e.created}, {e.weights}, views {','.join(e.views)}, {e.dtype}, {e.loader}, {e.compute}"
            + (f", augment {e.augment}" if e.augment else "")
            + "".join(f", {name} {value}" for name, value in differ[i].items())
            + "]"
            for i, e in enumerate(complete)
        )
        what = f", differing in {', '.join(differ[0])}" if differ and differ[0] else ""
        raise UsageError(
            f"{len(complete)} cached stores match --model {model} --dataset {dataset}{what}: {listed}",
            "pass --weights FILE or --store PATH to pick one; `featstore rm` a store of data that has since changed",
        )
    if matches:
        where = matches[0].path  # its progress: the one store worth a full look
        first = (_describe_remote(where) if is_url(where) else _describe_local(Path(where))) or matches[0]
        raise UsageError(
            f"the cached store of --model {model} --dataset {dataset} is not complete ({first.state}: {first.path})",
            f"finish it with `{command}`",
        )
    have = sorted({f"{e.model} on {e.dataset_spec}" + ("" if e.complete else " (partial)") for e in entries})
    exists = f"the cache holds: {', '.join(have)}" if have else f"the cache ({stores_dir()}) is empty"
    raise UsageError(
        f"no cached store of --model {model} --dataset {dataset}" + (f" with weights {weights}" if weights else "") + f"; {exists}",
        f"extract it first: `{command}`",
    )


def _differing_fields(fields: list[dict]) -> list[dict[str, str]]:
    """Per store, the cache-key fields (dotted names) whose values are not the same in every one of
    them, shortened for a one-line message (digests to 12 characters)."""

    def flat(d: dict, prefix: str = "") -> dict[str, object]:
        out: dict[str, object] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    flats = [flat(f) for f in fields]
    names = sorted({k for f in flats for k in f if len({json.dumps(g.get(k), sort_keys=True, default=str) for g in flats}) > 1})

    def short(v: object) -> str:
        text = v if isinstance(v, str) else json.dumps(v, default=str)
        return text[:12] + "…" if len(text) > 16 and all(c in "0123456789abcdef" for c in text) else text[:40]

    return [{k: short(f.get(k)) for k in names} for f in flats]


def _entries_from_attrs(cached: list[tuple[Path | str, dict]]) -> list[StoreEntry]:
    """Every cached store's entry from its ``zarr.json`` alone (``_cached()``), in ``list_stores`` order:
    what lookup matches on. No tree walk, lock or last-use read, so size, progress, ``writing`` and
    ``last_used`` are left empty (lookup reads them for an incomplete match only)."""
    return [entry_from_attrs(str(p), attrs, 0, None, False, 0.0) for p, attrs in cached]
