"""Keep glibc's heap from growing with the number of blocks a dense probe streams.

glibc serves allocations above its mmap threshold with mmap and returns them on free; but the
threshold is dynamic: every freed mmapped buffer raises it (up to 32 MiB), after which the streamed
token blocks, decoded chunks and evaluation batches (1-64 MiB each) come from the heap, where they
fragment it and are not given back. Measured (benchmarks/RESULTS.md, #24 memory): a streamed run's
peak RSS then grew ~0.15-0.2 MiB per image; with the threshold fixed, flat. Setting it fixes the
threshold (and disables the dynamic raise) for the whole process, which costs an mmap per large
buffer: negligible beside decoding or multiplying it.

A training step is the exception (``step_heap``): its temporaries (the standardized tokens, the
logits, the upsampled maps, the gradients: ~100 MB a step for 16 images of the bins head) are the
same sizes every step and all freed by its end, and a fresh mapping costs a page fault on the first
write of every 4 KiB, ~20 ms of a ~90 ms step. Inside a step they come from the heap, which keeps
them (the trim threshold is raised with the mmap threshold fixed) for the next step to reuse: a
constant amount, whatever N is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 20  # buffers of 1 MiB or more are mmapped and returned to the system when freed
STEP_THRESHOLD = 256 << 20  # inside a training step: from the heap up to 256 MiB (a step's largest array is ~55 MB)


@functools.cache
def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's mallopt, or None where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it: another libc's mallopt numbers differ)
    except (OSError, AttributeError, TypeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt


_fixed = False  # fix_mmap_threshold succeeded in this process: step_heap only changes a fixed threshold


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at 1 MiB and its trim threshold at the step size (once per process);
    False where the C library is not glibc."""
    global _fixed
    mallopt = _mallopt()
    if not _fixed and mallopt is not None:
        _fixed = bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, STEP_THRESHOLD))
    return _fixed


@contextmanager
def step_heap() -> Iterator[None]:
    """Within: buffers below :data:`STEP_THRESHOLD` come from the heap (a training step's temporaries,
    reused step after step); after: 1 MiB again. Nothing where the threshold was never fixed (a
    process that did not stream, or not glibc): its dynamic threshold is left alone."""
    mallopt = _mallopt() if _fixed else None
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, STEP_THRESHOLD)
    try:
        yield
    finally:
        if mallopt is not None:
            mallopt(M_MMAP_THRESHOLD, THRESHOLD)
