"""Bad files, cache hits, locks, write failures, non-finite features, trusted checkpoints."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from featstore import extraction as extract_module
from featstore.errors import FeatstoreError, UsageError
from featstore.extraction import ExtractConfig, extract
from featstore.store import PROGRESS, FeatureStore
from featstore.store.lock import StoreLock
from tests.conftest import dali_or_skip
from tests.image_kinds import write_bad_files, write_cmyk_jpeg, write_good_images, write_png16

FAST = dict(image_size=32, resize=32, workers=0, batch_size=8, dtype="float32")


def _config(dataset, out, **kw) -> ExtractConfig:
    return ExtractConfig(model="resnet18", dataset=str(dataset), out=str(out), random_init=True, **{**FAST, **kw})


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """Good images of every decodable kind, and bad files, mixed in class folders; plus the good ones alone."""
    base = tmp_path_factory.mktemp("messy")
    mixed, good_only = base / "mixed", base / "good"
    for root in (mixed, good_only):
        write_good_images(root / "a", 6, seed=1)
        write_good_images(root / "b", 6, seed=2)
        write_png16(root / "a" / "sixteen.png")
        write_cmyk_jpeg(root / "b" / "cmyk.jpg")
        Image.fromarray(np.full((40, 30, 3), 90, np.uint8)).save(root / "b" / "png_named.JPEG", format="PNG")
    bad = write_bad_files(mixed / "a")
    return mixed, good_only, bad


_on_cuda = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.slow
@pytest.mark.parametrize(
    "loader, device",
    [
        ("torch", "cpu"),
        ("dali", "cpu"),
        ("nvjpeg", "cpu"),
        *(pytest.param(name, "cuda", marks=_on_cuda) for name in ("torch", "dali", "nvjpeg")),
    ],
)
def test_bad_files_are_recorded_and_good_rows_match(loader, device, messy, tmp_path, capsys):
    if loader == "dali":
        dali_or_skip()
    mixed, good_only, bad = messy
    result = extract(_config(mixed, tmp_path / "mixed.zarr", loader=loader, device=device), progress=False)
    extract(_config(good_only, tmp_path / "good.zarr", loader=loader, device=device), progress=False)
    store = FeatureStore.open(tmp_path / "mixed.zarr")
    assert store.complete and result.invalid == len(bad) and f"{len(bad)} invalid" in result.summary()
    paths, valid = store.paths("all"), store.valid("all")
    bad_paths = {f"a/{name}" for name in bad}
    assert {p for p, ok in zip(paths, valid) if not ok} == bad_paths
    recorded = {r["path"]: r["reason"] for r in store.invalid_rows("all")}
    assert set(recorded) == bad_paths and all(recorded.values())
    feats = store.features("all", "pool")
    assert np.isnan(feats[~valid]).all() and np.isfinite(feats[valid]).all()
    good = FeatureStore.open(tmp_path / "good.zarr")
    assert list(good.paths("all")) == [p for p in paths if p not in bad_paths]
    # same images, batched with placeholders or without: equal up to float summation order (and,
    # on CUDA, bf16 autocast whose kernels may differ with the batch's contents)
    tol = 1e-4 if device == "cpu" else 3e-2
    np.testing.assert_allclose(feats[valid], good.features("all", "pool"), rtol=tol, atol=tol)
    # `featstore info` shows them
    from featstore.cli import cli
    from featstore.console import run_cli

    capsys.readouterr()
    assert run_cli(cli, "featstore", ["info", str(tmp_path / "mixed.zarr")]) == 0
    text = capsys.readouterr().out
    assert all(p in text for p in bad_paths)


def test_strict_stops_at_first_bad_file(messy, tmp_path):
    mixed, _, _ = messy
    with pytest.raises(FeatstoreError) as e:
        extract(_config(mixed, tmp_path / "s.zarr", loader="torch", strict=True), progress=False)
    assert "cannot decode" in e.value.message and "--strict" in e.value.hint
    assert not FeatureStore.open(tmp_path / "s.zarr").complete  # resumable, nothing claimed done


@pytest.mark.slow
def test_cache_hit_builds_no_model(small_folder, tmp_path, monkeypatch):
    out = tmp_path / "c.zarr"
    extract(_config(small_folder, out, loader="torch"), progress=False)

    def forbidden(*a, **k):
        raise AssertionError("the encoder was built on a cache hit")

    monkeypatch.setattr(extract_module, "build_encoder", forbidden)
    result = extract(_config(small_folder, out, loader="torch"), progress=False)
    assert result.status == "up to date" and "up to date" in result.summary()


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(image_size=48, resize=48), "preprocessing"),
        (dict(interpolation="bicubic"), "preprocessing"),
        (dict(dtype="float16"), "dtype"),
        pytest.param(dict(views=["pool"]), "views", marks=pytest.mark.slow),  # measured over 1.5 s (the others about 1 s)
    ],
)
def test_changed_key_is_refused_naming_fields(small_folder, tmp_path, change, field):
    out = tmp_path / "k.zarr"
    extract(_config(small_folder, out, loader="torch"), progress=False)
    with pytest.raises(UsageError) as e:
        extract(_config(small_folder, out, loader="torch", **change), progress=False)
    assert field in e.value.message and "--overwrite" in e.value.hint


@pytest.mark.slow
def test_changed_weights_are_refused(small_folder, tmp_path):
    import torchvision

    w1, w2 = tmp_path / "w1.pth", tmp_path / "w2.pth"
    for seed, path in ((1, w1), (2, w2)):
        torch.manual_seed(seed)
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    out = tmp_path / "w.zarr"
    base = dict(model="resnet18", dataset=str(small_folder), out=str(out), loader="torch", **FAST)
    extract(ExtractConfig(weights=str(w1), **base), progress=False)
    with pytest.raises(UsageError, match="weights_sha256"):
        extract(ExtractConfig(weights=str(w2), **base), progress=False)


@pytest.mark.slow
def test_second_writer_is_refused_and_stale_lock_taken_over(small_folder, tmp_path):
    out = tmp_path / "l.zarr"
    # a store whose extraction is "running": incomplete, locked by a live process on this host
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _make_incomplete(small_folder, out)
        lock = out / PROGRESS / "lock.json"
        lock.write_text(f'{{"pid": {live.pid}, "host": "{socket.gethostname()}", "since": 0}}')
        with pytest.raises(FeatstoreError) as e:
            extract(_config(small_folder, out, loader="torch"), progress=False)
        assert f"pid {live.pid}" in e.value.message and socket.gethostname() in e.value.message
    finally:
        live.kill()
        live.wait()
    warnings = []
    result = extract(_config(small_folder, out, loader="torch"), log=warnings.append, progress=False)
    assert result.status == "resumed" and FeatureStore.open(out).complete
    assert any("stale lock" in w and str(live.pid) in w for w in warnings)


def _make_incomplete(dataset, out):
    """Run an extraction that fails after its first unit, leaving an incomplete store."""
    original = FeatureStore.write_unit
    calls = {"n": 0}

    def failing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *a, **k)

    FeatureStore.write_unit = failing
    try:
        with pytest.raises(FeatstoreError) as e:
            extract(_config(dataset, out, loader="torch", chunk_rows=8), progress=False)
    finally:
        FeatureStore.write_unit = original
    return e.value


@pytest.mark.slow
def test_disk_full_is_one_error_and_resumable(small_folder, tmp_path):
    out = tmp_path / "full.zarr"
    error = _make_incomplete(small_folder, out)
    assert "disk full" in error.message and "resume" in error.hint
    store = FeatureStore.open(out)
    assert not store.complete and 0 < len(store.pending_units()) < len(store.units("train")) + len(store.units("val"))
    result = extract(_config(small_folder, out, loader="torch", chunk_rows=8), progress=False)
    assert result.status == "resumed"
    fresh = tmp_path / "fresh.zarr"
    extract(_config(small_folder, fresh, loader="torch", chunk_rows=8), progress=False)
    for split in ("train", "val"):
        np.testing.assert_array_equal(FeatureStore.open(out).features(split, "pool"), FeatureStore.open(fresh).features(split, "pool"))


def test_float16_overflow_is_reported(small_folder, tmp_path):
    model_file = tmp_path / "loud.py"
    model_file.write_text(
        textwrap.dedent("""
        import torch
        class Loud(torch.nn.Module):
            def forward(self, x):
                return x.mean(dim=(2, 3)) * 0 + 1e6   # finite in float32, Inf in float16
        def build():
            return Loud()
    """)
    )
    result = extract(
        ExtractConfig(
            model=f"{model_file}:build",
            dataset=str(small_folder),
            out=str(tmp_path / "o.zarr"),
            loader="torch",
            workers=0,
            image_size=32,
            resize=32,
        ),
        progress=False,
    )
    assert result.nonfinite == 24 and "--dtype float32" in result.summary()
    ok = extract(
        ExtractConfig(
            model=f"{model_file}:build",
            dataset=str(small_folder),
            out=str(tmp_path / "o32.zarr"),
            loader="torch",
            workers=0,
            image_size=32,
            resize=32,
            dtype="float32",
        ),
        progress=False,
    )
    assert ok.nonfinite == 0
    store = FeatureStore.open(tmp_path / "o32.zarr")
    assert store.views == {"features": 3}
    np.testing.assert_allclose(store.features("train", "features"), 1e6)


def test_user_builder_with_named_views(small_folder, tmp_path):
    model_file = tmp_path / "mine.py"
    model_file.write_text(
        textwrap.dedent("""
        import torch
        class Two(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = torch.nn.Conv2d(3, 8, 3)
            def forward(self, x):
                y = self.conv(x)
                return {"mean": y.mean(dim=(2, 3)), "max": y.amax(dim=(2, 3))}
        def build():
            torch.manual_seed(0)
            return Two()
    """)
    )
    extract(
        ExtractConfig(
            model=f"{model_file}:build",
            dataset=str(small_folder),
            out=str(tmp_path / "u.zarr"),
            loader="torch",
            workers=0,
            image_size=32,
            resize=32,
            views=["max"],
        ),
        progress=False,
    )
    store = FeatureStore.open(tmp_path / "u.zarr")
    assert store.views == {"max": 8} and store.attrs["encoder"]["family"] == "custom"


class _PickledExtra:
    pass


def test_trust_checkpoint_allows_pickled_extras(tmp_path):
    import argparse

    import torchvision

    from tests.helpers import read_checkpoint

    sd = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "with_args.pth"
    # argparse.Namespace is allowed as data (tests/test_ckpt_cli.py); a class of one's own is code: an inert
    # placeholder stands in for it (tests/test_safe_unpickle.py), or under trust the class itself is unpickled
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=0.1), "extra": _PickledExtra()}, path)
    from featstore.models.checkpoints import load_checkpoint

    assert load_checkpoint(path).placeholders == ["tests.test_robustness._PickledExtra"]
    assert set(read_checkpoint(path)) == set(sd)
    assert load_checkpoint(path, trust=True).placeholders == []
    assert set(read_checkpoint(path, trust=True)) == set(sd)


def test_lock_object_round_trip(tmp_path):
    lock = StoreLock(tmp_path / "lock.json").acquire()
    assert lock.holder()["pid"] == os.getpid()
    with pytest.raises(FeatstoreError):
        # our own live pid holds it: refused
        StoreLock(tmp_path / "lock.json").acquire()
    lock.release()
    assert not (tmp_path / "lock.json").exists()


def test_builder_by_module_path_and_its_errors(small_folder, tmp_path, monkeypatch):
    pkg = tmp_path / "mymodels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        textwrap.dedent("""
        import torch
        def build():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        not_callable = 3
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    extract(
        ExtractConfig(
            model="mymodels.nets:build",
            dataset=str(small_folder),
            out=str(tmp_path / "m.zarr"),
            loader="torch",
            workers=0,
            image_size=32,
            resize=32,
        ),
        progress=False,
    )
    store = FeatureStore.open(tmp_path / "m.zarr")
    assert store.views == {"features": 4} and store.attrs["encoder"]["arch"] == "user:mymodels.nets:build"
    for spec, needle in (
        ("mymodels.nets:missing", "has no callable 'missing'"),
        ("mymodels.nets:not_callable", "has no callable 'not_callable'"),
        ("mymodels.nope:build", "cannot import 'mymodels.nope'"),
        (f"{tmp_path / 'nope.py'}:build", "not found"),
    ):
        with pytest.raises(UsageError, match=needle):
            extract(ExtractConfig(model=spec, dataset=str(small_folder), out=str(tmp_path / "x.zarr"), loader="torch"), progress=False)
    assert not (tmp_path / "x.zarr").exists()


def test_cache_key_separates_cpu_and_cuda_features():
    from featstore.datasets import resolve_dataset
    from featstore.job import cache_fields, cache_key
    from featstore.models.encoders import resolve_encoder

    spec = resolve_encoder("resnet18", random_init=True)
    manifest = resolve_dataset("digits")
    cpu = cache_fields(spec, "torch", None, "float16", manifest, torch.device("cpu"))
    gpu = cache_fields(spec, "torch", None, "float16", manifest, torch.device("cuda"))
    assert cpu["compute"] == "cpu-fp32" and gpu["compute"] == "cuda-bf16"
    assert cache_key(cpu) != cache_key(gpu)
    assert cache_key(cpu) == cache_key(cache_fields(spec, "torch", None, "float16", manifest, torch.device("cpu")))
