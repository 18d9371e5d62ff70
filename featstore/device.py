"""``--device auto|cpu|cuda[:N]`` → a torch.device, shared by extraction and probing."""

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
