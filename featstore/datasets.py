"""Dataset specs → a frozen ``Manifest``: per split, image paths (relative to a root) and labels.

Accepted specs: ``digits`` (embedded, built from scikit-learn's bundled digits), ``imagenet``
(ILSVRC2012 folder layout), a directory in ImageFolder layout (with or without split folders), or a
CSV file list with ``path,label[,split]`` columns, or WebDataset tar shards (``wds:...``, see ``wds_dataset``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .csv_list import label_map, read_file_list
from .dataset_walk import STORE, Skipped, walk_images
from .errors import UsageError
from .manifest import Manifest, SplitManifest
from .wds_dataset import is_wds, wds_manifest

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm", ".pnm"})
SPLIT_NAMES = ("train", "val", "test")
BUILTIN_DATASETS = ("digits", "imagenet")


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def resolve_dataset(spec: str, data_root: str | os.PathLike | None = None, labels: str = "dense", wds_label: str = "cls") -> Manifest:
    """Turn what the user typed after ``--dataset`` into a Manifest (``labels``: a CSV's integer labels, dense or sparse;
    ``wds_label``: where WebDataset shards keep the label)."""
    if is_wds(spec):
        return wds_manifest(spec, wds_label, labels)
    if spec == "digits":
        from .digits import digits_manifest

        return digits_manifest()
    if spec == "imagenet":
        return imagenet_manifest(data_root)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".csv":
        return csv_manifest(path, labels)
    if not path.exists():
        raise UsageError(
            f"dataset {spec!r} not found",
            f"pass an existing folder, a .csv file list, or one of: {', '.join(BUILTIN_DATASETS)}",
        )
    if not path.is_dir():
        raise UsageError(f"dataset {spec!r} is neither a folder nor a .csv file list", "pass a folder in ImageFolder layout")
    return folder_manifest(path)


def imagenet_manifest(data_root: str | os.PathLike | None) -> Manifest:
    if data_root is None:
        env = os.environ.get("FEATSTORE_DATA")
        if not env:
            raise UsageError(
                "dataset 'imagenet' needs its location",
                "pass --data-root /path/to/imagenet (holding train/ and val/) or set FEATSTORE_DATA",
            )
        data_root = Path(env) / "imagenet"
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise UsageError(f"ImageNet root {str(root)!r} not found", "pass --data-root pointing at the folder holding train/ and val/")
    present = [s for s in ("train", "val") if (root / s).is_dir()]
    if not present:
        raise UsageError(
            f"{str(root)!r} has no train/ or val/ folder",
            "ImageNet must be in the ILSVRC2012 layout train/<wnid>/*.JPEG, val/<wnid>/*.JPEG",
        )
    val = root / "val"
    if val.is_dir() and not any(p.is_dir() for p in val.iterdir()) and any(is_image_file(p) for p in val.iterdir()):
        raise UsageError(
            f"{str(val)!r} holds images directly, not class folders",
            "sort the validation images into val/<wnid>/ folders (e.g. with ILSVRC2012's valprep.sh)",
        )
    return _manifest_from_split_folders("imagenet", root, present)


def folder_manifest(root: Path) -> Manifest:
    splits = [s for s in SPLIT_NAMES if (root / s).is_dir()]
    if splits:
        return _manifest_from_split_folders(root.name, root, splits)
    skipped = Skipped()
    classes = _class_folders(root, skipped)
    if not classes:
        loose = [p for p in root.iterdir() if is_image_file(p)]
        hint = (
            "put images into one sub-folder per class (ImageFolder layout)"
            if loose
            else "pass a folder holding one sub-folder of images per class"
        )
        raise UsageError(f"no class folders in {str(root)!r}", hint)
    paths, labels = _scan_classes(root, classes, skipped)
    _require_images(root, paths)
    split = SplitManifest("all", tuple(paths), np.asarray(labels, np.int32))
    return Manifest(root.name, root.resolve(), tuple(classes), {"all": split}, skipped=skipped.lines() + _empty_classes(classes, [labels]))


def _manifest_from_split_folders(name: str, root: Path, splits: list[str]) -> Manifest:
    skipped = Skipped()
    class_names = sorted({c for s in splits for c in _class_folders(root / s, skipped, s)})
    if not class_names:
        raise UsageError(f"no class folders in the split folders of {str(root)!r}", "use the layout <split>/<class>/<image>")
    out = {}
    for split in splits:
        paths, labels = _scan_classes(root / split, class_names, skipped, relative_to=root)
        if paths:
            out[split] = SplitManifest(split, tuple(paths), np.asarray(labels, np.int32))
    _require_images(root, [p for s in out.values() for p in s.paths])
    empty = _empty_classes(class_names, [s.labels for s in out.values()])
    return Manifest(name, root.resolve(), tuple(class_names), out, skipped=skipped.lines() + empty)


def _empty_classes(class_names: list[str], labels: list) -> list[str]:
    """The log line naming class folders without a single image: each stays a class (its index is
    kept, so the other classes keep theirs) with no rows, which is rarely what was meant."""
    used = set(np.concatenate([np.asarray(y, np.int64) for y in labels]).tolist()) if labels else set()
    empty = [c for i, c in enumerate(class_names) if i not in used]
    if not empty:
        return []
    named = ", ".join(repr(c) for c in empty[:3]) + (", …" if len(empty) > 3 else "")
    return [f"warning: {len(empty)} class folders hold no image ({named}): each is a class with no rows; remove the folder to drop it"]


def _class_folders(folder: Path, skipped: Skipped, prefix: str = "") -> list[str]:
    """The class folders under ``folder``: hidden ones are not, nor is a Zarr store (a featstore
    --out written into the dataset would otherwise be a class with no rows, and change the labels)."""
    classes = []
    for p in sorted(folder.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        if (p / "zarr.json").is_file():
            skipped.add(STORE, f"{prefix}/{p.name}" if prefix else p.name)
            continue
        classes.append(p.name)
    return classes


def _scan_classes(folder: Path, class_names: list[str], skipped: Skipped, relative_to: Path | None = None) -> tuple[list[str], list[int]]:
    """Every image of every class folder under ``folder`` (see ``dataset_walk`` for what is left out and why)."""
    paths, labels = [], []
    for label, cls in enumerate(class_names):
        class_dir = folder / cls
        if not class_dir.is_dir():
            continue
        found = walk_images(class_dir, relative_to or folder, is_image_file, skipped)
        paths += found
        labels += [label] * len(found)
    return paths, labels


def _require_images(root: Path, paths: list[str]) -> None:
    if not paths:
        raise UsageError(
            f"no images found under {str(root)!r}",
            f"images need one of the extensions {', '.join(sorted(IMAGE_EXTENSIONS))}",
        )


def csv_manifest(csv_path: Path, labels: str = "dense") -> Manifest:
    """The manifest of a CSV file list (``csv_list`` reads it strictly); ``labels``: dense or sparse integers."""
    if not csv_path.is_file():
        raise UsageError(f"file list {str(csv_path)!r} not found", "pass an existing CSV with columns path,label[,split]")
    rows = read_file_list(csv_path)
    root = csv_path.parent.resolve()
    relative: list[str] = []
    first_line: dict[str, int] = {}  # an image listed twice (the same file however spelled) would be two rows, or leak across splits
    for line, path in zip(rows.lines, rows.paths):
        p = Path(path).expanduser()
        full = p if p.is_absolute() else root / p
        if not full.is_file():
            what = "is not a regular file (a FIFO, socket, device or folder)" if full.exists() else "not found"
            raise UsageError(f"{str(csv_path)!r} line {line}: image {path!r} {what}", "paths are relative to the CSV's folder, or absolute")
        rel = os.path.relpath(full, root).replace(os.sep, "/")
        if (seen := first_line.setdefault(os.path.normpath(rel), line)) != line:
            raise UsageError(
                f"{str(csv_path)!r} line {line}: image {path!r} is listed twice (line {seen} too)", "list each image once, in one split"
            )
        relative.append(rel)
    mapping = label_map(rows, csv_path, labels)
    by_split: dict[str, tuple[list[str], list[int]]] = {}
    for rel, label, split in zip(relative, rows.labels, rows.splits):
        paths, ys = by_split.setdefault(split, ([], []))
        paths.append(rel)
        ys.append(mapping.index[label])
    splits = {s: SplitManifest(s, tuple(p), np.asarray(y, np.int32)) for s, (p, y) in by_split.items()}
    return Manifest(csv_path.stem, root, mapping.class_names, splits, label_mapping="sparse" if mapping.mode == "sparse" else "")
