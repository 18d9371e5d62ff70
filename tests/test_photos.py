"""The photographs shipped for the tests are there, are what their README says, and give distinct views."""

from __future__ import annotations

import hashlib
import io

from PIL import Image

from tests.photos import PHOTO_DIR, SHIPPED, photo_jpegs


def test_shipped_photos_match_their_readme():
    readme = (PHOTO_DIR / "README.md").read_text()
    assert [p.name for p in SHIPPED] == ["china.jpg", "flower.jpg", "grace_hopper.jpg"]
    assert sum(p.stat().st_size for p in SHIPPED) < 1_000_000  # a few hundred KB, not a data set
    for p in SHIPPED:
        assert f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}" in readme
        with Image.open(p) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert f"{img.width} × {img.height}, {p.stat().st_size:,} B" in readme
    assert "CC BY 2.0" in readme and "public domain" in readme


def test_photo_crops_are_distinct_deterministic_224px_jpegs():
    a, b = photo_jpegs(24), photo_jpegs(24)
    assert a == b and len(set(a)) == 24
    for data in a:
        with Image.open(io.BytesIO(data)) as img:
            assert img.format == "JPEG" and img.size == (224, 224) and not img.info.get("progressive")
    assert photo_jpegs(5, originals=True)[:3] == [p.read_bytes() for p in SHIPPED]
