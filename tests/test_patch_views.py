"""Patch-token views (#24 item 1): (N, h, w, C) arrays of a ViT's final / last-four-layer patch
tokens, a CNN's last feature map and a user builder's (B, C, h, w) output; compressed, chunked by
rows, shown by `featstore info`, sized before extracting, exported to .h5, opened by xarray."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

from featstore.cli import cli
from featstore.console import run_cli
from featstore.extraction import ExtractConfig, extract
from featstore.store import FeatureStore

SMALL = dict(image_size=32, resize=32, loader="torch", workers=0, random_init=True)


def test_store_writes_and_reads_patch_rows_lazily(tmp_path):
    """The schema alone: a (h, w, C) view is presized, written per unit, read by chunks and selections."""
    from featstore.store import capped_chunk_rows

    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((10, 3, 2, 4)).astype(np.float16)
    store = FeatureStore.create(tmp_path / "s.zarr", splits={"train": ([f"{i}.png" for i in range(10)], np.zeros(10))},
                                views={"patch": (3, 2, 4), "cls": 4}, chunk_rows=4)  # fmt: skip
    for unit in store.units("train"):
        store.write_unit(unit, {"patch": tokens[unit.start : unit.stop], "cls": tokens[unit.start : unit.stop, 0, 0]}, np.ones(unit.rows))
    with pytest.raises(Exception, match="expected"):
        store.write_unit(store.units("train")[0], {"patch": tokens[:4, :2], "cls": tokens[:4, 0, 0]}, np.ones(4))
    store.finalize()
    store = FeatureStore.open(tmp_path / "s.zarr")
    patches = store.patches("train", "patch")
    assert patches.shape == (10, 3, 2, 4) and patches.chunk_rows == 4
    np.testing.assert_array_equal(patches.read(), tokens)
    rows = np.array([9, 0, 5, 4])
    np.testing.assert_array_equal(patches.select(rows).read(), tokens[rows])
    np.testing.assert_array_equal(patches[2:7, 1], tokens[2:7, 1])
    blocks = list(patches.chunks(3))
    assert [o for o, _ in blocks] == [0, 3, 6, 9]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), tokens)
    # 8192 rows of 16×16×384 float16 would be 800 MB per unit: capped near 64 MiB
    assert capped_chunk_rows(8192, {"patch": (16, 16, 384), "cls": 384}, "float16") == 341
    assert capped_chunk_rows(8192, {"cls": 384}, "float16") == 8192


class CountingArray:
    """A stored array that counts the row ranges read from it (instrumentation, not a stand-in:
    every read goes to the real zarr array)."""

    def __init__(self, array):
        self.array, self.reads = array, []
        self.shape, self.dtype, self.chunks = array.shape, array.dtype, array.chunks

    def __getitem__(self, key):
        self.reads.append((key.start, key.stop))
        return self.array[key]


@pytest.mark.parametrize("verify", [False, True])
def test_block_reads_decode_each_unit_once(tmp_path, verify):
    """Reading a selection in blocks that do not fall on unit boundaries (a role's rows in 256-row
    batches) decodes each stored unit once, values intact; an array handed out is the caller's own."""
    from featstore.store.rows import LazyRows

    rng = np.random.default_rng(1)
    tokens = rng.standard_normal((23, 2, 2, 3)).astype(np.float16)
    store = FeatureStore.create(tmp_path / "s.zarr", splits={"train": ([f"{i}.png" for i in range(23)], np.zeros(23))},
                                views={"patch": (2, 2, 3)}, chunk_rows=5)  # fmt: skip
    for unit in store.units("train"):
        store.write_unit(unit, {"patch": tokens[unit.start : unit.stop]}, np.ones(unit.rows))
    store.finalize()
    store = FeatureStore.open(tmp_path / "s.zarr", verify=verify)
    patches = store.patches("train", "patch")
    counted = CountingArray(patches._array)
    lazy = LazyRows(counted, check=patches._check)
    assert lazy._check[2].recorded.present == verify  # digests checked only when verifying
    rows = np.flatnonzero(np.arange(23) % 4 != 1)  # a role: every row but a holdout's
    blocks = list(lazy.select(rows).chunks(3))
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), tokens[rows])
    assert sorted(counted.reads) == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]  # each unit once
    counted.reads.clear()
    assert [o for o, _ in lazy.chunks(2)] == list(range(0, 23, 2))
    assert len(counted.reads) == 5
    first = lazy[0:3]
    first[:] = 0  # the caller's array: the unit kept for the next read is untouched
    np.testing.assert_array_equal(lazy[1:4], tokens[1:4])


def test_created_patch_stores_cap_their_units(tmp_path):
    """Whoever creates a store (extraction, the API, a benchmark), a unit of patch tokens stays near
    64 MiB: 8192-row units of 16×16×384 float16 would be 800 MB, decoded whole for any read of a row."""
    n = 400
    store = FeatureStore.create(tmp_path / "s.zarr", splits={"train": ([f"{i}.png" for i in range(n)], np.zeros(n))},
                                views={"patch": (16, 16, 384), "cls": 384}, chunk_rows=8192)  # fmt: skip
    assert store.chunk_rows == 341
    assert store.patches("train", "patch").chunk_rows == 341 and store.units("train")[0].rows == 341
    glob = FeatureStore.create(tmp_path / "g.zarr", splits={"train": ([f"{i}.png" for i in range(n)], np.zeros(n))},
                               views={"cls": 384}, chunk_rows=8192)  # fmt: skip
    assert glob.chunk_rows == 8192


@pytest.fixture(scope="module")
def vit_store(small_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("patch") / "vit.zarr"
    extract(
        ExtractConfig(model="vit_tiny_patch16_224", dataset=str(small_folder), out=str(out), views=["patch", "patch4", "avgpool"], **SMALL),
        progress=False,
    )
    return out


@pytest.mark.slow  # extracts
def test_vit_patch_and_patch4_views(vit_store):
    store = FeatureStore.open(vit_store)
    assert store.patch_views == {"patch": (2, 2, 192), "patch4": (2, 2, 768)}
    assert store.views == {"patch": 192, "patch4": 768, "avgpool": 192}  # channels: every reader of views sees ints
    layers = {v: info["layers"] for v, info in store.attrs["patch_views"].items()}
    assert layers == {"patch": [11], "patch4": [8, 9, 10, 11]}  # vit_tiny has 12 blocks
    for split in store.splits:
        patch = store.patches(split, "patch").read().astype(np.float32)
        patch4 = store.patches(split, "patch4").read().astype(np.float32)
        assert patch.shape == (store.num_rows(split), 2, 2, 192) and np.isfinite(patch).all()
        # avgpool is the mean of the final patch tokens; the last block's normed tokens are the final tokens
        np.testing.assert_allclose(patch.mean(axis=(1, 2)), store.features(split, "avgpool")[:].astype(np.float32), atol=2e-2)
        np.testing.assert_allclose(patch4[..., -192:], patch, atol=1e-2)
        assert not np.allclose(patch4[..., :192], patch, atol=1e-1)  # an earlier block's tokens differ
    array = store.split_group("train")["features"]["patch"]
    assert [type(c).__name__ for c in array.compressors] == ["BloscCodec"]
    assert array.chunks[1:] == (2, 2, 192)
    with pytest.raises(Exception, match="patch view"):
        store.features("train", "patch")


@pytest.mark.slow  # extracts
def test_vit_patch_tokens_match_the_model(vit_store, small_folder):
    """The stored grid is timm's forward_features tokens (prefix dropped) in row-major (y, x) order."""
    import timm

    from featstore.loaders import make_loader
    from featstore.pipeline import store_preprocess

    store = FeatureStore.open(vit_store)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32).eval()
    loader = make_loader("torch", store_preprocess(store), torch.device("cpu"), 0)
    paths = [str(small_folder / p) for p in store.paths("val")]
    batch = next(iter(loader.batches(paths, [np.arange(len(paths))])))
    with torch.inference_mode():
        tokens = model.forward_features(batch.images.float())[:, model.num_prefix_tokens :]
    expected = tokens.reshape(len(paths), 2, 2, 192).numpy()
    np.testing.assert_allclose(store.patches("val", "patch").read().astype(np.float32), expected, atol=2e-2, rtol=1e-2)


@pytest.mark.slow  # extracts
def test_cnn_feature_map_is_the_patch_view(small_folder, tmp_path):
    out = tmp_path / "cnn.zarr"
    extract(ExtractConfig(model="resnet18", dataset=str(small_folder), out=str(out), views=["pool", "patch"], image_size=64, resize=64,
                          loader="torch", workers=0, random_init=True), progress=False)  # fmt: skip
    store = FeatureStore.open(out)
    assert store.patch_views == {"patch": (2, 2, 512)}
    patch = store.patches("train", "patch").read().astype(np.float32)
    np.testing.assert_allclose(patch.mean(axis=(1, 2)), store.features("train", "pool")[:].astype(np.float32), atol=2e-2, rtol=1e-2)


@pytest.mark.slow  # extracts
def test_default_views_leave_patch_views_out(small_folder, tmp_path):
    out = tmp_path / "default.zarr"
    extract(ExtractConfig(model="vit_tiny_patch16_224", dataset=str(small_folder), out=str(out), **SMALL), progress=False)
    assert FeatureStore.open(out).patch_views == {}


@pytest.mark.slow  # extracts
def test_user_builder_feature_map(small_folder, tmp_path):
    builder = tmp_path / "maps.py"
    builder.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class Maps(nn.Module):
                def forward(self, x):
                    m = nn.functional.avg_pool2d(x, 8)  # (B, 3, h/8, w/8): a known map
                    return {"grid": m, "vec": m.flatten(1)}

            def build():
                return Maps()
            """
        )
    )
    out = tmp_path / "user.zarr"
    extract(ExtractConfig(model=f"{builder}:build", dataset=str(small_folder), out=str(out), image_size=32, resize=32, loader="torch",
                          workers=0), progress=False)  # fmt: skip
    store = FeatureStore.open(out)
    assert store.patch_views == {"grid": (4, 4, 3)} and store.views == {"grid": 3, "vec": 48}
    grid = store.patches("train", "grid").read().astype(np.float32)
    vec = store.features("train", "vec")[:].astype(np.float32)
    np.testing.assert_allclose(grid, vec.reshape(-1, 3, 4, 4).transpose(0, 2, 3, 1), atol=1e-3)  # (C, h, w) stored as (h, w, C)


@pytest.mark.slow  # extracts
def test_info_export_and_xarray(vit_store, tmp_path, capsys):
    xr = pytest.importorskip("xarray")
    assert run_cli(cli, "featstore", ["info", str(vit_store), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["views"]["patch"] == [2, 2, 192] and info["views"]["avgpool"] == 192 and info["size_bytes"] > 0
    assert run_cli(cli, "featstore", ["info", str(vit_store)]) == 0
    assert "patch (2×2×192)" in capsys.readouterr().out
    store = FeatureStore.open(vit_store)
    h5 = tmp_path / "vit.h5"
    assert run_cli(cli, "featstore", ["export", str(vit_store), "--to", str(h5)]) == 0
    exported = FeatureStore.open(h5)
    assert exported.patch_views == store.patch_views
    np.testing.assert_array_equal(exported.patches("train", "patch4").read(), store.patches("train", "patch4").read())
    ds = xr.open_zarr(str(vit_store), group="train/features")
    assert ds["patch"].dims == ("row", "y", "x", "patch_channel") and ds["patch4"].dims == ("row", "y", "x", "patch4_channel")
    np.testing.assert_array_equal(ds["patch"].values, store.patches("train", "patch").read())


@pytest.mark.slow  # extracts
def test_size_printed_and_a_run_that_does_not_fit_is_refused(small_folder, tmp_path, monkeypatch, capsys):
    import shutil as shutil_module

    from featstore.store import patch as patch_module

    real = shutil_module.disk_usage
    monkeypatch.setattr(patch_module.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))  # a nearly full disk
    out = tmp_path / "full.zarr"
    args = ["extract", "--model", "vit_tiny_patch16_224", "--random-init", "--dataset", str(small_folder), "--out", str(out),
            "--views", "patch", "--image-size", "32", "--resize", "32", "--loader", "torch", "--workers", "0"]  # fmt: skip
    assert run_cli(cli, "featstore", args) == 1
    err = capsys.readouterr().err
    assert "needs up to 36.9 KB" in err  # 24 images × 2×2×192 float16 × 2 bytes
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "free" in error_lines[0] and "Traceback" not in err
    assert not out.exists()
