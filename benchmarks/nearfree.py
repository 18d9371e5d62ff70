"""A model that costs nothing: one pixel per channel. ``--model benchmarks/nearfree.py:build``.

What is left of an extraction with it is the loader, the batch handling and the store: the host
overhead that issue 22 measures (``bench_host.py``).
"""

from __future__ import annotations

import torch
from torch import nn


class OnePixel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, 0, 0]


def build() -> nn.Module:
    return OnePixel()
