"""Dense targets of an extraction: read each image's depth map / mask, put it through exactly the
image's resize and center crop (nearest neighbour: no invented depths or classes), and store it beside
the features with its provenance (:mod:`featstore.store.targets`). The targets enter the cache key."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .datasets import resolve_dataset
from .dense_layouts import NYU, TargetSpec, is_dense_dataset, resolve_dense
from .errors import UsageError
from .manifest import Manifest
from .preprocess import Preprocess
from .store import IGNORE, FeatureStore, write_split_targets


def resolve_with_targets(
    spec: str, data_root: str | os.PathLike[str] | None, depth_scale: float | None, labels: str = "dense", nyu_classes: int = 40
) -> tuple[Manifest, TargetSpec | None]:
    """The manifest of ``--dataset``, and where its dense targets are (None for a classification dataset)."""
    if nyu_classes != 40 and spec != NYU:
        raise UsageError(f"--nyu-classes applies to --dataset {NYU}, not {spec!r}", "leave --nyu-classes out")
    try:
        if is_dense_dataset(spec):
            return resolve_dense(spec, data_root, depth_scale, nyu_classes)
        return resolve_dataset(spec, data_root, labels), None
    except PermissionError as e:  # a class or split folder the user cannot read (pathlib raises where os.walk skipped)
        raise UsageError(
            f"cannot read {_first_unreadable(str(e.filename))!r} in the dataset (permission denied)",
            "make it readable (chmod +rX) or move it out of the dataset",
        ) from None


def _first_unreadable(path: str) -> str:
    """The outermost folder on ``path`` that cannot be listed: the one to name (the error names the
    file that was looked for inside it, such as a class folder's zarr.json)."""
    parts = Path(path).parts
    for i in range(1, len(parts)):
        folder = str(Path(*parts[:i]))
        if os.path.isdir(folder) and not os.access(folder, os.R_OK | os.X_OK):
            return folder
    return path


def target_fields(manifest: Manifest, spec: TargetSpec) -> dict:
    """What the cache key learns of the targets: how they are read, and a digest of every target file's
    bytes (and of the EXIF orientation of every image that has one: it decides how its targets are
    turned, see :func:`upright_target`)."""
    h = hashlib.sha256()
    for split in sorted(manifest.splits):
        for image in manifest.splits[split].paths:
            for kind, path in sorted(spec.files(manifest.root, image).items()):
                h.update(f"{image}\t{kind}\t".encode())
                h.update(hashlib.sha256(path.read_bytes()).digest() if path is not None else b"-")
            orientation = _orientation(manifest.root / image)
            if orientation != 1:  # images without one leave the digest as it always was
                h.update(f"{image}\torientation\t{orientation}".encode())
    return {**spec.to_dict(), "files_sha256": h.hexdigest()}


def load_target(path: Path, kind: str, depth_scale: float) -> np.ndarray:
    """(H, W) float32 metres (depth) or uint8 classes (mask). Raises ValueError with the reason."""
    from PIL import Image

    if kind == "depth" and path.suffix == ".npy":
        values = np.load(path, allow_pickle=False)
        if values.ndim != 2:
            raise ValueError(f"depth {path.name} has shape {values.shape}, not (H, W)")
        return np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    with Image.open(path) as im:
        if kind == "depth":
            if im.mode not in ("I;16", "I;16B", "I;16L", "I"):
                raise ValueError(f"depth {path.name} is a {im.mode} PNG, not 16-bit")
            return np.asarray(im, dtype=np.float32) * np.float32(depth_scale)
        if im.mode not in ("L", "P"):
            raise ValueError(f"mask {path.name} is a {im.mode} PNG, not one class index per pixel (L or P)")
        return np.asarray(im, dtype=np.uint8)


def align(target: np.ndarray, pre: Preprocess) -> np.ndarray:
    """``target`` resized and cropped exactly as the image is (torchvision's size rule), nearest neighbour."""
    import torch
    from torchvision.transforms import InterpolationMode, v2

    t = torch.from_numpy(np.array(target, copy=True))[None]  # a writable copy: torch refuses read-only arrays
    t = v2.Resize(pre.resize, interpolation=InterpolationMode.NEAREST_EXACT)(t)
    return v2.CenterCrop(pre.image_size)(t)[0].numpy()


def image_layout(path: Path) -> tuple[tuple[int, int], int]:
    """(H, W) of an image as its file stores the pixels, and its EXIF orientation (1: as stored), from
    its header: the tag every loader turns the image by (``orientation.upright``)."""
    from PIL import Image

    with Image.open(path) as im:
        orientation = im.getexif().get(0x0112, 1)
        return (im.size[1], im.size[0]), orientation if orientation in range(1, 9) else 1


def _orientation(path: Path) -> int:
    try:
        return image_layout(path)[1]
    except (OSError, ValueError):
        return 1  # the image is invalid anyway: its row says why


def upright_target(target: np.ndarray, stored: tuple[int, int], orientation: int, what: str) -> tuple[np.ndarray, bool]:
    """``target`` in the image's upright layout, the one the encoder saw; and whether it was turned.

    A target is read as drawn on the image as it is shown (upright by its EXIF orientation: what
    viewers and annotation tools show, and what every loader feeds the encoder). One with the shape of
    the pixels as the file stores them instead, where that differs (a photo turned a quarter by its
    tag), was drawn on those: it is turned with the image. ValueError when it has neither shape."""
    import torch

    from .orientation import orient

    shown = (stored[1], stored[0]) if orientation in (5, 6, 7, 8) else stored
    if target.shape == shown:
        return target, False
    if target.shape == stored:
        return orient(
            torch.from_numpy(np.array(target, copy=True)), orientation
        ).numpy(), True  # a writable copy: torch refuses read-only arrays
    where = f" upright ({stored[1]}×{stored[0]} as stored)" if shown != stored else ""
    raise ValueError(f"{what} is {target.shape[1]}×{target.shape[0]}, the image {shown[1]}×{shown[0]}{where}")


def write_dense_targets(
    store: FeatureStore, manifest: Manifest, spec: TargetSpec, pre: Preprocess, fields: dict, log: Callable[[str], None]
) -> None:
    """Every split's aligned targets into ``store``, then the ``targets`` attribute (written last:
    a store without it has its targets written again on resume)."""
    size = pre.image_size
    invalid: dict[str, list[dict]] = {}
    labels_seen = 0
    oriented = turned = 0  # images with an EXIF orientation; those whose targets were turned with them
    for split, sm in manifest.splits.items():
        n = len(sm)
        arrays = {
            kind: np.full((n, size, size), IGNORE, np.uint8) if kind == "mask" else np.zeros((n, size, size), np.float32)
            for kind in spec.kinds
        }
        valid = np.ones(n, bool)
        for row, image in enumerate(sm.paths):
            try:
                files = spec.files(manifest.root, image)
                missing = [k for k in spec.kinds if files.get(k) is None]
                if missing:
                    raise ValueError(f"no {' or '.join(missing)} file for {Path(image).name}")
                stored, orientation = image_layout(manifest.root / image)
                oriented += orientation != 1
                row_turned = False
                for kind in spec.kinds:
                    path = files[kind]
                    assert path is not None  # checked above
                    target, was_turned = upright_target(
                        load_target(path, kind, spec.depth_scale), stored, orientation, f"{kind} {path.name}"
                    )
                    row_turned |= was_turned
                    arrays[kind][row] = align(target, pre)
                turned += row_turned
            except (OSError, ValueError) as e:
                valid[row] = False
                for kind in spec.kinds:
                    arrays[kind][row] = IGNORE if kind == "mask" else 0
                invalid.setdefault(split, []).append({"row": row, "path": image, "reason": str(e)})
        if "mask" in arrays and valid.any():
            labels = arrays["mask"][valid]
            labels_seen = max(labels_seen, int(labels[labels != IGNORE].astype(np.int64).max(initial=-1)) + 1)
        write_split_targets(store, split, arrays, valid)
    if oriented:
        log(
            f"{oriented:,} images carry an EXIF orientation and were turned upright: their targets are read as drawn on the upright image"
            + (f"; the targets of {turned:,} had the shape of the pixels as stored and were turned with the image" if turned else "")
        )
    bad = sum(len(v) for v in invalid.values())
    if bad:
        log(f"{bad} rows have no usable target (first: {next(iter(invalid.values()))[0]['reason']}); they are left out of dense probes")
    store.update_attrs(
        {
            "targets": {
                **fields,
                "size": [size, size],
                "num_classes": max(len(spec.class_names), labels_seen) if "mask" in spec.kinds else None,
                "invalid": invalid,
                "resize": "nearest-exact, then the image's center crop",
            }
        }
    )
