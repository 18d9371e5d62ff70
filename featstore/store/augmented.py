"""The augmented views of a store (``featstore extract --augment``): their arrays, and the lazy reader.

Layout, in the augmented split only (``train``; val/test have no such arrays at all)::

    <split>/augment/<view>    float16|float32 (N, K, D)  the K views' features; NaN where the row is invalid
    <split>/augment_params    int32 (N, K, 5)            (top, left, height, width, flip) of each view's
                                                         crop in the upright decoded image; -1 = no view

``features/<view>`` keeps the center crop as in every store. The store's ``augment`` attribute
records the method, K, seed and parameters (:class:`featstore.augment.Augment`'s ``to_dict``);
the arrays are written with each unit, so their digests, verification, repair and resume are
those of every other array a unit writes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .rows import LazyRows

ATTRIBUTE = "augment"
PARAMS_ARRAY = "augment_params"
PARAMS_FILL = -1
GROUP = "augment"


def views_array(view: str) -> str:
    """The array (relative to its split) of a view's augmented features."""
    return f"{GROUP}/{view}"


def recorded(attrs: dict[str, Any]) -> dict[str, Any] | None:
    """The store's ``augment`` attribute (None: a store without augmented views)."""
    value = attrs.get(ATTRIBUTE)
    return dict(value) if isinstance(value, dict) else None


def augmented_splits(attrs: dict[str, Any]) -> list[str]:
    info = recorded(attrs)
    return [str(s) for s in info.get("splits", [])] if info else []


def required_arrays(attrs: dict[str, Any], views: dict[str, int]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Array → (per-row shape, dtype kind) an augmented split must hold (empty for other stores)."""
    info = recorded(attrs)
    if not info:
        return {}
    k = int(info["views"])
    arrays: dict[str, tuple[tuple[int, ...], str]] = {views_array(v): ((k, int(d)), "f") for v, d in views.items()}
    arrays[PARAMS_ARRAY] = ((k, 5), "i")
    return arrays


def create_arrays(split_group: Any, rows: int, chunk_rows: int, views: dict[str, int], k: int, dtype: str) -> None:
    """Presize the augmented arrays of one split (written unit by unit, like the features)."""
    group = split_group.create_group(GROUP)
    for view, dim in views.items():
        group.create_array(
            view,
            shape=(rows, k, dim),
            dtype=dtype,
            chunks=(chunk_rows, k, dim),
            fill_value=np.nan,
            compressors=None,  # as the features: float features gain little from a codec
            dimension_names=("row", "augment_view", f"{view}_dim"),
        )
    split_group.create_array(
        PARAMS_ARRAY,
        shape=(rows, k, 5),
        dtype="int32",
        chunks=(chunk_rows, k, 5),
        fill_value=PARAMS_FILL,
        dimension_names=("row", "augment_view", "crop"),
    )


class AugmentedArray(LazyRows):
    """The (N, K, D) augmented features of one view, or the (N, K, 5) crop parameters, read on demand."""

    default_chunk_rows = 1024
