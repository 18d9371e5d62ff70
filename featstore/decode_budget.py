"""How many pixels one decode may hold at once, and how a batch is split to stay under it.

Why: the pixel limit (PIL's bomb limit, ~89.5 M pixels per image) bounds one image, not a batch,
and not the resize. 32 9000x9000 PNGs (8 MB on disk) took DALI to 8.7 GB decoding them as one batch,
and a 274-byte 200000x1 PNG took 4-5 GB: its shorter side resized to 256 is a 51,200,000x256 image.

The cost of an image is the pixels its decode and its resize allocate: ``w*h`` plus the resized
size (shorter side to ``resize``, as every loader does before the crop). A planned batch is cut into
consecutive groups whose costs sum to at most ``--max-decode-pixels``; the loader decodes one group
at a time and the groups are put back together into the planned batch, so the rows, their order and
the features are what they were (only the decoding is split). An image is an invalid row, with its
size as the reason, when its resize alone is over the bomb limit (as its decode would be), or when
its cost alone is over the budget. The default budget is at least twice the bomb limit, so with the
default no image the bomb limit allows is ever refused for the budget, and the machine's memory
decides only the grouping, never the store's contents.
"""

from __future__ import annotations

from .machine import ram_bytes

# what one decoded-and-resized pixel costs the loaders at their worst (measured on CPU: the nvJPEG
# path's float copy of a group for the resize, 12 bytes, over its 3-byte decode; benchmarks/RESULTS.md)
BYTES_PER_PIXEL = 16
# the share of the machine's memory the default budget lets one group use
MEMORY_SHARE = 1 / 6
# what a loader holds for large images whatever the budget (DALI's per-thread decode and resize
# scratch and its prefetched iteration: measured ~240 MB over its small-image RSS at a 10 M budget)
FIXED_BYTES = 256 << 20


def memory_bound(budget: int) -> int:
    """The documented bound: decoding under ``budget`` adds at most this many bytes to a loader
    process's peak RSS over its RSS on small images (each DataLoader worker process alike)."""
    return BYTES_PER_PIXEL * budget + FIXED_BYTES


def default_max_decode_pixels(bomb_limit: int | None) -> int:
    """The default ``--max-decode-pixels``: a sixth of the machine's memory at 16 bytes a pixel, and
    never under twice the bomb limit (so that the default refuses nothing the bomb limit allows)."""
    return max(2 * (bomb_limit or 0), int(ram_bytes() * MEMORY_SHARE / BYTES_PER_PIXEL))


def resized_size(size: tuple[int, int], resize: int) -> tuple[int, int]:
    """(width, height) after the shorter side is resized to ``resize`` (torchvision's Resize rounding)."""
    w, h = size
    if w <= h:
        return resize, int(resize * h / w)
    return int(resize * w / h), resize


def decode_cost(size: tuple[int, int] | None, resize: int) -> int:
    """Pixels the decode and the resize of an image of ``size`` allocate (0 when the size is unknown:
    the loader's own checks decide about such a file)."""
    if size is None:
        return 0
    rw, rh = resized_size(size, resize)
    return size[0] * size[1] + rw * rh


def refusal(size: tuple[int, int] | None, resize: int, budget: int, bomb_limit: int | None) -> str:
    """Why an image of ``size`` is not decoded at all ("" when it may be)."""
    if size is None:
        return ""
    w, h = size
    rw, rh = resized_size(size, resize)
    if bomb_limit is not None and rw * rh > bomb_limit:
        return (
            f"image of {w}x{h} pixels: resized to {rw}x{rh} ({rw * rh} pixels), over the limit of {bomb_limit} pixels "
            "(an aspect ratio no model input has)"
        )
    cost = decode_cost(size, resize)
    if cost > budget:
        return f"image of {w}x{h} pixels: decoding and resizing it takes {cost} pixels, over --max-decode-pixels {budget}"
    return ""


def split_by_budget(costs: list[int], budget: int) -> list[list[int]]:
    """Consecutive groups of positions whose costs sum to at most ``budget`` (one position over it
    alone is a group of its own; the caller refuses those first)."""
    groups: list[list[int]] = []
    total = budget + 1
    for i, cost in enumerate(costs):
        if total + cost > budget:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += cost
    return groups
