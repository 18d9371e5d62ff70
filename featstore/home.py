"""Where featstore keeps things: ``$FEATSTORE_HOME`` and its index.

``$FEATSTORE_HOME`` (default ``~/.cache/featstore``; ``FEATSTORE_CACHE`` is the older name) holds
the digits dataset, downloaded weights (``FEATSTORE_WEIGHTS`` overrides), the cached stores
``stores/<dataset>/<model>-<first 12 hex of the cache key>.zarr`` and ``index/`` (memos that let an
up-to-date ``extract`` answer without importing torch, weights digests, and last-use times for ``gc``).

This module knows paths and small memo files only: no zarr, no torch, and nothing of the store
schema (``featstore.store`` sits above it, ``featstore.cache`` above both).
"""

from __future__ import annotations

import calendar
import contextlib
import hashlib
import os
import re
import time
from pathlib import Path
from typing import Any

from .atomic import write_atomic

# ---------------------------------------------------------------- the home


def home() -> Path:
    base = os.environ.get("FEATSTORE_HOME") or os.environ.get("FEATSTORE_CACHE")
    if not base:
        return (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "featstore").expanduser()
    return Path(base).expanduser()


def weights_dir() -> Path:
    return Path(os.environ.get("FEATSTORE_WEIGHTS") or home() / "weights").expanduser()


def stores_dir() -> Path:
    return home() / "stores"


def index_dir() -> Path:
    return home() / "index"


def _slug(text: str) -> str:
    """A file-name-safe spelling of a model or dataset name (``tv:resnet50`` → ``tv_resnet50``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


def default_store_path(dataset: str, model: str, key: str) -> Path:
    return stores_dir() / _slug(dataset) / f"{_slug(Path(model).name if model.endswith('.py') else model)}-{key[:12]}.zarr"


# ---------------------------------------------------------------- last use (for gc)


def mark_used(path: str | os.PathLike[str], key: str | None) -> None:
    """Record that a cached store was read now (atime is unreliable: relatime, noatime mounts)."""
    if not key:
        return
    try:
        Path(path).resolve().relative_to(stores_dir().resolve())
    except ValueError:
        return  # only stores of the cache are collected
    marker = index_dir() / "used" / key
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:
        pass  # a read-only home: gc falls back to the store's completion time


def last_used(path: Path, attrs: dict[str, Any]) -> float:
    marker = index_dir() / "used" / str(attrs.get("cache_key"))
    if marker.is_file():
        return marker.stat().st_mtime
    times = []
    for field in ("completed", "created"):
        if attrs.get(field):
            with contextlib.suppress(ValueError):  # a garbled time: the other one, or the folder's mtime
                times.append(calendar.timegm(time.strptime(attrs[field], "%Y-%m-%dT%H:%M:%SZ")))  # UTC
    return max(times) if times else path.stat().st_mtime


# ---------------------------------------------------------------- memos: weights digests (request.py memoizes requests)


def file_sha256(path: str | os.PathLike[str], block: int = 1 << 20) -> str:
    """sha256 of a file, memoized per (path, size, mtime, inode): a 4 GB checkpoint is hashed once."""
    p = Path(path).resolve()
    st = p.stat()
    stamp = f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"
    memo = index_dir() / "sha256" / hashlib.sha256(stamp.encode()).hexdigest()
    try:
        value = memo.read_text().strip()
        if len(value) == 64:
            return value
    except OSError:
        pass
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    value = h.hexdigest()
    write_memo(memo, value)
    return value


def write_memo(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text)
    except OSError:
        pass  # a read-only home only costs speed
