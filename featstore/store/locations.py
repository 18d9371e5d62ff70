"""What a store location is, read without zarr or torch: a local folder (its ``zarr.json``), an
HDF5 export (by its name), or a URL read through fsspec."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ..errors import FeatstoreError, UsageError

PROGRESS = "_progress"  # a store's folder of an extraction in progress (lock, unit markers)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_hdf5_path(path: str) -> bool:
    """An exported HDF5 store, by its name (any case: FEATS.H5 too)."""
    return path.lower().endswith((".h5", ".hdf5"))


def is_url(path: str | os.PathLike[str]) -> bool:
    return bool(_URL.match(str(path)))


def store_attrs(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The attributes of the store at ``path`` (a local folder), or None when it is not a store."""
    try:
        attrs = json.loads((Path(path) / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return None
    return attrs if isinstance(attrs, dict) and "schema_version" in attrs else None


def tree_size(path: Path) -> int:
    """Bytes of every file under the folder ``path`` (symbolic links are not followed)."""
    total = 0
    stack: list[str | Path] = [path]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    total += e.stat(follow_symlinks=False).st_size
    return total


_SECRET_PARAMS = re.compile(
    r"[?&](access_key|secret|secret_key|aws_access_key_id|aws_secret_access_key|token|session_token|key|password)=", re.I
)


def refuse_credentials(url: str) -> None:
    """Credentials never ride in a URL: they would reach logs, results, provenance and the resume command."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@]*@", url) or _SECRET_PARAMS.search(url):
        raise UsageError(
            "the store URL holds credentials (user:password@ or a key in its query)",
            "remove them from the URL; use the standard AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
            "AWS_ENDPOINT_URL, AWS_PROFILE or ~/.aws) or gcloud's for gs://",
        )


# other processes write the stores featstore reads and writes at URLs (ranks, nodes, `ls` of a store
# being written): fsspec's cached listings would hide their objects (s3fs even answers "not found")
FRESH = {"use_listings_cache": False}


def fsspec_fs(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path in it; a missing backend is a one-line error."""
    import fsspec

    try:
        fs, inner = fsspec.core.url_to_fs(url, **FRESH)
        return fs, str(inner)
    except ImportError as e:
        raise FeatstoreError(f"cannot read {url!r}: {e}", "install the fsspec backend it names (s3fs, gcsfs, aiohttp)") from e
