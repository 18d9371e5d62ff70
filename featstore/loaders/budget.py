"""Any loader under a decode budget (``featstore.decode_budget``): each planned batch is decoded in
groups of at most ``max_pixels`` pixels, and images nothing may decode are invalid rows up front.

The wrapped loader sees a plan of the groups and never knows; its batches are put back together
here, one per planned batch, so the batch contract (one ``Batch`` per planned batch, in order) and
the features are unchanged. Where no batch needs cutting the inner batches pass through untouched.
The sizes come from the image headers (``image_header``), read once per split before decoding; a
caller that knows them already (a manifest with cached headers) passes ``size_of``.

Grouping alone did not bound DALI: glibc's malloc raises its mmap threshold after the first large
buffers are freed, so later decode buffers (tens of MB each) come from the heaps of DALI's threads
and stay there fragmented; 32 3000x3000 PNGs in groups of one grew DALI's RSS by 586 MB, by 50 MB
with the threshold fixed. So buffers of 16 MiB and more are always mmapped (and returned on free).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..augment import ViewPlan, no_views
from ..decode_budget import decode_cost, refusal, split_by_budget
from ..image_header import image_size_from_header
from ..preprocess import Preprocess
from .batch import Batch, Loader
from .verdicts import Verdicts


@dataclass
class _Planned:
    rows: np.ndarray  # the planned batch
    groups: int  # how many inner batches decode it
    refused: dict[int, str] = field(default_factory=dict)


class BudgetedLoader:
    def __init__(
        self,
        inner: Loader,
        preprocess: Preprocess,
        device: torch.device,
        max_pixels: int,
        workers: int = 1,
        size_of: Callable[[str], tuple[int, int] | None] = image_size_from_header,
    ):
        self.inner = inner
        self.name = inner.name
        self.pre = preprocess
        self.device = device
        self.max_pixels = max_pixels
        self.workers = max(1, workers)
        self.size_of = size_of
        _return_large_buffers()

    def plan(self, paths: list[str], plan: list[np.ndarray], verdicts: Verdicts | None = None) -> tuple[list[_Planned], list[np.ndarray]]:
        """Per planned batch: its groups and refusals; and the inner plan (every group, in order).
        Sizes come from ``verdicts`` where they have one (the file checks read the headers), else from the header."""
        rows = sorted({r for p in plan for r in p.tolist()})

        sizes: dict[int, tuple[int, int] | None] = {}
        unknown = []
        for r in rows:
            v = verdicts[r] if verdicts is not None else None
            if v is not None and v.width and v.height:
                sizes[r] = int(v.width), int(v.height)
            else:
                unknown.append(r)
        if unknown:  # only rows the file checks did not size: a task per row costs the main thread ~50 µs
            with ThreadPoolExecutor(self.workers) as pool:  # header reads wait on the disk, not on the GIL
                sizes.update(zip(unknown, pool.map(lambda r: self.size_of(paths[r]), unknown)))
        limit = Image.MAX_IMAGE_PIXELS
        planned, inner = [], []
        for batch in plan:
            refused = {r: why for r in batch.tolist() if (why := refusal(sizes[r], self.pre.resize, self.max_pixels, limit))}
            kept = np.asarray([r for r in batch.tolist() if r not in refused], dtype=batch.dtype)
            groups = split_by_budget([decode_cost(sizes[r], self.pre.resize) for r in kept.tolist()], self.max_pixels)
            inner += [kept[g] for g in groups]
            planned.append(_Planned(batch, len(groups), refused))
        return planned, inner

    def batches(
        self, paths: list[str], plan: list[np.ndarray], verdicts: Verdicts | None = None, augment: ViewPlan | None = None
    ) -> Generator[Batch, None, None]:  # closed early by extraction
        if not plan:
            return
        planned, inner_plan = self.plan(paths, plan, verdicts)
        given = {"augment": augment} if augment is not None else {}  # a loader without views takes no such argument
        inner = self.inner.batches(paths, inner_plan, verdicts, **given) if inner_plan else iter(())
        try:
            for p in planned:
                parts = [next(inner) for _ in range(p.groups)]
                yield self._assemble(p, parts, augment)
        finally:
            close = getattr(inner, "close", None)
            if close is not None:
                close()

    def _assemble(self, planned: _Planned, parts: list[Batch], augment: ViewPlan | None = None) -> Batch:
        if len(parts) == 1 and not planned.refused:
            return parts[0]  # the usual case: the batch was decoded whole
        size = self.pre.image_size
        like = parts[0].images if parts else torch.zeros(0, 3, size, size, device=self.device)
        images = torch.zeros(len(planned.rows), 3, size, size, dtype=like.dtype, device=like.device)
        images = images.contiguous(memory_format=torch.channels_last)
        where = {r: i for i, r in enumerate(planned.rows.tolist())}
        errors = dict(planned.refused)
        views, params = None, None
        if augment is not None:  # refused rows: blank views, no parameters
            views = torch.zeros(len(planned.rows), augment.views, 3, size, size, dtype=like.dtype, device=like.device)
            params = np.stack([no_views(augment.views)] * len(planned.rows))
        for part in parts:
            index = torch.as_tensor([where[r] for r in part.rows.tolist()], device=like.device)
            images[index] = part.images.to(images.dtype)
            if views is not None and params is not None and part.views is not None and part.view_params is not None:
                views[index] = part.views.to(views.dtype)
                params[index.cpu().numpy()] = part.view_params
            errors.update(part.errors)
        return Batch(planned.rows, images, errors, views, params)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_LARGE = 16 << 20  # a 2400x2400 decode; smaller buffers reuse the heap as before


def _return_large_buffers() -> None:
    """Make glibc mmap every allocation of 16 MiB and more (see the module docstring); elsewhere a no-op."""
    name = ctypes.util.find_library("c")
    if not name:
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to tune
        ctypes.CDLL(name).mallopt(_M_MMAP_THRESHOLD, _LARGE)
