"""Issue 22, items 1 and 2: the file checks run once per file, off the hot path, cached; DALI reads
its own files and gives exactly what the bytes-fed pipeline gave."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featstore.loaders import verdicts as verdicts_module
from featstore.loaders.decode import read_encoded
from featstore.loaders.verdicts import Verdict, check_files, read_verified
from featstore.preprocess import Preprocess
from tests.conftest import dali_or_skip
from tests.image_kinds import write_bad_files, write_cmyk_jpeg, write_good_images

CPU = torch.device("cpu")
PRE = Preprocess(224, 256, "bicubic")


@pytest.fixture
def mixed(tmp_path) -> list[str]:
    """Good JPEGs and PNGs, a BMP and a WebP (decoded by PIL for DALI), and every kind of bad file."""
    files = [str(p) for p in write_good_images(tmp_path / "good", 8)]
    files.append(str(write_cmyk_jpeg(tmp_path / "good" / "cmyk.jpg")))
    for fmt in ("BMP", "WEBP"):
        path = tmp_path / "good" / f"other.{fmt.lower()}"
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(path, format=fmt)
        files.append(str(path))
    bad = write_bad_files(tmp_path / "bad")
    files += [str(tmp_path / "bad" / n) for n in sorted(bad)]
    files.append(str(tmp_path / "bad" / "missing.jpg"))
    return files


def test_verdicts_say_what_read_encoded_says_and_keep_the_header_size(mixed):
    verdicts, report = check_files(mixed, range(len(mixed)), None, 2)
    assert report.files == report.checked == len(mixed) and report.cached_at is None
    for row, path in enumerate(mixed):
        v = verdicts[row]
        assert v is not None
        data, reason = read_encoded(path)
        assert v.problem == reason, path
        assert read_verified(path, v) == (data, reason)
        if data is not None and v.kind in ("jpeg", "png"):
            with Image.open(path) as img:
                assert (v.width, v.height) == img.size, path
    kinds = [verdicts[r].kind for r in range(len(mixed))]  # type: ignore[union-attr]
    # BMP, WebP, the CMYK JPEG (PIL's pixels for DALI) and the text file (PIL decides about other formats when
    # decoding); three bad files and the missing one
    assert kinds.count("other") == 4 and kinds.count("") == 4


def test_a_rerun_checks_nothing_and_a_changed_file_is_checked_again(mixed, tmp_path, monkeypatch):
    cache = tmp_path / "checks.sqlite"
    first, report = check_files(mixed, range(len(mixed)), cache, 2)
    assert report.checked == len(mixed) and report.cached_at == cache and "files/s" in report.line()

    calls: list[str] = []
    real = verdicts_module.check_file
    monkeypatch.setattr(verdicts_module, "check_file", lambda p: calls.append(p) or real(p))
    again, report = check_files(mixed, range(len(mixed)), cache, 2)
    missing = mixed[-1]  # an unreadable file's verdict is not cached: it is the one file looked at again
    assert calls == [missing] and report.checked == 1
    assert [again[r] for r in range(len(mixed))] == [first[r] for r in range(len(mixed))]

    calls.clear()
    changed = mixed[0]
    Path(changed).write_bytes(Path(changed).read_bytes()[:300])  # truncated
    third, report = check_files(mixed, range(len(mixed)), cache, 2)
    assert sorted(calls) == sorted([changed, missing])
    assert third[0] is not None and third[0].problem == read_encoded(changed)[1] != ""


def test_only_the_rows_asked_for_are_checked(mixed):
    verdicts, report = check_files(mixed, [1, 3], None, 1)
    assert report.files == 2 and verdicts[1] is not None and verdicts[3] is not None
    assert verdicts[0] is None and verdicts[2] is None


@pytest.mark.slow
def test_process_pool_gives_the_thread_pools_verdicts(mixed, monkeypatch):
    threads, _ = check_files(mixed, range(len(mixed)), None, 2)
    monkeypatch.setattr(verdicts_module, "PROCESS_POOL_FROM", 1)
    processes, _ = check_files(mixed, range(len(mixed)), None, 2)
    assert [processes[r] for r in range(len(mixed))] == [threads[r] for r in range(len(mixed))]


def test_a_damaged_cache_is_started_again(mixed, tmp_path):
    cache = tmp_path / "checks.sqlite"
    cache.write_bytes(b"not a database at all" * 100)
    verdicts, report = check_files(mixed, range(len(mixed)), cache, 1)
    assert report.cached_at == cache and report.checked == len(mixed)
    _, report = check_files(mixed, range(len(mixed)), cache, 1)
    assert report.checked == 1  # only the missing file


def test_dali_problem_adds_the_parsers_refusal():
    assert Verdict("", "jpeg", 1, 1, 0, 10, 0).dali_problem() == "JPEG header that DALI's decoder cannot parse"
    assert Verdict("", "png", 1, 1, 1, 10, 0).dali_problem() == ""
    assert Verdict("empty file (0 bytes)", "", 0, 0, -1, 0, 0).dali_problem() == "empty file (0 bytes)"


# ---------------------------------------------------------------------------------------- DALI


def _bytes_fed(loader, files: list[str]) -> torch.Tensor:
    """The pipeline before issue 22: bytes read in Python and fed to DALI (other formats as PIL's PNG), one image at a time."""
    import io

    from featstore.loaders.containers import image_format
    from featstore.loaders.decode import decode_rgb

    out = []
    for path in files:
        data, _ = read_encoded(path)
        assert data is not None
        if image_format(data) == "other":
            buf = io.BytesIO()
            decode_rgb(data).save(buf, format="PNG", compress_level=1)
            data = buf.getvalue()
        pipe = loader._bytes_pipeline([np.frombuffer(data, dtype=np.uint8)])
        (images,) = pipe.run()
        out.append(loader._to_torch(images).clone())
        del pipe
    return torch.cat(out)


def test_dali_reading_its_own_files_is_bitwise_the_bytes_fed_pipeline(mixed, real_photos, monkeypatch):
    """Also: with verdicts given, no file is checked while batches are made (the checks left the hot path)."""
    dali_or_skip()
    from featstore.loaders import containers
    from featstore.loaders.dali import DaliLoader

    photos = sorted(str(p) for p in real_photos.rglob("*.JPEG"))[:10]
    files = photos + mixed
    verdicts, _ = check_files(files, range(len(files)), None, 2)
    refused = {r for r in range(len(files)) if verdicts[r].dali_problem()}  # type: ignore[union-attr]
    text = next(r for r, f in enumerate(files) if f.endswith("not_an_image.jpg"))  # "other": PIL refuses it
    good = sorted(set(range(len(files))) - refused - {text})
    plan = [np.arange(0, 7), np.arange(7, 12), np.arange(12, len(files))]  # sizes 7, 5, rest: padded to the largest

    def no_checks(*args):
        raise AssertionError("a file was checked while the batches were made")

    loader = DaliLoader(PRE, CPU, 2)
    with monkeypatch.context() as m:
        m.setattr(containers, "check_jpeg", no_checks)
        m.setattr(containers, "check_png", no_checks)
        batches = list(loader.batches(files, plan, verdicts))
    assert [b.rows.tolist() for b in batches] == [p.tolist() for p in plan]
    errors = {r: e for b in batches for r, e in b.errors.items()}
    assert sorted(errors) == sorted(refused | {text})
    assert {r: e for r, e in errors.items() if r != text} == {r: verdicts[r].dali_problem() for r in refused}  # type: ignore[union-attr]
    assert errors[text].startswith("not an image: a text file")
    images = torch.cat([b.images for b in batches])
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(images[good], _bytes_fed(loader, [files[r] for r in good]))
    assert (images[sorted(errors)] == 0).all()
    # and without verdicts (the loader checks the files itself) the same
    again = torch.cat([b.images for b in loader.batches(files, plan)])
    assert torch.equal(again, images)


def test_dali_batch_of_only_bad_files_and_a_bisected_batch(tmp_path, real_photos):
    """Padding-only DALI batches yield placeholders; a file that parses but does not decode is found by bisection."""
    dali_or_skip()
    from featstore.loaders.dali import DaliLoader
    from tests.image_kinds import damaged_copy

    photos = sorted(str(p) for p in real_photos.rglob("*.JPEG"))[:6]
    broken = tmp_path / "no_tables.JPEG"
    broken.write_bytes(damaged_copy("no_tables", Path(photos[0]).read_bytes(), seed=3))
    text = tmp_path / "text.JPEG"
    text.write_text("hello\n")
    files = [*photos, str(broken), str(text), str(text)]
    plan = [np.array([7, 8]), np.array([0, 6, 1, 2]), np.array([3, 4, 5])]
    batches = list(DaliLoader(PRE, CPU, 2).batches(files, plan))
    assert sorted(batches[0].errors) == [7, 8] and (batches[0].images == 0).all()
    assert list(batches[1].errors) == [6] and batches[1].errors[6].startswith("DALI could not decode")
    assert "Error in CPU operator" not in batches[1].errors[6]  # the decoder's own words, not the pipeline's first line
    alone = torch.cat([b.images for b in DaliLoader(PRE, CPU, 2).batches(photos, [np.arange(6)])])
    assert torch.equal(batches[1].images[[0, 2, 3]], alone[[0, 1, 2]])
    assert torch.equal(batches[2].images, alone[3:])


def test_extraction_logs_the_check_rate_and_a_second_store_checks_nothing(small_folder, tmp_path):
    import shutil

    from featstore.extraction import ExtractConfig, extract

    data = tmp_path / "data"  # a folder of its own: the session's featstore home may know small_folder's files
    shutil.copytree(small_folder, data)
    builder = tmp_path / "tiny.py"
    builder.write_text("import torch\ndef build():\n    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())\n")
    logs: list[list[str]] = []
    for name in ("a", "b"):
        lines: list[str] = []
        config = ExtractConfig(
            model=f"{builder}:build",
            dataset=str(data),
            out=str(tmp_path / f"{name}.zarr"),
            loader="torch",
            device="cpu",
            workers=0,
            image_size=32,
            resize=32,
        )
        extract(config, log=lines.append, progress=False)
        logs.append([ln for ln in lines if ln.startswith("file checks")])
    assert len(logs[0]) == 2 and all("files/s" in ln for ln in logs[0]), logs[0]  # train and val
    assert logs[1] and all("unchanged since their check" in ln for ln in logs[1]), logs[1]
    assert os.listdir(Path(os.environ["FEATSTORE_HOME"]) / "checks")


def test_dali_batches_of_a_resumed_plan_are_bitwise_those_of_the_full_plan(real_photos):
    """What a resumed extraction relies on: a batch's pixels do not depend on the batches before it."""
    dali_or_skip()
    from featstore.loaders.dali import DaliLoader

    files = sorted(str(p) for p in real_photos.rglob("*.JPEG"))[:15]
    full = [np.arange(0, 6), np.arange(6, 12), np.arange(12, 15)]
    first = list(DaliLoader(PRE, CPU, 2).batches(files, full))
    resumed = list(DaliLoader(PRE, CPU, 2).batches(files, full[1:]))
    for a, b in zip(first[1:], resumed):
        assert a.rows.tolist() == b.rows.tolist() and torch.equal(a.images, b.images)


def _jpeg_with(rgb: np.ndarray, segments: bytes) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    return data[:2] + segments + data[2:]


def _app1_orientation(value: int, tiff_type: int) -> bytes:
    import struct

    field = struct.pack(">HH", value, 0) if tiff_type == 3 else struct.pack(">I", value)
    tiff = (
        b"MM" + struct.pack(">HI", 42, 8) + struct.pack(">H", 1) + struct.pack(">HHI", 0x0112, tiff_type, 1) + field + struct.pack(">I", 0)
    )
    payload = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def test_files_dali_would_decode_otherwise_are_handed_to_it_as_pils_pixels(tmp_path):
    """DALI inverted a CMYK JPEG without Adobe's marker (all black where PIL shows the photo), and
    read EXIF orientations otherwise than PIL (a PNG's eXIf chunk for the views' windows, a
    LONG-typed tag not at all): such files are decoded by PIL and given to DALI as PNGs ("other"),
    where the ordinary ones stay JPEG/PNG."""
    from featstore.loaders.verdicts import decodes_otherwise_in_dali

    rgb = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    cmyk = tmp_path / "cmyk.jpg"
    write_cmyk_jpeg(cmyk)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "o6.png", exif=exif.tobytes())
    Image.fromarray(rgb).save(tmp_path / "o1.png")
    files = {
        "cmyk.jpg": (cmyk.read_bytes(), True),
        "o6.png": ((tmp_path / "o6.png").read_bytes(), True),
        "o1.png": ((tmp_path / "o1.png").read_bytes(), False),
        "long_o6.jpg": (_jpeg_with(rgb, _app1_orientation(6, 4)), True),
        "short_o6.jpg": (_jpeg_with(rgb, _app1_orientation(6, 3)), False),  # DALI turns it as PIL does
        "plain.jpg": (_jpeg_with(rgb, b""), False),
    }
    for name, (data, otherwise) in files.items():
        (tmp_path / name).write_bytes(data)
        kind = "jpeg" if name.endswith(".jpg") else "png"
        assert decodes_otherwise_in_dali(data, kind) == otherwise, name
    names = list(files)
    verdicts, _ = check_files([str(tmp_path / n) for n in names], range(len(names)), None, 1)
    assert [verdicts[r].kind for r in range(len(names))] == [  # type: ignore[union-attr]
        "other" if files[n][1] else ("jpeg" if n.endswith(".jpg") else "png") for n in names
    ]


def test_dali_gives_pils_pixels_for_them(tmp_path):
    """The same files through DALI's CPU pipeline and the torch loader: the same pixels (the CMYK
    JPEG was all black under DALI, the LONG-typed orientation not turned)."""
    dali_or_skip()
    from featstore.loaders.dali import DaliLoader
    from featstore.loaders.dataloader import TorchLoader

    rgb = np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    write_cmyk_jpeg(tmp_path / "cmyk.jpg")
    (tmp_path / "long_o6.jpg").write_bytes(_jpeg_with(rgb, _app1_orientation(6, 4)))
    files = [str(tmp_path / "cmyk.jpg"), str(tmp_path / "long_o6.jpg")]
    pre = Preprocess(32, 32, "bilinear")
    cpu = torch.device("cpu")
    (t,) = TorchLoader(pre, cpu, 0).batches(files, [np.arange(2)])
    (d,) = DaliLoader(pre, cpu, 1).batches(files, [np.arange(2)])
    assert not t.errors and not d.errors
    levels = (t.images.float() - d.images.float()).abs() * torch.tensor(pre.std).view(1, 3, 1, 1) * 255
    assert levels.mean() < 1.0, levels.mean((1, 2, 3))


def test_the_views_windows_are_drawn_on_the_turned_size_behind_a_long_comment(tmp_path):
    """DALI's augmented views are cut from windows drawn on the image's upright size, read from the
    file's first 64 KiB: behind a 64 KiB comment the EXIF orientation was missed (the windows of a
    portrait photo drawn on its landscape size, and DALI's slice then failed)."""
    from featstore.loaders.dali import _upright_size
    from featstore.orientation import jpeg_header_read

    rgb = np.random.default_rng(2).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    comment = b"\xff\xfe" + (65535).to_bytes(2, "big") + b"x" * 65533
    data = _jpeg_with(rgb, comment + _app1_orientation(6, 3))
    (tmp_path / "o6.jpg").write_bytes(data)
    assert not jpeg_header_read(data[: 1 << 16]) and jpeg_header_read(data)
    assert _upright_size(str(tmp_path / "o6.jpg")) == (60, 40)  # (height, width) turned a quarter
    (tmp_path / "o1.jpg").write_bytes(_jpeg_with(rgb, comment))
    assert _upright_size(str(tmp_path / "o1.jpg")) == (40, 60)


def test_pils_warnings_about_a_files_metadata_stay_off_the_terminal(tmp_path):
    """An orientation tag with two values made PIL warn ("Metadata Warning, tag 274 had too many
    entries") on stderr, from the torch loader's decode and from the check: kept quiet, as the C
    decoders' diagnostics are. The bomb warning is still an error."""
    import struct
    import warnings

    from featstore.loaders.decode import decode_rgb
    from featstore.loaders.verdicts import decodes_otherwise_in_dali

    rgb = np.random.default_rng(3).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    entry = struct.pack(">HHI", 0x0112, 3, 2) + struct.pack(">HH", 6, 6)
    tiff = b"MM" + struct.pack(">HI", 42, 8) + struct.pack(">H", 1) + entry + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + tiff
    data = _jpeg_with(rgb, b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decode_rgb(data)
        decodes_otherwise_in_dali(data, "jpeg")
    assert [str(w.message) for w in caught] == []
