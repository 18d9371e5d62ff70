"""Image loaders: one backend per module, the same preprocessing semantics, the same batch contract.

Every loader takes a *batch plan* (a list of row-index arrays; batches never span store units) and
yields one :class:`Batch` per planned batch, in order, covering exactly the planned rows. A row whose
file cannot be decoded gets a zero placeholder image and a reason in ``Batch.errors``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Iterator, Protocol

from ..errors import UsageError

if TYPE_CHECKING:  # torch and numpy are imported where used: `featstore --help` needs neither
    import numpy as np
    import torch

    from ..preprocess import Preprocess

LOADERS = ("dali", "torch", "nvjpeg")


@dataclass
class Batch:
    rows: np.ndarray  # int64 row indices into the split
    images: torch.Tensor  # (B, 3, S, S) normalized, on the target device, channels_last
    errors: dict[int, str] = field(default_factory=dict)  # row → why its image is a placeholder


class Loader(Protocol):
    name: str

    def batches(self, paths: list[str], plan: list[np.ndarray]) -> Iterator[Batch]:
        """``paths[row]`` is the absolute path of ``row``; yield the batches of ``plan`` in order."""


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # any import failure (missing wheel, missing CUDA libs) means: no DALI
        return False
    return True


def choose_loader(name: str, device: torch.device) -> str:
    """``auto``: nvJPEG on a CUDA device, else DALI (CPU threads) where it imports, else torch.
    ``dali`` without DALI is an error.

    On CUDA nvJPEG, not DALI: on an H200 (benchmarks/RESULTS.md, 2026-11-29) nvJPEG ran end to
    end 1.33-1.36x faster than DALI on every model and image set measured (steady rate 1.1-1.8x),
    because featstore feeds DALI's pipeline from the main thread. On CPU DALI's threads beat the DataLoader (RESULTS.md, run 5).
    """
    if name == "auto":
        if device.type == "cuda":
            return "nvjpeg"
        return "dali" if dali_available() else "torch"
    if name not in LOADERS:
        raise UsageError(f"unknown loader {name!r}", f"use one of auto, {', '.join(LOADERS)}")
    if name == "dali" and not dali_available():
        raise UsageError("--loader dali, but NVIDIA DALI cannot be imported", "pip install nvidia-dali-cuda130, or use --loader torch")
    return name


def make_loader(name: str, preprocess: Preprocess, device: torch.device, workers: int) -> Loader:
    if name == "dali":
        from .dali import DaliLoader

        return DaliLoader(preprocess, device, workers)
    if name == "nvjpeg":
        from .nvjpeg import NvjpegLoader

        return NvjpegLoader(preprocess, device, workers)
    from .dataloader import TorchLoader

    return TorchLoader(preprocess, device, workers)


def normalize_on_device(images_uint8: torch.Tensor, preprocess: Preprocess, device: torch.device, channels_last_input: bool) -> torch.Tensor:
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

    return (torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0,
            torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0)
