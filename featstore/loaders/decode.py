"""Reading image files for every loader: their bytes, with unreadable, empty, structurally broken
(``containers``) and decompression-bomb files refused with a reason, and PIL decoding to 8-bit RGB
for every image mode we meet in real folders, turned upright by its EXIF orientation (``orientation``)."""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..orientation import upright
from .containers import check_container, describe_non_image

_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def read_encoded(path: str) -> tuple[bytes | None, str]:
    """The file's bytes, or None and why not. Every loader reads through here, so all refuse the same files.
    (``read_checked`` also gives the image size the header declares.)

    Refused: unreadable and empty files, JPEGs and PNGs whose container is broken (truncated,
    garbled markers, text named .jpg: see ``containers``), and images whose header claims more
    pixels than PIL allows (``open_rgb`` refuses those too): a GPU decoder would allocate the whole
    claimed image before finding out the data is not there.
    """
    data, reason, _ = read_checked(path)
    return data, reason


def read_checked(path: str) -> tuple[bytes | None, str, tuple[int, int] | None]:
    """``read_encoded``'s answer and the (width, height) the header declares (None: not a JPEG/PNG, or refused)."""
    try:
        # non-blocking open: a FIFO swapped in after the manifest was made must not hang the reader
        # (the dataset walk keeps them out of manifests); on a regular file the flag does nothing
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None, "not a regular file (a FIFO, socket, device or folder)", None
            data = f.read()
    except OSError as e:
        return None, f"{type(e).__name__}: {e.strerror or e}", None
    if not data:
        return None, "empty file (0 bytes)", None
    problem, size = check_encoded(data)
    return (None, problem, None) if problem else (data, "", size)


def check_encoded(data: bytes) -> tuple[str, tuple[int, int] | None]:
    """``read_checked``'s checks of bytes already read (a tar member's too): (why refused or "", declared (width, height))."""
    # the size from the header the check parsed, not from PIL.Image.open: this runs on reader threads,
    # where PIL's bomb check would need the process-wide warnings filters
    problem, size = check_container(data)
    if problem:
        return problem, None
    limit = Image.MAX_IMAGE_PIXELS
    if size is not None and limit is not None and size[0] * size[1] > limit:
        return f"DecompressionBombError: image size ({size[0] * size[1]} pixels) exceeds the limit of {limit} pixels", None
    return "", size


def open_rgb(path: str) -> Image.Image:
    """Decode ``path`` fully and return an RGB image; raises on files that are not decodable images."""
    with open(path, "rb") as f:
        return decode_rgb(f.read())


@contextmanager
def pil_quietly() -> Iterator[None]:
    """PIL opening a file: a header beyond its bomb limit raises DecompressionBombError, and between
    the warn and the error limit it would only warn, so that is an error too; its warnings about the
    file's own metadata ("Metadata Warning, tag 274 had too many entries") are diagnostics about the
    input, kept off the terminal as the C decoders' are (``quiet``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="PIL")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def decode_rgb(data: bytes) -> Image.Image:
    """Decode encoded bytes with PIL into an RGB image; raises on bytes that are not a decodable image."""
    with pil_quietly(), Image.open(io.BytesIO(data)) as img:
        img.load()
        return to_rgb(upright(img))  # EXIF orientation, as DALI's decoders apply it


def decode_failure(error: Exception, data: bytes) -> str:
    """The reason recorded for bytes PIL could not decode (text and HTML are named as such)."""
    if isinstance(error, UnidentifiedImageError):
        return describe_non_image(data)
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _SIXTEEN_BIT:
        # PIL's own I;16 → RGB conversion clips at 255; scale the full range down instead
        arr = np.asarray(img, dtype=np.uint32)
        if img.mode == "I" and arr.max(initial=0) <= 255:
            return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
        return Image.fromarray((arr // 257).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # drop alpha the way decoders do (no compositing), so loaders agree
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")
