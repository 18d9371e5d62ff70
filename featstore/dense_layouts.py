"""Datasets with dense targets → a ``Manifest`` of their images and a :class:`TargetSpec` saying where
each image's depth map and/or segmentation mask lives.

Three layouts:

- a folder ``SPLIT/images/NAME.{jpg,png}`` with ``SPLIT/depth/NAME.{png,npy}`` (16-bit PNG in
  millimetres, ``--depth-scale`` metres per unit to change it; ``.npy`` float metres; 0 = no depth)
  and/or ``SPLIT/masks/NAME.png`` (class index per pixel, 255 = ignore), optional ``classes.txt``;
- Pascal VOC segmentation (``JPEGImages/``, ``SegmentationClass/``, ``ImageSets/Segmentation/*.txt``);
- NYU-Depth v2's ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3 = HDF5, read with h5py) and the standard
  795/654 split of its ``splits.mat``: ``--dataset nyu-depth-v2 --data-root DIR``. Its images live
  inside the .mat, so they are written once to the folder layout under the featstore home; with
  Gupta et al.'s ``classMapping40.mat`` in DIR, also the standard 40-class segmentation masks (or,
  ``--nyu-classes 13`` with ``class13Mapping.mat`` too, the 13-class ones).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_folder
from .datasets import SPLIT_NAMES, is_image_file
from .errors import UsageError
from .home import home
from .manifest import Manifest, SplitManifest

NYU = "nyu-depth-v2"
NYU_FILE = "nyu_depth_v2_labeled.mat"
NYU_SPLITS = "splits.mat"
NYU_CLASSES = "classMapping40.mat"  # Gupta et al. (CVPR 2013): the 894 raw label ids → the 40 classes everyone reports
NYU_CLASSES13 = "class13Mapping.mat"  # Couprie et al. (2013): those 40 → 13 (the multi-task NYUv2 benchmarks' classes)
NYU_CLASS_COUNTS = (40, 13)
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
MM = 0.001  # a 16-bit depth PNG counts millimetres unless --depth-scale says otherwise


@dataclass(frozen=True)
class TargetSpec:
    """Where an image's targets are and how to read them. ``layout``: "folder" or "voc"."""

    layout: str
    kinds: tuple[str, ...]  # ("depth",), ("mask",) or both
    depth_scale: float = MM  # metres per unit of a 16-bit depth PNG
    class_names: tuple[str, ...] = ()  # segmentation classes, when known

    def files(self, root: Path, image: str) -> dict[str, Path | None]:
        """kind → the target file of the image at ``root / image`` (None when absent)."""
        rel = Path(image)
        out: dict[str, Path | None] = {}
        if self.layout == "voc":
            out["mask"] = _existing(root / "SegmentationClass" / f"{rel.stem}.png")
            return out
        split_dir = root / rel.parts[0]
        for kind in self.kinds:
            folder, suffixes = ("depth", (".png", ".npy")) if kind == "depth" else ("masks", (".png",))
            out[kind] = next((p for s in suffixes if (p := split_dir / folder / f"{rel.stem}{s}").is_file()), None)
        return out

    def listings(self, root: Path) -> list[Path]:
        """The files besides the images and targets that decide the manifest or the classes (VOC's
        split lists, a folder's classes.txt), present or not."""
        if self.layout == "voc":
            return [root / "ImageSets" / "Segmentation" / f"{split}.txt" for split in SPLIT_NAMES]
        return [root / "classes.txt"]

    def to_dict(self) -> dict:
        return {"layout": self.layout, "kinds": list(self.kinds), "depth_scale": self.depth_scale, "class_names": list(self.class_names)}


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def is_dense_dataset(spec: str) -> bool:
    """``spec`` names a dense layout (NYU, a VOC folder, a folder of SPLIT/images with depth/ or masks/)."""
    if spec == NYU:
        return True
    path = Path(spec).expanduser()
    return path.is_dir() and (_voc_root(path) is not None or bool(_dense_splits(path)))


def resolve_dense(
    spec: str, data_root: str | os.PathLike[str] | None, depth_scale: float | None, nyu_classes: int = 40
) -> tuple[Manifest, TargetSpec]:
    """The manifest and target spec of a dense dataset (call :func:`is_dense_dataset` first)."""
    if depth_scale is not None and depth_scale <= 0:
        raise UsageError(f"--depth-scale must be positive, got {depth_scale}", "e.g. --depth-scale 0.001 for millimetre PNGs")
    scale = MM if depth_scale is None else float(depth_scale)
    if spec == NYU:
        return _dense_folder(nyu_folder(data_root, nyu_classes), NYU, scale)
    path = Path(spec).expanduser()
    voc = _voc_root(path)
    if voc is not None:
        return voc_manifest(voc), TargetSpec("voc", ("mask",), scale, VOC_CLASSES)
    return _dense_folder(path, path.resolve().name, scale)


def _dense_splits(root: Path) -> list[str]:
    return [s for s in SPLIT_NAMES if (root / s / "images").is_dir() and ((root / s / "depth").is_dir() or (root / s / "masks").is_dir())]


def _dense_folder(root: Path, name: str, scale: float) -> tuple[Manifest, TargetSpec]:
    splits = _dense_splits(root)
    kinds = tuple(k for k, folder in (("depth", "depth"), ("mask", "masks")) if any((root / s / folder).is_dir() for s in splits))
    out = {}
    for split in splits:
        paths = sorted(
            f"{split}/images/{p.name}" for p in (root / split / "images").iterdir() if is_image_file(p) and not p.name.startswith(".")
        )
        if paths:
            out[split] = SplitManifest(split, tuple(paths), np.zeros(len(paths), np.int32))
    if not out:
        raise UsageError(f"no images in {str(root)!r}'s SPLIT/images folders", "put the images in train/images/, val/images/, test/images/")
    names_file = root / "classes.txt"
    class_names = tuple(line.strip() for line in names_file.read_text().splitlines() if line.strip()) if names_file.is_file() else ()
    # the image-level label is meaningless here: one class, so a global probe has nothing to learn
    return Manifest(name, root.resolve(), ("image",), out), TargetSpec("folder", kinds, scale, class_names)


# ---------------------------------------------------------------- Pascal VOC


def _voc_root(path: Path) -> Path | None:
    for root in (path, path / "VOC2012", path / "VOCdevkit" / "VOC2012"):
        if (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir() and (root / "ImageSets" / "Segmentation").is_dir():
            return root
    return None


def voc_manifest(root: Path) -> Manifest:
    """VOC's segmentation splits (ImageSets/Segmentation/train.txt, val.txt, test.txt where present)."""
    out = {}
    for split in SPLIT_NAMES:
        listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if listing.is_file():
            names = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
            out[split] = SplitManifest(split, tuple(f"JPEGImages/{n}.jpg" for n in names), np.zeros(len(names), np.int32))
    if not out:
        raise UsageError(f"{str(root)!r} has no ImageSets/Segmentation/train.txt or val.txt", "use the Pascal VOC 2012 folder as released")
    return Manifest("voc", root.resolve(), ("image",), out)


# ---------------------------------------------------------------- NYU-Depth v2


def nyu_sources(data_root: str | os.PathLike[str], classes: int = 40) -> list[Path]:
    """The files NYU's folder layout is made from: the .mat, splits.mat and the class mappings that
    ``classes`` reads (whether present or not: one that appears later changes what is made)."""
    root = Path(data_root).expanduser().resolve()
    return [root / NYU_FILE, root / NYU_SPLITS, root / NYU_CLASSES] + ([root / NYU_CLASSES13] if classes == 13 else [])


def nyu_folder(data_root: str | os.PathLike[str] | None, classes: int = 40) -> Path:
    """The folder layout of NYU-Depth v2's labeled set (train 795 / test 654 by splits.mat), written
    from the .mat once and reused while the .mat, splits.mat (and the class mappings) are unchanged.
    Depth always; the 40-class masks when ``classMapping40.mat`` is in the folder too; ``classes=13``:
    the 13-class masks instead (``class13Mapping.mat`` maps the 40 to 13; both files are needed)."""
    if data_root is None:
        raise UsageError("dataset 'nyu-depth-v2' needs its location", f"pass --data-root DIR holding {NYU_FILE} and {NYU_SPLITS}")
    if classes not in NYU_CLASS_COUNTS:
        raise UsageError(f"--nyu-classes must be 40 or 13, got {classes}", "use 40 (Gupta et al.) or 13 (the multi-task benchmarks)")
    mat, splits, mapping, *mapping13 = nyu_sources(data_root, classes)
    for f in (mat, splits):
        if not f.is_file():
            raise UsageError(f"{str(f)!r} not found", f"--data-root must hold {NYU_FILE} and the standard split file {NYU_SPLITS}")
    for f in mapping13:
        for needed in (mapping, f):
            if not needed.is_file():
                raise UsageError(
                    f"--nyu-classes 13 needs {str(needed)!r}", f"put {NYU_CLASSES} and {NYU_CLASSES13} (NYU's meta-data) in --data-root"
                )
    sources = [f for f in (mat, splits, mapping, *mapping13) if f.is_file()]
    stamp = hashlib.sha256(json.dumps([classes] + [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in sources]).encode())
    target = home() / "datasets" / f"{NYU}-{stamp.hexdigest()[:16]}"
    if not (target / "done.json").is_file():
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        classmap = nyu_class_mapping(mapping, mapping13[0] if mapping13 else None) if mapping.is_file() else None
        with atomic_folder(target, "converting") as build:
            _convert_nyu(mat, splits, classmap, build)
            # the files are as new as the .mat they come from, however often they are converted again (the
            # folder removed, a home restored): a store made from an earlier conversion is not told its images changed
            made = mat.stat().st_mtime_ns
            for folder, _, names in os.walk(build):
                for name in names:
                    os.utime(os.path.join(folder, name), ns=(made, made))
    return target


def nyu_class_mapping(path: Path, to13: Path | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """From ``classMapping40.mat``: a lookup table raw label id → class index (0..39; the raw 0,
    "unlabeled", → 255, ignored) and the 40 class names; with ``to13`` (``class13Mapping.mat``), the
    40 classes taken on to the 13 (0..12) and their names."""
    import scipy.io

    fix = f"use the {NYU_CLASSES} of Gupta et al. (mapClass: 894 raw ids → 1..40; className: 40 names)"
    try:
        m = scipy.io.loadmat(str(path))
        raw_to_class = np.asarray(m["mapClass"]).reshape(-1).astype(np.int64)
        names = _cell_strings(m["className"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise UsageError(f"cannot read the class mapping {str(path)!r} ({type(e).__name__}: {e})", fix) from e
    if not names or not len(raw_to_class) or raw_to_class.min() < 1 or raw_to_class.max() > len(names) or len(names) > 255:
        raise UsageError(f"{str(path)!r} maps raw labels outside its {len(names)} classes", fix)
    lut = np.full(len(raw_to_class) + 1, 255, np.uint8)  # raw 0 = unlabeled: ignored by the probe and the metrics
    lut[1:] = raw_to_class - 1
    if to13 is None:
        return lut, names
    fix13 = f"use NYU's {NYU_CLASSES13} (classMapping13: labels13, 40 classes → 1..13; classNames: 13 names)"
    try:
        m13 = scipy.io.loadmat(str(to13))["classMapping13"].reshape(-1)[0]
        forty_to_13 = np.asarray(m13["labels13"]).reshape(-1).astype(np.int64)
        names13 = _cell_strings(m13["classNames"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise UsageError(f"cannot read the class mapping {str(to13)!r} ({type(e).__name__}: {e})", fix13) from e
    if len(forty_to_13) != len(names) or not names13 or forty_to_13.min() < 1 or forty_to_13.max() > len(names13):
        raise UsageError(f"{str(to13)!r} does not map the {len(names)} classes of {str(path)!r} to its {len(names13)}", fix13)
    labelled = lut != 255
    lut13 = np.full_like(lut, 255)
    lut13[labelled] = forty_to_13[lut[labelled]] - 1
    return lut13, names13


def _cell_strings(cells: Any) -> tuple[str, ...]:
    """A MATLAB cell array of strings as scipy.io.loadmat returns it (objects holding 1-element arrays)."""
    return tuple(str(np.asarray(n).reshape(-1)[0]) for n in np.asarray(cells).reshape(-1))


def _convert_nyu(mat: Path, splits: Path, classmap: tuple[np.ndarray, tuple[str, ...]] | None, out: Path) -> None:
    import h5py
    import scipy.io
    from PIL import Image

    try:
        index = scipy.io.loadmat(str(splits))
        train, test = (np.asarray(index[k]).reshape(-1).astype(np.int64) - 1 for k in ("trainNdxs", "testNdxs"))  # MATLAB: 1-based
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"cannot read the split of {str(splits)!r}: {e}", "use NYU's splits.mat (trainNdxs, testNdxs)") from e
    lut, names = classmap if classmap is not None else (None, ())
    try:
        f = h5py.File(mat, "r")
    except OSError as e:
        raise UsageError(f"{str(mat)!r} is not a MATLAB v7.3 (HDF5) file", "use nyu_depth_v2_labeled.mat as released") from e
    with f:
        if "images" not in f or "depths" not in f:
            raise UsageError(f"{str(mat)!r} lacks 'images' or 'depths'", "use nyu_depth_v2_labeled.mat as released")
        if lut is not None and "labels" not in f:
            raise UsageError(
                f"{str(mat)!r} lacks 'labels' for the 40-class masks",
                f"use nyu_depth_v2_labeled.mat as released, or move {NYU_CLASSES} away",
            )
        images, depths = f["images"], f["depths"]  # MATLAB's column order: (N, 3, W, H) and (N, W, H)
        n = images.shape[0]
        if len(np.intersect1d(train, test)) or max(train.max(), test.max()) >= n or min(train.min(), test.min()) < 0:
            raise UsageError(f"{str(splits)!r} does not split the {n} images of {str(mat)!r}", "use the splits.mat released with the file")
        for split, rows in (("train", train), ("test", test)):
            (out / split / "images").mkdir(parents=True)
            (out / split / "depth").mkdir()
            if lut is not None:
                (out / split / "masks").mkdir()
            for i in rows.tolist():
                name = f"{i + 1:04d}"  # the image's number in the .mat (1-based, as NYU's toolbox names it)
                Image.fromarray(np.ascontiguousarray(np.asarray(images[i]).transpose(2, 1, 0))).save(out / split / "images" / f"{name}.png")
                np.save(out / split / "depth" / f"{name}.npy", np.ascontiguousarray(np.asarray(depths[i], np.float32).T))
                if lut is not None:
                    raw = np.asarray(f["labels"][i]).T
                    if raw.min() < 0 or raw.max() >= len(lut):
                        raise UsageError(
                            f"image {name} of {str(mat)!r} has raw label {int(raw.max())}, beyond the {len(lut) - 1} ids {NYU_CLASSES} maps",
                            "use the mapping released for nyu_depth_v2_labeled.mat",
                        )
                    Image.fromarray(lut[raw.astype(np.int64)]).save(out / split / "masks" / f"{name}.png")
    if names:
        (out / "classes.txt").write_text("".join(f"{n}\n" for n in names))
    (out / "done.json").write_text(json.dumps({"source": str(mat), "train": len(train), "test": len(test), "classes": len(names)}))
