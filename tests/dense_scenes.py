"""Synthetic scenes with exact depth, rendered for the dense-probe tests: a floor plane under
perspective, a back wall and a box, at a random scale, in fog: intensity falls with depth,
I = A·e^(−βd) + F·(1 − e^(−βd)), seen through a per-image gamma γ (log-uniform in [1/8, 8]): the green and blue channels hold
I^γ, the red channel the reference 0.5^γ. Masks: 0 floor, 1 wall, 2 box.

:data:`FOG_ENCODER` is a ``file.py:build`` encoder that exposes the right signal: per 8×8 patch, the
fog-inverted depth of its pixels (γ read from the red channel), as (B, C, h, w) maps; ``build_random``
is the same architecture untrained: a random 1×1 projection of each patch's pixels, which cannot
undo γ (a ratio of logarithms of two channels). A random-init ViT is no such contrast: its random
nonlinear features of the patch's pixels are a basis rich enough for a linear head to undo γ and the
fog at true scale (δ1 ≈ 0.97 measured with γ in [1/2, 2]), which is why the test uses this pair.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

A, F, BETA = 1.0, 0.12, 0.3


def render(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image uint8 RGB, depth float32 metres, mask uint8)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    horizon = rng.uniform(0.25, 0.4) * size
    k = rng.uniform(1.2, 2.0) * size  # focal length × camera height
    wall = rng.uniform(6.0, 9.0)
    with np.errstate(divide="ignore"):
        floor = np.where(y > horizon, k / np.maximum(y - horizon, 1e-6), np.inf)
    depth = np.minimum(floor, wall)
    mask = np.where(floor < wall, 0, 1).astype(np.uint8)
    d_box = rng.uniform(1.8, 4.5)
    bottom = horizon + k / d_box
    height, width = rng.uniform(0.2, 0.45) * size, rng.uniform(0.2, 0.4) * size
    left = rng.uniform(0, size - width)
    box = (x >= left) & (x < left + width) & (y >= bottom - height) & (y < bottom)
    depth = np.where(box, d_box, depth)
    mask[box] = 2
    depth = depth * rng.uniform(0.35, 1.0)  # the scene's scale: where a pixel is says little about how far it is
    if rng.random() < 0.5:  # and the camera may be upside down
        depth, mask = depth[::-1], mask[::-1]
    fog = np.exp(-BETA * depth)
    intensity = (A * fog + F * (1 - fog)) * (1 + rng.normal(0, 0.01, depth.shape))  # a little texture
    gamma = np.exp(rng.uniform(np.log(0.125), np.log(8.0)))
    channels = [np.full_like(intensity, 0.5**gamma), intensity**gamma, intensity**gamma]
    img = np.clip(np.round(np.stack(channels, axis=2) * 255), 1, 255).astype(np.uint8)
    return img, depth.astype(np.float32), mask


def write_scenes(root: Path, counts: dict[str, int], seed: int = 0, size: int = 64) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for sub in ("images", "depth", "masks"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, depth, mask = render(rng, size)
            Image.fromarray(img).save(root / split / "images" / f"{i:04d}.png")
            np.save(root / split / "depth" / f"{i:04d}.npy", depth)
            Image.fromarray(mask, mode="L").save(root / split / "masks" / f"{i:04d}.png")
    return root


FOG_ENCODER = f'''
import torch
from torch import nn

A, F, BETA = {A}, {F}, {BETA}


class FogDepth(nn.Module):
    def __init__(self, trained=True):
        super().__init__()
        self.trained = trained
        self.proj = nn.Conv2d(3 * 64, 3 * 64, 1)  # the untrained path: a random projection of the patch's pixels

    """Per 8×8 patch: the fog-inverted log depth and depth of each pixel and its intensity; the
    image must arrive unnormalised (--mean 0,0,0 --std 1,1,1)."""

    def forward(self, x):
        if not self.trained:
            return {{"patch": self.proj(nn.functional.pixel_unshuffle(x, 8))}}
        x = x.clamp(1 / 255, 1.0)
        gamma = torch.log(x[:, :1]) / torch.log(torch.tensor(0.5))  # the red channel is 0.5 ** gamma
        gray = x[:, 1:2] ** (1 / gamma)
        fog = ((gray - F) / (A - F)).clamp(1e-4, 1.0)
        depth = (-torch.log(fog) / BETA).clamp(0.05, 20.0)
        log_depth = torch.log(depth)
        pixels = nn.functional.pixel_unshuffle(torch.cat([log_depth, depth, gray], 1), 8)  # (B, 3·64, h, w)
        return {{"patch": pixels}}


def build():
    return FogDepth()


def build_random():
    return FogDepth(trained=False)
'''


def write_encoder(folder: Path, random_init: bool = False) -> str:
    path = folder / "fog_encoder.py"
    path.write_text(FOG_ENCODER)
    return f"{path}:{'build_random' if random_init else 'build'}"
