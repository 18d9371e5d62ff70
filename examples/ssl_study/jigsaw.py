"""Jigsaw puzzles (Noroozi & Favaro 2016, "Unsupervised Learning of Visual Representations by
Solving Jigsaw Puzzles", arXiv:1603.09246), at small scale.

The image is cut into a 3x3 grid; from each cell a slightly smaller tile is cropped at a random
offset (the gap keeps edges from giving the answer away), its colour channels scaled at random
(0.8-1.2 each) and the tile normalized on its own to zero mean and unit variance over all its
pixels and channels (so brightness and contrast do not give the answer, while the tile's colours
relative to each other stay: the reference PyTorch port, bbrattoli/JigsawPuzzlePytorch's
JigsawImageLoader, does both). The tiles are shuffled by one permutation of a fixed set, and the network
- the backbone run on every tile separately (shared weights), the nine tile features
concatenated, a fully connected layer and a classifier - says which permutation it was. The
permutation set is chosen by the paper's Algorithm 1 (greedy: each next permutation maximizes
the summed Hamming distance to those already chosen) so the classes are far apart. The tile
encoder is kept; ``fc`` and ``classifier`` are thrown away.

Layout of the checkpoint: the tile encoder's parameters at the root (as the paper's Caffe net
and its PyTorch port, bbrattoli/JigsawPuzzlePytorch, hold the convolutions beside ``fc6``/``fc7``/
``classifier``), with the heads ``fc.*`` and ``classifier.*``, the way a torchvision ResNet
holds its ``fc``; the permutation set is saved beside the state dict.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from augment import each
from encoder import SmallResNet

GRID = 3


def hamming_permutations(count: int, seed: int = 0) -> np.ndarray:
    """``count`` permutations of 9 tiles chosen by Algorithm 1 of the paper ("maximal" set)."""
    every = np.array(list(itertools.permutations(range(GRID * GRID))), dtype=np.int8)  # 9! x 9
    remaining = np.ones(len(every), dtype=bool)
    summed = np.zeros(len(every), dtype=np.int64)
    j = int(np.random.default_rng(seed).integers(len(every)))
    chosen = []
    for _ in range(count):
        chosen.append(j)
        remaining[j] = False
        summed += (every != every[j]).sum(axis=1)
        j = int(np.argmax(np.where(remaining, summed, -1)))
    return every[chosen].astype(np.int64)


def mean_hamming_distance(perms: np.ndarray) -> float:
    """Average Hamming distance over pairs of the set (two random permutations of 9 differ in 8 on average)."""
    d = (perms[:, None, :] != perms[None, :, :]).sum(-1)
    n = len(perms)
    return float(d.sum() / (n * (n - 1)))


def cut_tiles(images: torch.Tensor, tile: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, C, S, S) -> (B, 9, C, tile, tile): one tile per grid cell at a random offset inside it."""
    b, _, s, _ = images.shape
    cell = s // GRID
    if tile > cell:
        raise ValueError(f"tile {tile} does not fit a grid cell of {cell} px")
    ar = torch.arange(tile)
    tiles = []
    for gy in range(GRID):
        for gx in range(GRID):
            oy = torch.randint(0, cell - tile + 1, (b,), generator=generator)
            ox = torch.randint(0, cell - tile + 1, (b,), generator=generator)
            rows = gy * cell + oy[:, None] + ar  # (B, tile)
            cols = gx * cell + ox[:, None] + ar
            patch = images[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, t, t, C)
            tiles.append(patch.permute(0, 3, 1, 2))
    return torch.stack(tiles, dim=1)


def normalize_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """Each tile to zero mean and unit variance over its pixels and channels together, as the
    reference port does (one mean and std per tile): brightness and contrast are gone, the
    relative colours stay."""
    x = tiles.float()
    mean = x.mean(dim=(-3, -2, -1), keepdim=True)
    std = x.std(dim=(-3, -2, -1), keepdim=True).clamp_min(1.0)  # in uint8 levels: a flat tile stays flat
    return (x - mean) / std  # unit variance, about the scale of ImageNet-normalized pixels at extraction


def jitter_channels(tiles: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 9, C, t, t) float: every channel of every tile times a factor drawn from U(0.8, 1.2),
    the reference port's rgb_jittering (against chromatic-aberration shortcuts)."""
    factor = torch.rand(tiles.shape[:3] + (1, 1), generator=generator) * 0.4 + 0.8
    return tiles * factor.to(tiles.device)


class Jigsaw(SmallResNet):
    def __init__(self, size: int, num_permutations: int = 10, hidden: int = 512, seed: int = 0):
        super().__init__()
        self.cell = size // GRID
        self.tile = self.cell - max(1, self.cell // 7)  # 21-px cells -> 18-px tiles at 64 px
        self.register_buffer("permutations", torch.from_numpy(hamming_permutations(num_permutations, seed)), persistent=False)
        self.fc = nn.Sequential(nn.Linear(GRID * GRID * self.out_dim, hidden), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(hidden, num_permutations)
        # crop and flip the whole image first
        self.augment = v2.Compose([v2.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip()])

    def puzzle_logits(self, tiles: torch.Tensor) -> torch.Tensor:
        b = tiles.shape[0]
        x = tiles.flatten(0, 1).contiguous(memory_format=torch.channels_last)
        feats = self(x).view(b, GRID * GRID * self.out_dim)  # every tile through the same encoder
        return self.classifier(self.fc(feats))

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        device = self.classifier.weight.device
        tiles = normalize_tiles(jitter_channels(cut_tiles(each(self.augment, images), self.tile).float())).to(device)
        labels = torch.randint(0, len(self.permutations), (len(images),)).to(device)
        order = self.permutations[labels]  # (B, 9): position k shows tile order[k]
        shuffled = tiles[torch.arange(len(images), device=device)[:, None], order]
        return F.cross_entropy(self.puzzle_logits(shuffled), labels)
