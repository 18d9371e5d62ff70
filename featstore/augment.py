"""Augmented views (``featstore extract --augment rrc-flip --augment-views K``): which K random-resized
crops + horizontal flips each train image gets, drawn from (seed, the image's stored path, the view
index) alone.

The crop follows torchvision's ``RandomResizedCrop.get_params`` step for step (ten tries of an area
fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``, then the clamped center-crop
fallback), with DINO's linear-evaluation parameters (scale (0.08, 1), ratio (3/4, 4/3), flip 0.5).
Its random numbers come from a generator seeded by a SHA-256 of (seed, path, view), never from a
global RNG or the batch order: a resumed run, another batch size or another rank draws the same
crops for the same image. The crop box is in the coordinates of the decoded, upright (EXIF-turned)
image, so it depends on its size, which every loader knows once the image is decoded (DALI's from
the header before decoding: ``upright_size``).

A view's parameters are five ints ``(top, left, height, width, flip)``, stored per row and view
(``featstore.store.augmented``); ``-1`` everywhere marks a row without views (an undecodable image).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from .errors import UsageError

METHODS = ("rrc-flip",)
SCALE = (0.08, 1.0)  # DINO's eval_linear.py RandomResizedCrop(224) (torchvision's defaults)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
FLIP = 0.5
PARAMS = ("top", "left", "height", "width", "flip")
NO_VIEW = -1  # the parameters of a row without views
AUGMENTED_SPLIT = "train"  # only the training rows get views; val/test keep the single center crop
RNG = "sha256(seed, path, view) -> numpy PCG64"  # recorded: how the numbers are drawn


@dataclass(frozen=True)
class Augment:
    """K seeded random-resized-crop + flip views per train image (see the module docstring)."""

    method: str = "rrc-flip"
    views: int = 10
    seed: int = 0
    scale: tuple[float, float] = SCALE
    ratio: tuple[float, float] = RATIO
    flip: float = FLIP

    def __post_init__(self):
        if self.method not in METHODS:
            raise UsageError(f"unknown --augment {self.method!r}", f"use one of {', '.join(METHODS)}")
        if isinstance(self.views, bool) or int(self.views) != self.views or self.views < 1:
            raise UsageError(f"--augment-views must be a positive integer, got {self.views!r}", "e.g. --augment-views 10")
        object.__setattr__(self, "views", int(self.views))
        object.__setattr__(self, "seed", int(self.seed))

    def to_dict(self) -> dict:
        """What the store's provenance and its cache key record."""
        return {
            "method": self.method,
            "views": self.views,
            "seed": self.seed,
            "scale": list(self.scale),
            "ratio": [round(r, 12) for r in self.ratio],
            "flip": self.flip,
            "splits": [AUGMENTED_SPLIT],
            "params": list(PARAMS),
            "rng": RNG,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Augment:
        return cls(str(d["method"]), int(d["views"]), int(d["seed"]), tuple(d["scale"]), tuple(d["ratio"]), float(d["flip"]))

    def params(self, path: str, height: int, width: int) -> np.ndarray:
        """(views, 5) int32: each view's (top, left, height, width, flip) for the image stored as
        ``path`` whose upright size is ``height`` x ``width``."""
        return np.asarray([self.view_params(path, k, height, width) for k in range(self.views)], dtype=np.int32)

    def view_params(self, path: str, view: int, height: int, width: int) -> tuple[int, int, int, int, int]:
        rng = np.random.default_rng(_seed_of(self.seed, path, view))
        top, left, h, w = rrc_params(rng, height, width, self.scale, self.ratio)
        return top, left, h, w, int(rng.random() < self.flip)


def _seed_of(seed: int, path: str, view: int) -> int:
    digest = hashlib.sha256(f"featstore-augment\0{seed}\0{view}\0{path}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:16], "little")


def rrc_params(
    rng: np.random.Generator, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` (v0.2x) with ``rng`` for its draws: (top, left, height, width)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # fallback: the whole image, its aspect clamped into ``ratio``, centered
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = height
        w = round(h * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def no_views(views: int) -> np.ndarray:
    """The parameters recorded for a row without views (an undecodable image)."""
    return np.full((views, len(PARAMS)), NO_VIEW, dtype=np.int32)


@dataclass(frozen=True)
class ViewPlan:
    """What a loader needs to crop a split's views: the augmentation and each row's identity (its
    stored path, relative to the dataset root, so the crops do not depend on where the data lives)."""

    augment: Augment
    keys: tuple[str, ...]  # per row of the split

    @property
    def views(self) -> int:
        return self.augment.views

    def params(self, row: int, height: int, width: int) -> np.ndarray:
        return self.augment.params(self.keys[row], height, width)
