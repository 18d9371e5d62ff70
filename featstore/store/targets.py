"""Dense targets beside the features: ``<split>/targets/depth`` float16 (N, H, W) metres (0 = no
depth), ``<split>/targets/mask`` uint8 (N, H, W) class per pixel (255 = ignore) and
``<split>/targets/valid`` bool (N,) (false where a target file was missing, unreadable or of another
size than its image; the reasons are in the ``targets`` attribute). H, W are the crop's: targets go
through exactly the image's resize and crop. The ``targets`` attribute records their provenance."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import FeatstoreError, UsageError
from .feature_store import FeatureStore

TARGET_KINDS = ("depth", "mask")
IGNORE = 255  # a mask pixel that counts for nothing
_DTYPES = {"depth": "float16", "mask": "uint8"}
_FILL = {"depth": 0.0, "mask": IGNORE}


def write_split_targets(store: FeatureStore, split: str, targets: dict[str, np.ndarray], valid: np.ndarray, chunk_rows: int = 64) -> None:
    """Write one split's target arrays (kind → (N, H, W)) and their row validity."""
    if not store.writable:
        raise FeatstoreError(f"store {str(store.path)!r} is open read-only", "open it with mode='r+'")
    from zarr.codecs import BloscCodec, BloscShuffle

    group = store.split_group(split).require_group("targets")
    n = store.num_rows(split)
    for kind, values in targets.items():
        if kind not in TARGET_KINDS or values.shape[0] != n or values.ndim != 3:
            raise FeatstoreError(f"targets {kind!r} of shape {values.shape} do not fit split {split!r} ({n} rows)")
        array = group.create_array(
            kind,
            shape=values.shape,
            dtype=_DTYPES[kind],
            chunks=(max(1, min(chunk_rows, n)), *values.shape[1:]),
            fill_value=_FILL[kind],
            compressors=[BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle, typesize=np.dtype(_DTYPES[kind]).itemsize)],
            dimension_names=("row", "target_y", "target_x"),
            overwrite=True,
        )
        array[:] = values.astype(_DTYPES[kind])
    group.create_array("valid", shape=(n,), dtype="bool", chunks=(max(1, n),), dimension_names=("row",), overwrite=True)[:] = valid


def target_info(store: FeatureStore) -> dict[str, Any]:
    """The ``targets`` attribute: kinds, layout, depth scale, class names, size, invalid rows, digest."""
    info = store.attrs.get("targets")
    return dict(info) if isinstance(info, dict) else {}


def read_targets(store: FeatureStore, split: str, kind: str, rows: Any = None) -> np.ndarray:
    """(N, H, W) depth (float32 metres) or mask (uint8) of ``split``; ``rows`` selects rows."""
    info = target_info(store)
    if kind not in info.get("kinds", []):
        have = ", ".join(info.get("kinds", [])) or "none"
        raise UsageError(f"store {str(store.path)!r} has no {kind} targets (it has: {have})",
                         "extract a dataset with dense targets (docs/dense.md): SPLIT/images with SPLIT/depth or SPLIT/masks, VOC or nyu-depth-v2")  # fmt: skip
    values: np.ndarray = stored_targets(store, split, kind)
    if rows is not None:
        values = values[rows]
    if kind == "depth":
        values = values.astype(np.float32)
    return values


def target_valid(store: FeatureStore, split: str) -> np.ndarray:
    """Rows whose every target was read and aligned (and whose image decoded)."""
    valid: np.ndarray = np.asarray(stored_targets(store, split, "valid"), bool)
    both: np.ndarray = np.logical_and(valid, store.valid(split))
    return both


def stored_targets(store: FeatureStore, split: str, name: str) -> np.ndarray:
    """Every row of ``<split>/targets/<name>`` as stored (its dtype): an unreadable chunk is a one-line refusal, and a store
    opened with ``verify=True`` checks each unit against the digest its extraction recorded."""
    array = store.split_group(split)["targets"][name]
    check = store.read_check
    if check is None:
        return np.asarray(array[:])
    values = np.asarray(check.read(split, f"targets/{name}", 0, int(array.shape[0]), lambda: array[:]))
    check.check(split, f"targets/{name}", values)
    return values
