"""Reading an HDF5 export (written by :mod:`featstore.store.export`) as a store's root group."""

from __future__ import annotations

import json
from typing import Any

from ..errors import FeatstoreError, UsageError
from .attributes import StoreAttributes


def open_hdf5(source: Any, name: str | None = None) -> tuple[Any, dict[str, Any]]:
    """(root group, attributes) of an HDF5 export (a path or an open binary file). Raises a
    FeatstoreError for a file that is not HDF5, is damaged, or is not a featstore export."""
    import h5py

    name = name or str(source)
    try:
        f = h5py.File(source, "r")
    except OSError as e:
        raise FeatstoreError(
            f"{name!r} is not a readable HDF5 file ({' '.join(str(e).split())[:200]})",
            "re-export it with `featstore export STORE --to FILE.h5`",
        ) from e
    try:
        attrs = {k: json.loads(v) for k, v in f.attrs.items()}
    except (TypeError, ValueError, OSError):
        attrs = {}
    if "schema_version" not in attrs:
        f.close()
        raise UsageError(f"{name!r} is not a featstore export", "write one with `featstore export STORE --to FILE.h5`")
    meta = StoreAttributes.from_dict(attrs)
    for split in meta.splits:
        if split not in f or any(v not in f[split].get("features", {}) for v in meta.views):
            f.close()
            raise FeatstoreError(f"{name!r} lacks split {split!r} or one of its views", "the file is damaged; re-export it")
    return f, attrs
