"""Is this file an intact JPEG or PNG? A structural check of the container, cheap next to decoding.

Every loader runs it before decoding, so that all of them call the same files invalid, for the same
reason, whatever their decoder tolerates:

- JPEG: SOI, well-formed marker segments up to the first scan, a frame header the decoders support,
  then the compressed data scanned for markers: only restart markers may appear inside a scan,
  only table/scan/comment/application segments between scans, and the data must end with EOI.
  So text and HTML named .jpg, truncated files and data with foreign markers inside (the usual
  result of garbling) are refused here. Damage that leaves the structure intact (flipped bits
  inside a scan) is decoded, with the decoder's best effort, by every loader alike: no decoder
  can tell it apart without decoding, and libjpeg, PIL and nvJPEG all accept it.
- PNG: signature, IHDR first with sane fields, every chunk inside the file with a correct CRC
  (libpng checks them, PIL does not: checking here keeps the loaders in agreement), up to IEND.
- Anything else is left to PIL (``image_format`` says "other").

It also keeps garbage away from DALI, whose CPU decoder can crash the process on a header it cannot
parse (see ``featstore/loaders/dali.py``).
"""

from __future__ import annotations

import re
import struct
import zlib
from typing import NamedTuple

JPEG_SOI = b"\xff\xd8"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# frame headers libjpeg-turbo decodes: baseline, extended, progressive, lossless, arithmetic
_SUPPORTED_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC9, 0xCA, 0xCB}
_UNSUPPORTED_SOF = {0xC5, 0xC6, 0xC7, 0xCD, 0xCE, 0xCF}  # hierarchical: libjpeg refuses them
_DHT, _DAC, _DQT, _DRI, _DNL, _SOS, _EOI, _COM = 0xC4, 0xCC, 0xDB, 0xDD, 0xDC, 0xDA, 0xD9, 0xFE
_TABLES = {_DHT, _DAC, _DQT, _DRI, _DNL, _COM} | set(range(0xE0, 0xF0))  # APPn
_STANDALONE = {0x01} | set(range(0xD0, 0xD8))  # TEM, RST0-7: no length field
_IN_HEADER = frozenset(_TABLES | {_SOS} | _SUPPORTED_SOF)
_BETWEEN_SCANS = frozenset(_TABLES | {_SOS})
# inside compressed data 0xFF is followed by 0x00 (a stuffed byte), RST0-7 or another 0xFF (fill);
# anything else is a marker that ends the scan (one regex search, at C speed; its cost: benchmarks/RESULTS.md)
_END_OF_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_PNG_BIT_DEPTHS = {0: {1, 2, 4, 8, 16}, 2: {8, 16}, 3: {1, 2, 4, 8}, 4: {8, 16}, 6: {8, 16}}


def image_format(data: bytes) -> str:
    """ "jpeg", "png" or "other", from the first bytes."""
    if data[:2] == JPEG_SOI:
        return "jpeg"
    if data[:8] == PNG_SIGNATURE:
        return "png"
    return "other"


class ContainerCheck(NamedTuple):
    problem: str  # why the data is not an intact JPEG/PNG; "" when it is one, or is another format
    size: tuple[int, int] | None  # (width, height) from the header of an intact JPEG/PNG, else None


def check_container(data: bytes) -> ContainerCheck:
    """Is ``data`` an intact JPEG/PNG, and how large is the image its header declares?"""
    kind = image_format(data)
    if kind == "jpeg":
        return check_jpeg(data)
    if kind == "png":
        return check_png(data)
    return ContainerCheck("", None)


def container_problem(data: bytes) -> str:
    """Why ``data`` is not an intact JPEG/PNG ("" when it is one, or is another format)."""
    return check_container(data).problem


def _broken(problem: str) -> ContainerCheck:
    return ContainerCheck(problem, None)


def describe_non_image(data: bytes) -> str:
    """A reason for bytes no decoder recognizes, naming text and HTML for what they are."""
    head = data[:64]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"not an image: unknown format (starts with {head[:8].hex(' ')})"
    if not text.strip() or any(c < " " and c not in "\t\r\n" for c in text):
        return f"not an image: unknown format (starts with {head[:8].hex(' ')})"
    what = "an HTML page" if text.lstrip().lower().startswith(("<!doctype html", "<html")) else "a text file"
    first = " ".join(text.split())[:40]
    return f"not an image: {what} (starts with {first!r})"


# ---------------------------------------------------------------------------------------- JPEG


def check_jpeg(data: bytes) -> ContainerCheck:
    """The check of a JPEG: what is wrong with it, or its size when it is structurally intact."""
    n = len(data)
    if data[:2] != JPEG_SOI:
        return _broken("not a JPEG (no start-of-image marker)")
    pos, size, in_scans = 2, None, False
    while True:
        if pos >= n:
            return _broken("truncated JPEG: no end-of-image marker" if in_scans else "truncated JPEG: the file ends inside its header")
        if data[pos] != 0xFF:
            return _broken(f"corrupt JPEG: expected a marker at byte {pos}")
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            return _broken("truncated JPEG: the file ends inside a marker")
        marker = data[pos]
        pos += 1
        if marker == _EOI:
            return ContainerCheck("", size) if in_scans else _broken("corrupt JPEG: end-of-image before any image data")
        if marker in _STANDALONE:
            continue
        if marker in _UNSUPPORTED_SOF and not in_scans:
            return _broken(f"unsupported JPEG: hierarchical frame (marker 0x{marker:02X})")
        if marker not in (_BETWEEN_SCANS if in_scans else _IN_HEADER):
            where = "between scans" if in_scans else "in the header"
            return _broken(f"corrupt JPEG: unexpected marker 0x{marker:02X} {where} (byte {pos - 2})")
        if pos + 2 > n:
            return _broken("truncated JPEG: the file ends inside a marker segment")
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2:
            return _broken(f"corrupt JPEG: marker 0x{marker:02X} has a length of {length}")
        if pos + length > n:
            if in_scans:  # a marker made of damaged image data, not a real one cut short
                return _broken(f"corrupt JPEG: marker 0x{marker:02X} with an impossible length in the image data (byte {pos - 2})")
            return _broken(f"truncated JPEG: the file ends inside a marker segment (0x{marker:02X})")
        segment = data[pos + 2 : pos + length]
        if marker in _SUPPORTED_SOF:
            problem = _frame_problem(segment)
            if problem:
                return _broken(problem)
            if size is None:  # the first frame header gives the image's size
                height, width = struct.unpack(">HH", segment[1:5])
                size = width, height
        pos += length
        if marker != _SOS:
            continue
        if size is None:
            return _broken("corrupt JPEG: image data before any frame header")
        if not segment or not 1 <= segment[0] <= 4 or len(segment) != 4 + 2 * segment[0]:
            return _broken("corrupt JPEG: malformed scan header")
        in_scans = True
        end = _END_OF_SCAN.search(data, pos)  # the scan's compressed data runs to the next marker
        if end is None:
            return _broken("truncated JPEG: the image data ends without an end-of-image marker")
        pos = end.start()


def jpeg_components(data: bytes) -> int:
    """The colour components of a JPEG's first frame header (1 gray, 3 YCbCr, 4 CMYK/YCCK); 0 when
    none is found before the image data."""
    pos, n = 2, len(data)
    while pos + 4 <= n and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in (_SOS, _EOI):
            return 0
        if marker in _SUPPORTED_SOF:
            return data[pos + 9] if pos + 9 < n else 0
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return 0


def _frame_problem(segment: bytes) -> str:
    if len(segment) < 6:
        return "corrupt JPEG: frame header too short"
    precision, height, width, components = struct.unpack(">BHHB", segment[:6])
    if len(segment) != 6 + 3 * components or components not in (1, 3, 4):
        return f"corrupt JPEG: frame header with {components} components"
    if precision not in (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16):
        return f"corrupt JPEG: {precision}-bit samples"
    if width == 0 or height == 0:
        return f"corrupt JPEG: frame of {width}x{height} pixels"
    for c in range(components):
        sampling = segment[7 + 3 * c]
        if not (1 <= sampling >> 4 <= 4 and 1 <= sampling & 15 <= 4):
            return "corrupt JPEG: invalid sampling factors in the frame header"
    return ""


# ----------------------------------------------------------------------------------------- PNG


def check_png(data: bytes) -> ContainerCheck:
    """The check of a PNG: what is wrong with it, or its size when its chunks are all present and
    intact up to IEND."""
    n = len(data)
    if data[:8] != PNG_SIGNATURE:
        return _broken("not a PNG (no signature)")
    pos, size, color, palette, idat, after_idat = 8, None, 0, False, False, False
    while True:
        if pos + 8 > n:
            return _broken("truncated PNG: no IEND chunk")
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        if length > 0x7FFFFFFF or not kind.isalpha():
            return _broken(f"corrupt PNG: malformed chunk header at byte {pos}")
        end = pos + 12 + length
        if end > n:
            return _broken(f"truncated PNG: the file ends inside a {kind.decode('ascii')} chunk")
        body = data[pos + 8 : pos + 8 + length]
        if zlib.crc32(kind + body) != int.from_bytes(data[pos + 8 + length : end], "big"):
            return _broken(f"corrupt PNG: CRC mismatch in the {kind.decode('ascii')} chunk")
        if size is None:
            if kind != b"IHDR" or length != 13:
                return _broken("corrupt PNG: the first chunk is not IHDR")
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            if not (0 < width < 2**31 and 0 < height < 2**31):
                return _broken(f"corrupt PNG: image of {width}x{height} pixels")
            if depth not in _PNG_BIT_DEPTHS.get(color, ()):
                return _broken(f"corrupt PNG: bit depth {depth} with color type {color}")
            size = width, height
        # what PIL decodes anyway, into black or garbage pixels, and DALI refuses (the PNG spec: a decoder must
        # reject them): both loaders call them invalid
        elif kind == b"IDAT":
            if after_idat:
                return _broken("corrupt PNG: its IDAT chunks are not consecutive")
            idat = True
        elif kind == b"PLTE":
            palette = True
        elif kind == b"IEND":
            if not idat:
                return _broken("corrupt PNG: no IDAT chunk (no image data)")
            if color == 3 and not palette:
                return _broken("corrupt PNG: a palette image without its PLTE chunk")
            return ContainerCheck("", size)
        elif kind[:1].isupper():  # a critical chunk this PNG version does not define (or a second IHDR)
            return _broken(f"corrupt PNG: {'a second IHDR chunk' if kind == b'IHDR' else 'unknown critical chunk ' + kind.decode('ascii')}")
        after_idat = idat and kind != b"IDAT"
        pos = end
