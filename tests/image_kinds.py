"""Image files of every awkward kind, made on the fly for loader and robustness tests."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _photo(seed: int, w: int, h: int) -> np.ndarray:
    """A smooth, photo-like RGB array (gradients + blobs), so resizing behaves as on real images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(0.5, 3, 2).tolist() + [rng.uniform(0, 6)]
        img[..., c] = 127 + 100 * np.sin(xx / w * fx * 6.28 + ph) * np.cos(yy / h * fy * 6.28)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_good_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Good images in odd modes and sizes that every loader must decode (to RGB)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    sizes = [(96, 64), (64, 96), (300, 200), (57, 131), (224, 224), (500, 375)]
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        rgb = _photo(seed * 1000 + i, w, h)
        kind = i % 6
        if kind == 0:
            p = folder / f"img{i:03d}_rgb.jpg"
            Image.fromarray(rgb).save(p, quality=92)
        elif kind == 1:
            p = folder / f"img{i:03d}_gray.jpg"
            Image.fromarray(rgb).convert("L").save(p, quality=92)
        elif kind == 2:
            p = folder / f"img{i:03d}_rgba.png"
            Image.fromarray(rgb).convert("RGBA").save(p)
        elif kind == 3:
            p = folder / f"img{i:03d}_palette.png"
            Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(p)
        elif kind == 4:
            p = folder / f"img{i:03d}_rgb.png"
            Image.fromarray(rgb).save(p)
        else:
            p = folder / f"img{i:03d}_gray.png"
            Image.fromarray(rgb).convert("L").save(p)
        out.append(p)
    return out


def write_png16(path: Path, seed: int = 0, w: int = 80, h: int = 60) -> Path:
    """A 16-bit grayscale PNG."""
    arr = _photo(seed, w, h)[..., 0].astype(np.uint16) * 257
    Image.fromarray(arr).save(path)  # uint16 → mode I;16
    return path


def write_cmyk_jpeg(path: Path, seed: int = 0) -> Path:
    Image.fromarray(_photo(seed, 120, 90)).convert("CMYK").save(path, quality=92)
    return path


def write_bad_files(folder: Path, good_source: np.ndarray | None = None) -> dict[str, str]:
    """Files that cannot be decoded: name → kind. All carry image extensions."""
    folder.mkdir(parents=True, exist_ok=True)
    bad = {}
    (folder / "zero_bytes.jpg").write_bytes(b"")
    bad["zero_bytes.jpg"] = "zero-byte"
    full = folder / "_tmp_full.jpg"
    Image.fromarray(_photo(7, 200, 150)).save(full, quality=90)
    data = full.read_bytes()
    full.unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    bad["truncated.jpg"] = "truncated JPEG"
    (folder / "not_an_image.jpg").write_bytes(b"this is a text file, not a JPEG\n" * 20)
    bad["not_an_image.jpg"] = "text with an image extension"
    (folder / "huge_header.png").write_bytes(_png_header_only(200_000, 200_000))
    bad["huge_header.png"] = "huge dimensions in the header"
    return bad


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w×h pixels with (almost) no pixel data: a decompression bomb."""

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


# ---- damaged copies of real photographs (issue 10): what a scraped or half-downloaded dataset holds

HTML_ERROR_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
    b"<body><h1>Not Found</h1><p>The requested URL was not found on this server.</p></body></html>\n"
)


def _scan_start(jpeg: bytes) -> int:
    sos = jpeg.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big")


def damaged_copy(kind: str, photo: bytes, seed: int = 0) -> bytes:
    """``photo`` (a real JPEG) damaged as ``kind``: text, empty, truncated, garbled, html (a broken
    container), no_tables (an intact container the decoders refuse), or bitflips (bits flipped inside
    the compressed data, no marker created: decodable, see featstore/loaders/containers.py)."""
    rng = np.random.default_rng(seed)
    start = _scan_start(photo)
    if kind == "text":
        return b"hello world!\n"  # 13 bytes, as in the issue
    if kind == "empty":
        return b""
    if kind == "html":
        return HTML_ERROR_PAGE
    if kind == "truncated":
        return photo[: start + (len(photo) - start) // 3]
    if kind == "garbled":  # a run of random bytes over the middle of the compressed data
        data = bytearray(photo)
        a = start + (len(photo) - start) // 3
        data[a : a + (len(photo) - start) // 3] = rng.integers(0, 256, (len(photo) - start) // 3, dtype=np.uint8).tobytes()
        return bytes(data)
    if kind == "no_tables":  # intact structure, no quantization tables: every decoder refuses it
        out, pos = bytearray(photo[:2]), 2
        while photo[pos + 1] != 0xDA:
            length = int.from_bytes(photo[pos + 2 : pos + 4], "big")
            if photo[pos + 1] != 0xDB:
                out += photo[pos : pos + 2 + length]
            pos += 2 + length
        return bytes(out + photo[pos:])
    if kind == "bitflips":
        data = bytearray(photo)
        for i in rng.choice(np.arange(start + 16, len(photo) - 16), size=12, replace=False).tolist():
            if 0xFF not in (data[i - 1], data[i], data[i] ^ 0x10):  # no 0xFF made or unmade: markers stay as they were
                data[i] ^= 0x10
        return bytes(data)
    raise ValueError(kind)


BROKEN_CONTAINERS = ("text", "empty", "truncated", "garbled", "html")
