"""Augmented views in the extraction pipeline: which split gets them, how many rows a batch holds,
what the encoder is given (each row's center crop and its K views in one forward pass) and how
its features are split back into the center crop and the views.

A batch of an augmented split holds ``batch_size // (K + 1)`` rows, so the encoder still sees at
most ``--batch-size`` images per forward pass (the fixed shapes of ``featstore.inference``).
"""

from __future__ import annotations

import numpy as np
import torch

from .augment import Augment, ViewPlan
from .loaders import Batch
from .manifest import Manifest
from .store import FeatureStore, RowShape, row_shape
from .store.augmented import PARAMS_ARRAY, augmented_splits, views_array


def view_plan(store: FeatureStore, split: str, manifest: Manifest) -> ViewPlan | None:
    """The views ``split``'s rows get (None: a split without them), keyed by the paths the store holds."""
    info = store.augment
    if info is None or split not in augmented_splits(store.attrs):
        return None
    return ViewPlan(Augment.from_dict(info), tuple(manifest.stored_paths(split)))


def batch_rows(batch_size: int, augment: ViewPlan | None) -> int:
    """Rows per batch: ``batch_size`` images per forward pass, a row being K + 1 images with views."""
    return batch_size if augment is None else max(1, batch_size // (augment.views + 1))


def encoder_input(batch: Batch) -> torch.Tensor:
    """The images of one forward pass: the center crops, then every row's views (row major)."""
    if batch.views is None:
        return batch.images
    views = batch.views.flatten(0, 1)
    return torch.cat([batch.images, views.to(batch.images.dtype)]).contiguous(memory_format=torch.channels_last)


def augmented_buffers(views: dict[str, RowShape], k: int, rows: int, dtype: np.dtype) -> dict[str, np.ndarray]:
    """One unit's augmented arrays, to be filled batch by batch."""
    out = {views_array(v): np.empty((rows, k, *row_shape(d)), dtype) for v, d in views.items()}
    out[PARAMS_ARRAY] = np.empty((rows, k, 5), np.int32)
    return out


def split_views(
    feats: dict[str, np.ndarray], rows: int, k: int, buffers: dict[str, np.ndarray] | None, batch: Batch, start: int, dtype: np.dtype
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The center crops' features of a batch, and which of its rows have a view whose stored
    features are NaN/Inf though the image decoded (float16 overflow: said as a center crop's is);
    its views' features (NaN for a failed row) and crop parameters go into the unit's ``buffers``."""
    broken = np.zeros(len(batch.rows), bool)
    if not k or buffers is None:
        return feats, broken
    local = batch.rows - start
    bad = np.fromiter((r in batch.errors for r in batch.rows.tolist()), bool, len(batch.rows))
    center = {}
    for v, values in feats.items():
        center[v] = values[:rows]
        with np.errstate(over="ignore"):
            views = values[rows:].reshape(rows, k, *values.shape[1:]).astype(dtype)
        views[bad] = np.nan
        buffers[views_array(v)][local] = views
        broken |= ~(np.isfinite(views.reshape(rows, -1)).all(axis=1) | bad)
    assert batch.view_params is not None, "a loader gave views without their parameters"
    buffers[PARAMS_ARRAY][local] = batch.view_params
    return center, broken
