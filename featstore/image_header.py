"""An image's size from its header, read without decoding: what a decode of it will allocate.

``image_size_from_header(path)`` reads a few hundred bytes of a JPEG (walking its marker segments to
the frame header, seeking over EXIF and the like) or a PNG (its IHDR), and lets PIL's lazy
``Image.open`` read any other format's header. It never opens anything but a regular file (a FIFO
would block) and returns None for what it cannot read: the loaders' own checks then decide.
"""

from __future__ import annotations

import os
import stat
import struct
import warnings
from typing import BinaryIO

_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_PNG = b"\x89PNG\r\n\x1a\n"


def image_size_from_header(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) declared by the image file's header, or None when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    with open(fd, "rb") as f:
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            head = f.read(24)
            if head[:2] == b"\xff\xd8":
                f.seek(2)
                return _jpeg_size(f)
            if head[:8] == _PNG:
                return _png_size(head)
        except (OSError, struct.error):
            return None
    return _pil_size(path)


def _jpeg_size(f: BinaryIO) -> tuple[int, int] | None:
    while True:
        byte = f.read(1)
        if byte != b"\xff":
            return None
        marker = f.read(1)
        while marker == b"\xff":  # fill bytes
            marker = f.read(1)
        if not marker:
            return None
        code = marker[0]
        if code == 0x01 or 0xD0 <= code <= 0xD7:  # standalone markers
            continue
        if code in (0xD9, 0xDA):  # end of image, or image data before any frame header
            return None
        (length,) = struct.unpack(">H", f.read(2))
        if code in _SOF:
            _, height, width = struct.unpack(">BHH", f.read(5))
            return (width, height) if width and height else None
        if length < 2:
            return None
        f.seek(length - 2, os.SEEK_CUR)


def _png_size(head: bytes) -> tuple[int, int] | None:
    if head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return (width, height) if width and height else None


def _pil_size(path: str | os.PathLike) -> tuple[int, int] | None:
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bomb warning: the size is the answer asked for
        try:
            with Image.open(path) as img:
                return img.size
        except Image.DecompressionBombError as e:
            return _size_from_bomb_message(str(e))
        except Exception:  # not an image PIL knows: the loaders' checks name it
            return None


def _size_from_bomb_message(message: str) -> tuple[int, int] | None:
    # PIL refuses to open images over twice its limit, naming only the pixel count: a square of that
    # area is as good as the real shape for a budget
    import re

    found = re.search(r"\((\d+) pixels\)", message)
    if not found:
        return None
    side = int(int(found.group(1)) ** 0.5) + 1
    return side, side
