"""The embedded default dataset: scikit-learn's bundled digits (1,797 real 8×8 scans, 10 classes).

Written once as PNG files into the featstore home ($FEATSTORE_HOME/digits-v1) so that every loader reads it like any other image
folder. The split is stratified and seeded, so it is the same on every machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .atomic import atomic_folder
from .home import home
from .manifest import Manifest, SplitManifest

DIGITS_SPLIT_SEED = 0
DIGITS_FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}
_LAYOUT_VERSION = "1"
# every PNG's modification time: the files are the same bytes whenever they are written, so they keep
# the same time too, and a store made before the folder was written again is not told its images changed
FILE_MTIME_NS = 946_684_800 * 10**9  # 2000-01-01T00:00:00Z


def digits_split_indices() -> dict[str, np.ndarray]:
    """Indices into ``sklearn.datasets.load_digits()`` for each split (stratified, seeded)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    y = load_digits().target
    idx = np.arange(len(y))
    train, rest = train_test_split(idx, train_size=DIGITS_FRACTIONS["train"], stratify=y, random_state=DIGITS_SPLIT_SEED)
    val, test = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=DIGITS_SPLIT_SEED)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def digits_manifest() -> Manifest:
    root = home() / f"digits-v{_LAYOUT_VERSION}"
    if not (root / ".complete").exists():
        _write_digits(root)
    class_names = tuple(str(d) for d in range(10))
    splits = {}
    for split in DIGITS_FRACTIONS:
        paths, labels = [], []
        for label in range(10):
            for f in sorted((root / split / str(label)).iterdir()):
                paths.append(f"{split}/{label}/{f.name}")
                labels.append(label)
        splits[split] = SplitManifest(split, tuple(paths), np.asarray(labels, np.int32))
    return Manifest("digits", root.resolve(), class_names, splits)


def _write_digits(root: Path) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    # values are 0..16 ink counts; scale to 8-bit gray
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    root.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename, so a killed build never leaves a half-written dataset
    with atomic_folder(root, "building", _place) as tmp:
        for split, indices in digits_split_indices().items():
            for i in indices:
                folder = tmp / split / str(int(digits.target[i]))
                folder.mkdir(parents=True, exist_ok=True)
                png = folder / f"{i:04d}.png"
                Image.fromarray(pixels[i], mode="L").save(png)
                os.utime(png, ns=(FILE_MTIME_NS, FILE_MTIME_NS))
        (tmp / ".complete").write_text("ok\n")


def _place(tmp: Path, root: Path) -> None:
    try:
        os.replace(tmp, root)
    except OSError:
        if not (root / ".complete").exists():  # not a concurrent build that won the race
            raise
