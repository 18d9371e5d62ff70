"""What this machine has that defaults are sized by: its physical memory."""

from __future__ import annotations

import os


def ram_bytes() -> int:
    """The machine's physical memory in bytes (16 GiB where the platform does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 << 30
