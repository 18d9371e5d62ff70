"""The plan of an extraction with patch-token views: how large the store will be (printed, and refused
when the disk cannot hold it), how many rows a unit holds, and which blocks each patch view comes from."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .manifest import Manifest
from .request import ExtractConfig
from .store import FeatureStore, capped_chunk_rows, expected_bytes, human_bytes, refuse_if_no_space, row_shape


def dense_plan(
    config: ExtractConfig, out: Path | str, manifest: Manifest, views: dict[str, Any], log: Callable[[str], None]
) -> ExtractConfig:
    """``config`` with its unit rows capped for patch views, after checking the disk has room.

    The size is the uncompressed one (compression is not known before the tokens are): an upper bound."""
    patch = {v: d for v, d in views.items() if len(row_shape(d)) == 3}
    needed = expected_bytes(sum(len(s) for s in manifest.splits.values()), views, config.dtype)
    if patch:
        shapes = ", ".join(f"{v} {'×'.join(map(str, row_shape(d)))}" for v, d in patch.items())
        log(f"patch views {shapes}: the store needs up to {human_bytes(needed)}")
    if isinstance(out, Path):  # object storage has no free space to check
        refuse_if_no_space(out.parent, needed)
    rows = capped_chunk_rows(config.chunk_rows, views, config.dtype)
    return config if rows == config.chunk_rows else dataclasses.replace(config, chunk_rows=rows)


def record_patch_layers(store: FeatureStore, patch_layers: dict[str, list[int]]) -> None:
    """Write, beside each patch view's shape, the encoder blocks its tokens come from (DINOv2's lin.1 / lin.4)."""
    recorded = dict(store.attrs.get("patch_views") or {})
    if not recorded:
        return
    store.update_attrs({"patch_views": {v: {**info, "layers": patch_layers.get(v)} for v, info in recorded.items()}})
