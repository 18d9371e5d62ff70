"""Reading image files for every loader: their bytes, with unreadable, empty, structurally broken
(``containers``) and decompression-bomb files refused with a reason, and PIL decoding to 8-bit RGB
for every image mode we meet in real folders."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from .containers import PNG_SIGNATURE, container_problem, describe_non_image

_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
JPEG_MAGIC = b"\xff\xd8\xff"
# start-of-frame markers (the ones that carry the image size); C4, C8 and CC are not frames
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def read_encoded(path: str) -> tuple[bytes | None, str]:
    """The file's bytes, or None and why not. Every loader reads through here, so all refuse the same files.

    Refused: unreadable and empty files, JPEGs and PNGs whose container is broken (truncated,
    garbled markers, text named .jpg: see ``containers``), and images whose header claims more
    pixels than PIL allows (``open_rgb`` refuses those too): a GPU decoder would allocate the whole
    claimed image before finding out the data is not there.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, f"{type(e).__name__}: {e.strerror or e}"
    if not data:
        return None, "empty file (0 bytes)"
    problem = container_problem(data)
    if problem:
        return None, problem
    size, limit = jpeg_size(data) or png_size(data), Image.MAX_IMAGE_PIXELS
    if size is not None and limit is not None and size[0] * size[1] > limit:
        return None, f"DecompressionBombError: image size ({size[0] * size[1]} pixels) exceeds the limit of {limit} pixels"
    return data, ""


def png_size(blob: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR; None when it is not a PNG."""
    if blob[:8] != PNG_SIGNATURE or blob[12:16] != b"IHDR":
        return None
    return int.from_bytes(blob[16:20], "big"), int.from_bytes(blob[20:24], "big")


def jpeg_size(blob: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header; None when it is not a JPEG or has none.

    Marker walking rather than ``PIL.Image.open``: this runs on reader threads, where PIL's bomb
    check would need the process-wide warnings filters, and it costs microseconds.
    """
    if blob[:3] != JPEG_MAGIC:
        return None
    pos, end = 2, len(blob)
    while pos + 4 <= end:
        if blob[pos] != 0xFF:
            return None
        marker = blob[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        length = int.from_bytes(blob[pos + 2:pos + 4], "big")
        if marker in _SOF:
            if pos + 9 > end:
                return None
            height = int.from_bytes(blob[pos + 5:pos + 7], "big")
            width = int.from_bytes(blob[pos + 7:pos + 9], "big")
            return width, height
        if marker == 0xDA or length < 2:  # scan data before any frame header
            return None
        pos += 2 + length
    return None


def open_rgb(path: str) -> Image.Image:
    """Decode ``path`` fully and return an RGB image; raises on files that are not decodable images."""
    with open(path, "rb") as f:
        return decode_rgb(f.read())


def decode_rgb(data: bytes) -> Image.Image:
    """Decode encoded bytes with PIL into an RGB image; raises on bytes that are not a decodable image."""
    with warnings.catch_warnings():
        # a header beyond PIL's bomb limit raises DecompressionBombError; between the warn and the
        # error limit it would only warn, so make that an error too
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_rgb(img)


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
