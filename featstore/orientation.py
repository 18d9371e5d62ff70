"""EXIF orientation, applied the same way by every loader: images are turned upright before the resize.

A camera that stores a portrait photo sideways writes an EXIF Orientation tag (1-8) instead of
rotating the pixels. DALI's decoders (nvImageCodec, CPU and GPU) apply it; PIL does not unless asked,
and torchvision's ``decode_jpeg`` only on CPU and only when asked: the torch loader's features of one
such photo were 27% away from DALI's. Every loader now applies it as PIL's ``ImageOps.exif_transpose``
does (torchvision's ``apply_exif_orientation`` is the same table), and the store records
``"orientation": "exif"`` in its preprocessing provenance.

``exif_orientation`` reads the tag from a JPEG's bytes without decoding (a walk over the APP
segments), for the nvJPEG path, which decodes on the GPU and turns the tensor; ``orient`` is the
tensor form of PIL's transposes.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where used: `featstore --help` needs none
    import torch
    from PIL import Image

ORIENTATION = "exif"  # what the preprocessing provenance records: EXIF orientation applied before resizing

_TAG = 0x0112


def exif_orientation(data: bytes) -> int:
    """The EXIF Orientation (1-8) of JPEG bytes; 1 (as stored) when there is none or it cannot be read."""
    if data[:2] != b"\xff\xd8":
        return 1
    pos, n = 2, len(data)
    while pos + 4 <= n and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xDA or marker == 0xD9:  # image data begins: no EXIF after this point
            return 1
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\x00\x00":
            return _tiff_orientation(data[pos + 10 : pos + 2 + length])
        pos += 2 + length
    return 1


def jpeg_header_read(data: bytes) -> bool:
    """Whether ``data`` (a file's first bytes) reaches the JPEG's image data, so holds every segment
    an EXIF orientation can be in (True too for what is not a JPEG: nothing more to read for it)."""
    if data[:2] != b"\xff\xd8":
        return True
    pos, n = 2, len(data)
    while pos + 4 <= n and data[pos] == 0xFF:
        if data[pos + 1] in (0xDA, 0xD9):
            return True
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return pos < n and data[pos] != 0xFF  # a broken header: reading on would not mend it


def _tiff_orientation(tiff: bytes) -> int:
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for k in range(count):
            tag, kind, _, value = struct.unpack_from(order + "HHI4s", tiff, ifd + 2 + 12 * k)
            if tag == _TAG and kind == 3:  # SHORT, stored in the first two bytes of the value field
                (orientation,) = struct.unpack_from(order + "H", value)
                return orientation if 1 <= orientation <= 8 else 1
    except (KeyError, struct.error):
        pass
    return 1


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """``image`` (..., H, W) turned upright for an EXIF ``orientation``, as ``ImageOps.exif_transpose``."""
    if orientation == 2:  # mirrored
        return image.flip(-1)
    if orientation == 3:  # upside down
        return image.flip(-2, -1)
    if orientation == 4:  # mirrored, upside down
        return image.flip(-2)
    if orientation == 5:  # PIL's TRANSPOSE
        return image.transpose(-2, -1)
    if orientation == 6:  # PIL's ROTATE_270: a quarter turn clockwise
        return image.rot90(-1, dims=(-2, -1))
    if orientation == 7:  # PIL's TRANSVERSE
        return image.flip(-2, -1).transpose(-2, -1)
    if orientation == 8:  # PIL's ROTATE_90: a quarter turn counter-clockwise
        return image.rot90(1, dims=(-2, -1))
    return image


def upright(image: Image.Image) -> Image.Image:
    """A PIL image turned upright by its EXIF orientation (any format PIL reads EXIF from)."""
    from PIL import ImageOps

    if image.getexif().get(_TAG, 1) in range(2, 9):  # exif_transpose would copy even an upright image
        return ImageOps.exif_transpose(image)
    return image
