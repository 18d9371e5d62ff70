"""Inference that keeps the device busy: fixed batch shapes, bf16 autocast on CUDA, and features
copied device→host on a side stream into a ring of pinned buffers, consumed a few batches later.

On CPU everything is synchronous (there is nothing to overlap with on the same cores), in fp32
channels_last, the fastest CPU setting measured (bf16 autocast is far slower on CPUs without bf16
units; benchmarks/RESULTS.md).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .device import compute_dtype
from .models.encoders import FeatureEncoder
from .store import RowShape, row_shape


def pad_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """Repeat the last image so every batch has the same shape (no recompiles, one cudnn plan)."""
    n = images.shape[0]
    if n >= size:
        return images
    filler = images[-1:].expand(size - n, *images.shape[1:])
    return torch.cat([images, filler]).contiguous(memory_format=torch.channels_last)


class BatchEncoder:
    """``submit(item, images)`` runs the encoder; ``ready()`` yields ``(item, {view: float32 array})`` in order."""

    def __init__(
        self,
        encoder: FeatureEncoder,
        views: dict[str, RowShape],
        device: torch.device,
        batch_size: int,
        fixed_shapes: bool = False,
        compile: bool = False,
        ring: int = 3,
    ):
        self.views = views
        self.device = device
        self.batch_size = batch_size
        self.fixed_shapes = fixed_shapes or compile or device.type == "cuda"
        self.model = torch.compile(encoder, dynamic=False) if compile else encoder
        self.cuda = device.type == "cuda"
        self.dtype = compute_dtype(device)
        self.pending: deque = deque()
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.slots = [
                {v: torch.empty((batch_size, *row_shape(d)), dtype=torch.float32, pin_memory=True) for v, d in views.items()}
                for _ in range(ring)
            ]
            # blocking: synchronize() sleeps instead of spinning a core the decode threads need
            self.events = [torch.cuda.Event(blocking=True) for _ in range(ring)]
            self.next_slot = 0

    def _forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        n = images.shape[0]
        if self.fixed_shapes:
            images = pad_to(images, self.batch_size)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.model(images)
        return {v: out[v][:n].float() for v in self.views}  # drop the padding by index

    def submit(self, item: Any, images: torch.Tensor) -> None:
        feats = self._forward(images)
        if not self.cuda:
            self.pending.append((item, {v: t.numpy() for v, t in feats.items()}, None))
            return
        if len(self.pending) == len(self.slots):
            raise RuntimeError("BatchEncoder ring is full: consume ready() before submitting more")
        slot = self.next_slot
        self.next_slot = (slot + 1) % len(self.slots)
        n = images.shape[0]
        computed = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_stream(computed)
            for v, t in feats.items():
                t.record_stream(self.copy_stream)  # keep the allocator from reusing t before the copy ends
                self.slots[slot][v][:n].copy_(t, non_blocking=True)
            self.events[slot].record(self.copy_stream)
        self.pending.append((item, slot, n))

    def ready(self, drain: bool = False) -> Iterator[tuple[Any, dict[str, np.ndarray]]]:
        """Results whose copies are due: on CUDA keep ``ring - 1`` batches in flight unless draining."""
        keep = 0 if (drain or not self.cuda) else len(self.slots) - 1
        while len(self.pending) > keep:
            item, slot, n = self.pending.popleft()
            if not self.cuda:
                yield item, slot
                continue
            self.events[slot].synchronize()
            yield item, {v: buf[:n].numpy().copy() for v, buf in self.slots[slot].items()}
