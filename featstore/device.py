"""``--device auto|cpu|cuda[:N]`` → a torch.device, and the dtype computations run in on it; both
shared by extraction and probing."""

from __future__ import annotations

import torch

from .errors import UsageError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"unknown device {device!r}", "use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}, but no CUDA device is available", "use --device cpu (or auto)")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}", "use auto, cpu or cuda") from None


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU (bf16 is far slower on CPUs without bf16 units; benchmarks/RESULTS.md). Extraction
    autocasts to it and records it in the cache key; probing trains in it. (An fp16 fallback would
    never apply: torch.cuda.is_bf16_supported() is true on every CUDA GPU, emulated before Ampere.)"""
    return torch.bfloat16 if device.type == "cuda" else torch.float32
