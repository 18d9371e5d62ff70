"""Real photographs for the tests, from the three shipped in tests/data/photos (see its README for
their sources and licenses): a clone anywhere runs the tests that need real JPEGs.

Tests that want many distinct photos get crops of them at varied places and scales (some mirrored), resized to a
224-px shorter side (as the imagenette files the benchmarks use) and re-encoded by libjpeg (PIL)
at varied quality and chroma subsampling; the first three are the shipped files' own bytes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

PHOTO_DIR = Path(__file__).resolve().parent / "data" / "photos"
SHIPPED = sorted(PHOTO_DIR.glob("*.jpg"))


def photo_jpegs(n: int, seed: int = 0, originals: bool = False) -> list[bytes]:
    """``n`` distinct real-photo JPEG files (bytes), the same on every machine; with ``originals`` the
    first three are the shipped files (640 x 427 and 512 x 600, which the loaders downscale to a fractional
    long side, truncated as torchvision's Resize does: tests/test_resize_rule.py)."""
    out = [p.read_bytes() for p in SHIPPED][:n] if originals else []
    rng = np.random.default_rng(seed)
    sources = [Image.open(p).convert("RGB") for p in SHIPPED]
    while len(out) < n:
        img = sources[len(out) % len(sources)]
        w, h = img.size
        side = int(min(w, h) * rng.uniform(0.3, 1.0))  # down to a detail: distinct views, not near-copies
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = img.crop((x, y, x + side, y + side)).resize((224, 224), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=int(rng.integers(75, 96)))  # baseline, 4:2:0: as imagenette's
        out.append(buf.getvalue())
    return out


def write_photo_folder(root: Path, classes: int = 6, per_class: int = 4) -> Path:
    """An ImageFolder tree of real photos: ``root/n<k>/<i>.JPEG``."""
    data = photo_jpegs(classes * per_class)
    for k in range(classes):
        (root / f"n{k}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / f"n{k}" / f"{k * per_class + i:03d}.JPEG").write_bytes(data[k * per_class + i])
    return root
