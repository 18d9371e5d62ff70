"""Per-image augmentation with torchvision.transforms.v2, and the normalization every method shares.

v2 transforms draw one set of random parameters per call, so a batch tensor would get the same
crop and jitter for every image; SimCLR needs each image (and each view) drawn independently,
hence one call per image (~2.5 ms per 64-px image for SimCLR's full pipeline on one core).
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

# featstore extract's defaults (--mean/--std), so pretraining and extraction agree
from featstore.preprocess import IMAGENET_MEAN as MEAN
from featstore.preprocess import IMAGENET_STD as STD


def each(transform: v2.Transform, images: torch.Tensor) -> torch.Tensor:
    """``transform`` applied to every uint8 image of a (B, 3, H, W) batch independently."""
    return torch.stack([transform(image) for image in images])


def normalize(images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 on ``device``, normalized with ImageNet mean/std, channels_last."""
    x = images.to(device).float().div_(255)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)
