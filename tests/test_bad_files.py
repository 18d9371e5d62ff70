"""Issue 10, item 1: no input bytes take the process down, every loader calls the same files invalid.

Bad files ({text, empty, truncated, garbled, HTML page} named .JPEG) sit among real photographs at
the start, middle and end of full default batches (64). DALI's CPU decoder used to SIGSEGV on such
a batch (see featstore/loaders/dali.py), so extractions run in a subprocess: a crash is an exit
code here, not a dead test session.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featstore.loaders.containers import container_problem, image_format
from featstore.loaders.quiet import DecoderNoiseFilter, is_decoder_noise
from featstore.store import FeatureStore
from tests.conftest import dali_or_skip
from tests.image_kinds import BROKEN_CONTAINERS, damaged_copy, write_good_images
from tests.photos import photo_jpegs

REPO = Path(__file__).resolve().parent.parent
BATCH = 64
# position in the split → kind; batches of 64: start, middle, end, and all five kinds in a row
LAYOUT = {
    0: "text",
    1: "html",
    31: "empty",
    32: "garbled",
    33: "no_tables",
    62: "truncated",
    63: "text",
    64: "garbled",
    65: "text",
    66: "empty",
    67: "truncated",
    68: "garbled",
    69: "html",
    96: "html",
    100: "truncated",
    101: "no_tables",
    126: "empty",
    127: "garbled",
}
DECODABLE_DAMAGE = {10: "bitflips", 70: "bitflips", 110: "bitflips"}
ROWS = 128
NOISE_MARKS = ("Corrupt JPEG", "Premature end", "[ERROR]", "[WARNING]", "\x1b[", "libjpeg", "Segmentation", "Fatal Python")


def _photos(n: int) -> list[bytes]:
    """Real photo JPEGs: the ones shipped with the tests and crops of them (tests/photos.py)."""
    return photo_jpegs(n, originals=True)


def _pil_decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def messy_batches(tmp_path_factory) -> tuple[Path, set[str]]:
    """One class folder of 192 files whose sorted order is LAYOUT's: real photos and damaged copies."""
    root = tmp_path_factory.mktemp("batches") / "photos"
    (root / "c").mkdir(parents=True)
    photos = _photos(ROWS)
    bad = set()
    for i in range(ROWS):
        kind = LAYOUT.get(i) or DECODABLE_DAMAGE.get(i)
        data = damaged_copy(kind, photos[i], seed=i) if kind else photos[i]
        name = f"c/{i:04d}_{kind or 'photo'}.JPEG"
        (root / name).write_bytes(data)
        # the reference decoder (PIL) agrees with the intended label: a test of the damage itself
        assert _pil_decodes(data) == (i not in LAYOUT), name
        if i in LAYOUT:
            bad.add(name)
    return root, bad


def _extract(root: Path, out: Path, *extra: str, runner: tuple[str, ...] = ("-m", "featstore.cli")) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [
        sys.executable,
        *runner,
        "extract",
        "--model",
        "resnet18",
        "--random-init",
        "--dataset",
        str(root),
        "--out",
        str(out),
        "--image-size",
        "32",
        "--resize",
        "32",
        "--batch-size",
        str(BATCH),
        "--no-progress",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def _kind(path: str) -> str:
    return path.split("_", 1)[1].rsplit(".", 1)[0]


def _invalid(out: Path) -> dict[str, str]:
    store = FeatureStore.open(out)
    assert store.complete
    valid, paths = store.valid("all"), store.paths("all")
    recorded = {r["path"]: r["reason"] for r in store.invalid_rows("all")}
    assert set(recorded) == {p for p, ok in zip(paths, valid) if not ok}
    feats = store.features("all", "pool")
    assert np.isnan(feats[~valid]).all() and np.isfinite(feats[valid]).all()
    return recorded


@pytest.fixture(scope="module")
def default_run(messy_batches, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    dali_or_skip()
    root, _ = messy_batches
    out = tmp_path_factory.mktemp("default") / "dali.zarr"
    return out, _extract(root, out, "--loader", "dali")  # DALI: the loader whose decoder once crashed on such files


@pytest.mark.slow
def test_default_loader_survives_bad_files_in_full_batches_then_resume(messy_batches, default_run, tmp_path):
    root, bad = messy_batches
    out, run = default_run
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"{len(bad)} invalid" in run.stdout
    assert not [m for m in NOISE_MARKS if m in run.stderr], run.stderr[-2000:]
    invalid = _invalid(out)
    assert set(invalid) == bad
    assert FeatureStore.open(out).attrs["loader"] == "dali"
    kinds = {p: _kind(p) for p in invalid}
    words = {
        "text": "text file",
        "html": "HTML page",
        "empty": "empty",
        "truncated": "truncated",
        "garbled": "corrupt JPEG",
        "no_tables": "DALI could not decode",
    }  # the last passes the container check: DALI's batch is bisected
    for path, reason in invalid.items():
        assert words[kinds[path]] in reason, (path, reason)

    # killed after its first unit (batch 0, bad files at its start, middle and end), then resumed
    resumed = tmp_path / "resumed.zarr"
    killed = _extract(
        root, resumed, "--chunk-rows", "64", "--loader", "dali", runner=("-m", "tests.fault_runner", "kill-in-unit", "1", "--")
    )
    assert killed.returncode == -9
    store = FeatureStore.open(resumed)
    assert not store.complete and len(store.pending_units()) == 1
    again = _extract(root, resumed, "--chunk-rows", "64", "--loader", "dali")
    assert again.returncode == 0 and "resumed" in again.stdout, again.stderr[-2000:]
    assert _invalid(resumed) == invalid
    np.testing.assert_allclose(
        FeatureStore.open(resumed).features("all", "pool"), FeatureStore.open(out).features("all", "pool"), rtol=1e-3, atol=1e-3
    )


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["torch", "nvjpeg"])
def test_every_loader_calls_the_same_rows_invalid_for_the_same_reasons(messy_batches, default_run, tmp_path, loader):
    """The policy (featstore/loaders/containers.py): broken containers are invalid, structurally intact
    damage (bit flips) is decoded; the same rows and reasons as DALI, the default loader."""
    root, bad = messy_batches
    reference, first = default_run
    assert first.returncode == 0
    run = _extract(root, tmp_path / f"{loader}.zarr", "--loader", loader, "--workers", "1")
    assert run.returncode == 0, run.stderr[-2000:]
    assert not [m for m in NOISE_MARKS if m in run.stderr], run.stderr[-2000:]
    ours, default = _invalid(tmp_path / f"{loader}.zarr"), _invalid(reference)
    assert set(ours) == set(default) == bad
    # broken containers: the same reason; files only a decoder refuses: each decoder's own words
    assert {p: r for p, r in ours.items() if _kind(p) in BROKEN_CONTAINERS} == {
        p: r for p, r in default.items() if _kind(p) in BROKEN_CONTAINERS
    }
    assert all("could not" in r or "Error" in r for p, r in ours.items() if _kind(p) == "no_tables"), ours


def test_container_check_names_each_kind_and_passes_real_photos(tmp_path):
    photos = _photos(60)
    assert all(container_problem(p) == "" for p in photos)
    for i, photo in enumerate(photos[:10]):
        assert container_problem(damaged_copy("bitflips", photo, seed=i)) == ""
        assert container_problem(damaged_copy("garbled", photo, seed=i)).startswith("corrupt JPEG")
        assert container_problem(damaged_copy("truncated", photo, seed=i)).startswith("truncated JPEG")
    # the odd but valid kinds of tests/image_kinds.py: progressive, grayscale, CMYK, PNG modes
    files = write_good_images(tmp_path, 12)
    buf = io.BytesIO()
    Image.open(files[0]).save(buf, format="JPEG", progressive=True, quality=80)
    for data in [f.read_bytes() for f in files] + [buf.getvalue()]:
        assert image_format(data) in ("jpeg", "png") and container_problem(data) == ""
    png = files[2].read_bytes()
    assert container_problem(png[:-20]).startswith("truncated PNG")
    flipped = bytearray(png)
    flipped[len(png) // 2] ^= 1
    assert "CRC mismatch" in container_problem(bytes(flipped))
    assert container_problem(b"GIF89a....") == ""  # another format: PIL decides


def _png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    import zlib

    return b"\x89PNG\r\n\x1a\n" + b"".join(
        len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big") for kind, body in chunks
    )


def test_pngs_that_pil_decodes_into_garbage_are_refused_by_every_loader(tmp_path):
    """PIL decodes these into black or garbage pixels (a valid row of nonsense) where DALI refuses
    them; the PNG specification has a decoder reject them: every loader calls them invalid now."""
    import struct
    import zlib

    from featstore.loaders.decode import read_encoded

    raw = zlib.compress(b"".join(b"\x00" + bytes(4) for _ in range(4)))  # 4 rows of 4 palette pixels
    ihdr_p = (b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 3, 0, 0, 0))
    plte, idat, iend = (b"PLTE", bytes(range(12))), (b"IDAT", raw), (b"IEND", b"")
    good = _png([ihdr_p, plte, idat, iend])
    assert container_problem(good) == "" and Image.open(io.BytesIO(good)).size == (4, 4)
    cases = {
        "a palette image without its PLTE chunk": [ihdr_p, idat, iend],
        "no IDAT chunk": [ihdr_p, plte, iend],
        "unknown critical chunk ZzZz": [ihdr_p, plte, (b"ZzZz", b"x"), idat, iend],
        "its IDAT chunks are not consecutive": [ihdr_p, plte, (b"IDAT", raw[:5]), (b"tEXt", b"a\x00b"), (b"IDAT", raw[5:]), iend],
    }
    for why, chunks in cases.items():
        path = tmp_path / f"{why[:10]}.png"
        path.write_bytes(_png(chunks))
        assert why in container_problem(path.read_bytes()), why
        assert why in read_encoded(str(path))[1], why  # the torch loader's reason: the same


def test_container_check_refuses_whatever_dalis_parser_refuses():
    """DALI crashes on a header nvImageCodec cannot parse; the structural check alone must refuse
    every such header (the DALI loader also asks nvImageCodec, but only where it is installed)."""
    dali_or_skip()
    os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")
    nvimgcodec = pytest.importorskip("nvidia.nvimgcodec")

    def parses(data: bytes) -> bool:
        try:
            return nvimgcodec.CodeStream(data).width > 0
        except Exception:
            return False

    rng = np.random.default_rng(0)
    tried = refused = 0
    for photo in _photos(20):
        start = photo.index(b"\xff\xda") + 12
        for _ in range(40):
            data = bytearray(photo)
            cut = int(rng.integers(2, start + 40))
            mutation = int(rng.integers(3))
            if mutation == 0:
                data = data[:cut]  # truncated in or just after the header
            elif mutation == 1:
                data[cut] = int(rng.integers(256))  # one header byte changed
            else:
                del data[cut : cut + int(rng.integers(1, 8))]  # bytes lost
            data = bytes(data)
            tried += 1
            if container_problem(data):
                refused += 1
            else:
                assert parses(data), (cut, mutation)
    assert tried == 800 and refused > 300  # most such damage is caught structurally


def test_decoder_noise_is_dropped_and_everything_else_kept(capfd):
    from torchvision.io import ImageReadMode, decode_jpeg

    photo = _photos(1)[0]
    damaged = torch.frombuffer(bytearray(damaged_copy("bitflips", photo, seed=3)), dtype=torch.uint8)
    decode_jpeg(damaged, mode=ImageReadMode.RGB)  # libjpeg warns on fd 2, from C
    assert "Corrupt JPEG data" in capfd.readouterr().err  # so the filter below has something to drop
    with DecoderNoiseFilter():
        decode_jpeg(damaged, mode=ImageReadMode.RGB)
        os.write(2, b"\x1b[0;31m[ERROR] \x1b[0m[libjpeg_turbo_decoder] Could not decode jpeg code stream\n")
        print("progress: 10/20 rows", file=sys.stderr, flush=True)
        os.write(2, b"a C library's own message\n")
        os.write(2, b"\rbar 50%")
    err = capfd.readouterr().err
    assert err == "progress: 10/20 rows\na C library's own message\n\rbar 50%"
    assert is_decoder_noise(b"Premature end of JPEG file\n") and not is_decoder_noise(b"Corrupted my data\n")
    # OpenCV's logger, which nvImageCodec's PNG/TIFF decoders print through (it reached the terminal)
    assert is_decoder_noise(b"[ WARN:0@0.037] global grfmt_png.cpp:779 readFromStreamOrBuffer PNG input buffer is incomplete\n")
    assert is_decoder_noise(b"[ERROR:0@1.5] global loadsave.cpp:515 imdecode_ ...\n") and not is_decoder_noise(b"[1/3] rows\n")
