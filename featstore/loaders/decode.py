"""PIL decoding to 8-bit RGB for every image mode we meet in real folders."""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def read_encoded(path: str) -> tuple[bytes | None, str]:
    """The file's bytes, or None and why not (unreadable or empty), for loaders that decode bytes."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, f"{type(e).__name__}: {e.strerror or e}"
    if not data:
        return None, "empty file (0 bytes)"
    return data, ""


def open_rgb(path: str) -> Image.Image:
    """Decode ``path`` fully and return an RGB image; raises on files that are not decodable images."""
    with warnings.catch_warnings():
        # a header beyond PIL's bomb limit raises DecompressionBombError; between the warn and the
        # error limit it would only warn, so make that an error too
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)


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
