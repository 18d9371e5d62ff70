"""The batch contract every loader keeps, and the normalization they share on the device."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # torch and numpy are imported where used: `featstore --help` needs neither
    import numpy as np
    import torch

    from ..augment import ViewPlan
    from ..preprocess import Preprocess
    from .verdicts import Verdicts


@dataclass
class Batch:
    rows: np.ndarray  # int64 row indices into the split
    images: torch.Tensor  # (B, 3, S, S) normalized, on the target device, channels_last
    errors: dict[int, str] = field(default_factory=dict)  # row → why its image is a placeholder
    # with augmented views (featstore.augment): (B, K, 3, S, S) normalized like images, and each
    # view's (top, left, height, width, flip) as (B, K, 5) int32 (-1 for a row that failed)
    views: torch.Tensor | None = None
    view_params: np.ndarray | None = None


class Loader(Protocol):
    name: str

    def batches(
        self, paths: list[str], plan: list[np.ndarray], verdicts: Verdicts | None = None, augment: ViewPlan | None = None
    ) -> Generator[Batch, None, None]:  # closed early by extraction
        """``paths[row]`` is the absolute path of ``row``; yield the batches of ``plan`` in order.
        ``verdicts``: the file checks' verdicts by row (``verdicts.check_files``); files are checked as they are read without.
        ``augment``: also crop each row's augmented views (``Batch.views``); a loader that cannot refuses it."""


def normalize_on_device(
    images_uint8: torch.Tensor, preprocess: Preprocess, device: torch.device, channels_last_input: bool
) -> torch.Tensor:
    """uint8 (B,3,H,W) or (B,H,W,3) → float normalized (B,3,H,W), channels_last, on ``device``."""
    import torch

    x = images_uint8.to(device, non_blocking=True)
    if channels_last_input:
        x = x.permute(0, 3, 1, 2)  # NHWC storage viewed as NCHW: channels_last without a copy
    mean, std = _scale(tuple(preprocess.mean), tuple(preprocess.std), device)
    x = (x.float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last)


@lru_cache(maxsize=8)
def _scale(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # made once: building a CUDA tensor from a Python list is a synchronous copy, which would stall
    # the loader behind all queued GPU work on every batch
    import torch

    return (torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0, torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0)
