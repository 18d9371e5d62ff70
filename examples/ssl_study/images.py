"""The pretraining images: every image file under a folder, decoded once into a uint8 tensor.

Self-supervised pretraining never reads labels, so any folder works (an ImageFolder's class
folders are just walked). Each image is decoded at reduced size (PIL's JPEG draft mode scales in
the DCT, ~1 ms per ImageNet-size JPEG), its shorter side resized to ``side`` and center-cropped,
so an epoch costs no decoding and the whole set of Imagenette train fits in ~150 MB.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def image_files(root: str | Path, limit: int | None = None, seed: int = 0) -> list[Path]:
    """Sorted image files under ``root``; with ``limit``, a seeded random subset of that many."""
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"error: --data {str(root)!r} is not a folder (pass a folder of images, e.g. an ImageFolder's train/)")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise SystemExit(f"error: no image files under {str(root)!r} (extensions: {', '.join(sorted(IMAGE_SUFFIXES))})")
    if limit is not None and limit < len(files):
        files = sorted(random.Random(seed).sample(files, limit))
    return files


def decode(path: Path, side: int) -> np.ndarray:
    """(side, side, 3) uint8: shorter side resized to ``side`` (bilinear, antialiased), center crop."""
    with Image.open(path) as im:
        im.draft("RGB", (side, side))  # JPEG only: decode at >= side, not full size
        im = im.convert("RGB")
        w, h = im.size
        scale = side / min(w, h)
        im = im.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.BILINEAR)
        w, h = im.size
        left, top = (w - side) // 2, (h - side) // 2
        return np.asarray(im.crop((left, top, left + side, top + side)))


def load_images(files: list[Path], side: int) -> torch.Tensor:
    """(N, 3, side, side) uint8 tensor of every file."""
    out = np.empty((len(files), side, side, 3), dtype=np.uint8)
    for i, path in enumerate(files):
        out[i] = decode(path, side)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
