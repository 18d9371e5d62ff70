"""Inference that keeps the device busy: fixed batch shapes, bf16 autocast on CUDA, and features
copied device→host on a side stream into a ring of pinned buffers, consumed a few batches later.

On CUDA the forward of a full batch is captured once in a CUDA graph and replayed for every batch
(its padded shape never changes): one launch instead of hundreds of kernel launches from the main
thread, which otherwise bounds the rate of small models on fast GPUs (benchmarks/RESULTS.md, the
H200 profile). The first batch runs both ways and the graph is kept only if its features equal the
eager forward's within bf16 rounding; a model that cannot be captured (a host sync, data-dependent
control flow) runs eagerly, with a note. ``cuda_graphs=False`` (``--no-cuda-graphs``) turns it off.

On CPU everything is synchronous (there is nothing to overlap with on the same cores), in fp32
channels_last, the fastest CPU setting measured (bf16 autocast is far slower on CPUs without bf16
units; benchmarks/RESULTS.md).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
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
        cuda_graphs: bool = True,
        log: Callable[[str], None] = lambda s: None,
    ):
        self.views = views
        self.device = device
        self.batch_size = batch_size
        self.fixed_shapes = fixed_shapes or compile or device.type == "cuda"
        self.model = torch.compile(encoder, dynamic=False) if compile else encoder
        self.cuda = device.type == "cuda"
        self.dtype = compute_dtype(device)
        self.pending: deque = deque()
        self.log = log
        # torch.compile makes its own choice; graphs need the fixed shapes CUDA always has here
        self.graphs = cuda_graphs and self.cuda and not compile
        self.graph: _GraphedForward | None = None
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.slots = [
                {v: torch.empty((batch_size, *row_shape(d)), dtype=torch.float32, pin_memory=True) for v, d in views.items()}
                for _ in range(ring)
            ]
            # blocking: synchronize() sleeps instead of spinning a core the decode threads need
            self.events = [torch.cuda.Event(blocking=True) for _ in range(ring)]
            self.next_slot = 0

    def _eager(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.model(images)

    def _forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        n = images.shape[0]
        if self.fixed_shapes:
            images = pad_to(images, self.batch_size)
        out = self._graphed(images) if self.graphs else None
        if out is None:
            out = self._eager(images)
        return {v: out[v][:n].float() for v in self.views}  # drop the padding by index

    def _graphed(self, images: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The forward by graph replay (the first batch: by the eager forward the capture is checked against); None: run it eagerly."""
        if self.graph is not None and self.graph.fits(images):
            return self.graph(images)
        if self.graph is not None:  # another dtype or layout than the captured one (a placeholder batch)
            return None
        try:
            graph = _GraphedForward(self.model, images, self.device, self.dtype)
            eager = self._eager(images)
            same, worst = graph.agrees_with(eager, self.views)
        except Exception as e:  # not capturable: a host sync, data-dependent control flow, an unsupported op
            self.graphs = False
            self.log(
                f"CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); the forward runs eagerly"
            )
            return None
        if not same:
            self.graphs = False
            self.log(f"the CUDA graph's features differ from the eager forward's (max relative {worst:.3g}); the forward runs eagerly")
        else:
            self.graph = graph
        return eager  # this batch: the eager forward's features, computed for the check

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


class _GraphedForward:
    """One full batch's forward captured in a CUDA graph: copy in, replay, clone out.

    The outputs are cloned because the graph rewrites the same memory on the next replay, while the
    side stream may still be copying the previous batch's features to the host."""

    def __init__(self, model, example: torch.Tensor, device: torch.device, dtype: torch.dtype):
        self.static_in = torch.empty_like(example, memory_format=torch.channels_last).copy_(example)
        self.shape, self.dtype_in = tuple(example.shape), example.dtype
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)

        def forward():
            # autocast's cast cache must be off while capturing (its cached weights would be graph memory)
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, cache_enabled=False):
                return model(self.static_in)

        with torch.cuda.stream(side):  # warm-up outside the capture: cudnn plans, lazy inits
            for _ in range(2):
                forward()
        current.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's threads (nvJPEG's producer, DALI's) may allocate on their own
        # streams while this thread captures; under the default "global" mode that voids the capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.static_out = forward()
        self.graph.replay()

    def fits(self, images: torch.Tensor) -> bool:
        return tuple(images.shape) == self.shape and images.dtype == self.dtype_in

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.static_in.copy_(images)
        self.graph.replay()
        return {k: v.clone() for k, v in self.static_out.items()}

    def agrees_with(self, eager: dict[str, torch.Tensor], views: Mapping[str, object]) -> tuple[bool, float]:
        """Whether the replay of the captured batch gives the eager features within bf16 rounding."""
        worst = 0.0
        for v in views:
            a, b = self.static_out[v].float(), eager[v].float()
            scale = b.abs().max().clamp_min(1e-6)
            worst = max(worst, float((a - b).abs().max() / scale))
        return worst <= GRAPH_TOLERANCE, worst


# bf16 keeps 8 bits of mantissa (relative rounding 2**-8 = 0.4%); kernels chosen differently inside
# and outside a capture may round differently through a deep network, a few roundings' worth
GRAPH_TOLERANCE = 0.02
