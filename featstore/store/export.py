"""A store as one file: HDF5 with the store's schema, or ``.npz`` with one view.

HDF5 layout (readable with plain h5py, no featstore needed)::

    feats.h5  attrs: every store attribute as a JSON string (encoder, preprocessing, dataset, views, …)
    /<split>/labels            int32 (N,)
    /<split>/paths             utf-8 str (N,)
    /<split>/valid             bool (N,)
    /<split>/features/<view>   float16|float32 (N, D), chunks of whole rows
    /<split>/targets/<name>    dense targets where the store has them (depth float16, mask uint8,
                               valid bool; as stored), so dense probes run from the export too
    /<split>/augment/<view>, /<split>/augment_params
                               augmented views where the store has them (``featstore.store.augmented``)

``.npz``: ``<split>_features`` of the one view, ``<split>_labels``, ``_valid``, ``_paths``, and for a
split with augmented views ``<split>_augment`` (N, K, D) and ``<split>_augment_params`` (N, K, 5).

``FeatureStore.open("feats.h5")`` reads it like the Zarr store, so ``probe fit --store feats.h5``
gives the same results.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_file
from ..errors import FeatstoreError, UsageError
from ..timestamps import utc_stamp
from .feature_store import FeatureStore
from .patch import patch_dims
from .targets import stored_targets
from .verify import require_labels, require_readable

EXPORT_FORMATS = (".h5", ".hdf5", ".npz")


def export(
    source: str, to: str, view: str | None = None, overwrite: bool = False, log: Callable[[str], None] = lambda s: None
) -> dict[str, Any]:
    """Write the complete store ``source`` (a path or URL) to ``to`` (.h5/.hdf5, or .npz with one view)."""
    target = Path(to).expanduser()
    suffix = target.suffix.lower()
    if suffix not in EXPORT_FORMATS:
        raise UsageError(
            f"cannot export to {to!r}: unknown format {suffix or '(no suffix)'!r}",
            "use --to FILE.h5 (whole store) or --to FILE.npz (one view)",
        )
    if target.exists() and not overwrite:
        raise UsageError(f"{to!r} already exists", "pass --overwrite to replace it, or choose another --to")
    if not target.parent.is_dir():
        raise UsageError(f"folder {str(target.parent)!r} does not exist", "create it first, or choose another --to")
    store = FeatureStore.open(source, verify=True).require_complete()  # a damaged store is refused, not exported
    if suffix != ".npz" and view is not None:
        raise UsageError("--view applies to .npz exports", "an HDF5 export holds every view")
    # what probe fit checks before reading, checked before anything is written: the digests alone
    # pass a schema edited to say other row counts, and labels outside the recorded classes
    require_readable(store)
    require_labels(store, {split: store.labels(split) for split in store.splits})
    start = time.perf_counter()
    # write beside the target and rename: a killed export never leaves a half file under its name
    try:
        with atomic_file(target) as tmp:
            if suffix == ".npz":
                view = _one_view(store, view)
                nbytes = _write_npz(store, tmp, view)
            else:
                nbytes = _write_hdf5(store, tmp)
    except OSError as e:
        raise FeatstoreError(f"cannot write {to!r}: {e.strerror or e}", "check the folder is writable and has space") from e
    seconds = time.perf_counter() - start
    return {
        "store": str(store.path),
        "to": str(target),
        "format": suffix.lstrip("."),
        "view": view,
        "bytes": target.stat().st_size,
        "feature_bytes": nbytes,
        "seconds": seconds,
    }


def _one_view(store: FeatureStore, view: str | None) -> str:
    if view is None:
        return next(iter(store.views))  # the extractor's first view: cls for a ViT, pool for a CNN
    if view not in store.views:
        raise UsageError(f"view {view!r} not in store {str(store.path)!r}", f"it has: {', '.join(store.views)}")
    return view


def _provenance(store: FeatureStore) -> dict[str, Any]:
    return dict(store.attrs, exported_from=str(store.path), exported=utc_stamp())


def _write_hdf5(store: FeatureStore, path: Path) -> int:
    import h5py

    nbytes = 0
    with h5py.File(path, "w") as f, ThreadPoolExecutor(1) as reader:
        for key, value in _provenance(store).items():
            f.attrs[key] = json.dumps(value)
        for split in store.splits:
            g = f.create_group(split)
            n = store.num_rows(split)
            g.create_dataset("labels", data=store.labels(split).astype(np.int32))
            g.create_dataset(
                "paths", data=store.paths(split).astype(str).tolist() if n else [], dtype=h5py.string_dtype("utf-8"), shape=(n,)
            )
            g.create_dataset("valid", data=store.valid(split))
            for name in ("labels", "paths", "valid"):
                g[name].dims[0].label = "row"
            fg = g.create_group("features")
            for view in store.views:
                shape = store.row_shape(view)
                patch = view in store.patch_views
                source: Any = store.patches(split, view) if patch else store.features(split, view)
                rows = max(1, min(store.chunk_rows, n))
                # no compression: exports run at disk speed (float features gain little from it)
                ds = fg.create_dataset(view, shape=(n, *shape), dtype=source.dtype, chunks=(rows, *shape) if n else None)
                for axis, label in enumerate(patch_dims(view, shape, store.patch_views) if patch else ("row", f"{view}_dim")):
                    ds.dims[axis].label = label
                dim = int(np.prod(shape))
                files = _raw_chunk_files(store, split, view, rows)
                if files is not None:
                    for i, chunk in enumerate(files):  # the bytes are HDF5's chunk as they are: no decode, no copy
                        data = chunk.read_bytes()
                        if store.read_check is not None:  # checked against the unit's digest, as every other read
                            stored = np.frombuffer(data, dtype=source.dtype).reshape(rows, dim)[: n - i * rows]
                            store.read_check.check(split, f"features/{view}", stored, i * rows)
                        ds.id.write_direct_chunk((i * rows, 0), data)
                    nbytes += n * dim * source.dtype.itemsize
                    continue
                # the next chunk is read while this one is written (both release the GIL)
                starts = list(range(0, n, rows))
                pending = reader.submit(source.__getitem__, slice(0, rows)) if starts else None
                for i, start in enumerate(starts):
                    assert pending is not None  # submitted before the loop, and again for each next chunk
                    block = pending.result()
                    if i + 1 < len(starts):
                        pending = reader.submit(source.__getitem__, slice(starts[i + 1], starts[i + 1] + rows))
                    ds[start : start + len(block)] = block
                    nbytes += block.nbytes
            _write_targets(store, split, g)
            nbytes += _write_augmented(store, split, g)
    return nbytes


def _write_augmented(store: FeatureStore, split: str, group: Any) -> int:
    """The split's augmented views and their crop parameters (if any), read checked against their digests."""
    nbytes = 0
    for name in store.augmented_arrays(split):
        view = name.split("/", 1)[1] if "/" in name else None
        values = store.augmented(split, view).read()
        chunks = (max(1, min(store.chunk_rows, len(values))), *values.shape[1:]) if len(values) else None
        ds = group.create_dataset(name, data=values, chunks=chunks)
        for axis, label in enumerate(("row", "augment_view", f"{view}_dim" if view else "crop")):
            ds.dims[axis].label = label
        nbytes += values.nbytes
    return nbytes


def _write_targets(store: FeatureStore, split: str, group: Any) -> None:
    """``<split>/targets/*`` as stored, read checked against their digests (which the export keeps)."""
    source = store.split_group(split)
    if "targets" not in source:
        return
    tg = group.create_group("targets")
    for name in sorted(source["targets"]):
        values = stored_targets(store, split, name)
        chunks = (max(1, min(store.chunk_rows, len(values))), *values.shape[1:]) if len(values) else None
        ds = tg.create_dataset(name, data=values, chunks=chunks, compression="gzip" if values.ndim > 1 else None)
        for axis, label in enumerate(("row", "target_y", "target_x")[: values.ndim]):
            ds.dims[axis].label = label


def _raw_chunk_files(store: FeatureStore, split: str, view: str, rows: int) -> list[Path] | None:
    """The chunk files of a local feature array whose bytes are exactly an HDF5 chunk of ``rows``
    rows (little-endian C-order, no codec, the same chunk shape; featstore writes them so), else
    None and the export reads through zarr."""
    if store.format != "zarr" or not isinstance(store.path, Path) or np.dtype(store.meta.dtype or "f2").byteorder == ">":
        return None
    try:
        array = store.split_group(split)["features"][view]
        meta = array.metadata
        codecs = [type(c).__name__ for c in meta.codecs]
        endian = getattr(getattr(meta.codecs[0], "endian", None), "value", None)
        if (
            codecs != ["BytesCodec"]
            or endian not in ("little", None)
            or tuple(meta.chunk_grid.chunk_shape) != (rows, array.shape[1])
            or getattr(array, "order", "C") != "C"
        ):
            return None
        folder = store.path / split / "features" / view
        files = [folder / meta.chunk_key_encoding.encode_chunk_key((i, 0)) for i in range(-(-array.shape[0] // rows))]
    except (AttributeError, TypeError, KeyError, IndexError):
        return None  # another zarr version's metadata objects: the general path
    size = rows * array.shape[1] * np.dtype(array.dtype).itemsize
    return files if all(f.is_file() and f.stat().st_size == size for f in files) else None


def _write_npz(store: FeatureStore, path: Path, view: str) -> int:
    arrays = {"view": np.asarray(view), "provenance": np.asarray(json.dumps(_provenance(store)))}
    nbytes = 0
    for split in store.splits:
        arrays[f"{split}_features"] = feats = (store.patches if view in store.patch_views else store.features)(split, view).read()
        arrays[f"{split}_labels"] = store.labels(split).astype(np.int32)
        arrays[f"{split}_valid"] = store.valid(split)
        arrays[f"{split}_paths"] = store.paths(split).astype(str)  # unicode, not object: loads without pickle
        nbytes += feats.nbytes
        if store.augmented_arrays(split):
            arrays[f"{split}_augment"] = views = store.augmented(split, view).read()
            arrays[f"{split}_augment_params"] = store.augmented(split).read()
            nbytes += views.nbytes
    with open(path, "wb") as f:  # np.savez appends .npz to a name that lacks it; a file object keeps ours
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
    return nbytes
