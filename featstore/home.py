"""Where featstore keeps things: ``$FEATSTORE_HOME`` and its index.

``$FEATSTORE_HOME`` (default ``~/.cache/featstore``; ``FEATSTORE_CACHE`` is the older name) holds
the digits dataset, downloaded weights (``FEATSTORE_WEIGHTS`` overrides), the cached stores
``stores/<dataset>/<model>-<first 12 hex of the cache key>.zarr`` and ``index/`` (memos that let an
up-to-date ``extract`` answer without importing torch, weights digests, and last-use times for ``gc``).

This module knows paths and small memo files only: no zarr, no torch, and nothing of the store
schema (``featstore.store`` sits above it, ``featstore.cache`` above both).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from .atomic import write_atomic
from .timestamps import stamp_seconds

# ---------------------------------------------------------------- the home


def _configured() -> str | None:
    return os.environ.get("FEATSTORE_HOME") or os.environ.get("FEATSTORE_CACHE")


def home_url() -> str | None:
    """``$FEATSTORE_HOME`` when it is an object-storage URL (``s3://bucket/prefix``): the cached
    stores live there, everything else (weights, memos, file checks, digits) in the local home."""
    base = _configured()
    return base.rstrip("/") if base and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", base) else None


def home() -> Path:
    """The local home (with ``$FEATSTORE_HOME`` at a URL: the default one, ``~/.cache/featstore``)."""
    base = _configured()
    if not base or home_url():
        return (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "featstore").expanduser()
    return Path(base).expanduser()


def weights_dir() -> Path:
    return Path(os.environ.get("FEATSTORE_WEIGHTS") or home() / "weights").expanduser()


def stores_dir() -> Path | str:
    """Where the cached stores live: a local folder, or ``$FEATSTORE_HOME/stores`` at a URL."""
    url = home_url()
    return f"{url}/stores" if url else home() / "stores"


def index_dir() -> Path:
    return home() / "index"


def _slug(text: str) -> str:
    """A file-name-safe spelling of a model or dataset name (``tv:resnet50`` → ``tv_resnet50``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


def default_store_path(dataset: str, model: str, key: str) -> Path | str:
    name = f"{_slug(Path(model).name if model.endswith('.py') else model)}-{key[:12]}.zarr"
    root = stores_dir()
    return f"{root}/{_slug(dataset)}/{name}" if isinstance(root, str) else root / _slug(dataset) / name


# ---------------------------------------------------------------- last use (for gc)


def mark_used(path: str | os.PathLike[str], key: str | None) -> None:
    """Record that a cached store was read now (atime is unreliable: relatime, noatime mounts)."""
    root = stores_dir()
    if not key or isinstance(root, str):
        return  # a cache at a URL: gc goes by the stores' completion times
    try:
        Path(path).resolve().relative_to(root.resolve())
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
    # a garbled time: the other one, or the folder's mtime
    times = [t for t in (stamp_seconds(attrs.get(field)) for field in ("completed", "created")) if t is not None]
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
