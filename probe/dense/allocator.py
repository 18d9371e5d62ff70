"""Keep glibc's heap from growing with the number of blocks a dense probe streams.

glibc serves allocations above its mmap threshold with mmap and returns them on free; but the
threshold is dynamic: every freed mmapped buffer raises it (up to 32 MiB), after which the streamed
token blocks, decoded chunks and evaluation batches (1-64 MiB each) come from the heap, where they
fragment it and are not given back. Measured (benchmarks/RESULTS.md, #24 memory): a streamed run's
peak RSS then grew ~0.15-0.2 MiB per image; with the threshold fixed, flat. Setting it fixes the
threshold (and disables the dynamic raise) for the whole process, which costs an mmap per large
buffer: negligible beside decoding or multiplying it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
THRESHOLD = 1 << 20  # buffers of 1 MiB or more are mmapped and returned to the system when freed


@functools.cache
def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at 1 MiB (once per process); False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it: another libc's mallopt numbers differ)
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD))
