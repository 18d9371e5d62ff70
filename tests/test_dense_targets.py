"""Datasets with dense targets (#24 item 2): the folder layout (16-bit PNG / .npy depth, masks),
NYU-Depth v2's labeled .mat with splits.mat, Pascal VOC; targets aligned with the image's resize and
crop, stored beside the features with their provenance, part of the cache key; bad targets are
invalid rows with a reason."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from featstore.cli import cli
from featstore.console import run_cli
from featstore.extraction import ExtractConfig, extract
from featstore.store import FeatureStore, read_targets, target_info, target_valid

# a 1-layer builder: extraction in a fraction of a second
BUILDER = """
import torch
from torch import nn

class Pool(nn.Module):
    def forward(self, x):
        return {"patch": nn.functional.avg_pool2d(x, 4)}

def build():
    return Pool()
"""


def _builder(tmp_path):
    path = tmp_path / "pool.py"
    path.write_text(BUILDER)
    return f"{path}:build"


def _halves(h, w):
    """An image red left of its middle and blue right of it; its mask 1 left, 2 right; depth 1 m / 3 m."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2, 0] = 255
    img[:, w // 2 :, 2] = 255
    mask = np.where(np.arange(w)[None, :] < w // 2, 1, 2).repeat(h, 0).astype(np.uint8)
    depth_mm = np.where(mask == 1, 1000, 3000).astype(np.uint16)
    return img, mask, depth_mm


def write_dense_folder(root, sizes=((40, 64), (64, 40), (48, 48)), splits=("train", "val")):
    for split in splits:
        for sub in ("images", "depth", "masks"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i, (h, w) in enumerate(sizes):
            img, mask, depth = _halves(h, w)
            Image.fromarray(img).save(root / split / "images" / f"im{i}.png")
            Image.fromarray(mask, mode="L").save(root / split / "masks" / f"im{i}.png")
            Image.fromarray(depth).save(root / split / "depth" / f"im{i}.png")  # uint16 → a 16-bit PNG
    return root


def _extract(tmp_path, dataset, name="s.zarr", **kw):
    out = tmp_path / name
    args = dict(model=_builder(tmp_path), dataset=str(dataset), out=str(out), image_size=16, resize=20, loader="torch", workers=0)
    args.update(kw)
    return extract(ExtractConfig(**args), progress=False), out


def _extract_cli(capsys, tmp_path, *args: str) -> dict:
    """``featstore extract`` of the 1-layer builder through the CLI (the request memo included), with
    ``args`` (the dataset and sizes); its ``--json`` answer."""
    capsys.readouterr()
    common = ["extract", "--model", _builder(tmp_path), "--random-init", "--loader", "torch", "--workers", "0", "--no-progress", "--json"]
    assert run_cli(cli, "featstore", [*common, *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_folder_targets_follow_the_image_resize_and_crop(tmp_path):
    """The stored mask's class at each pixel is the colour of the loaded image's pixel there."""
    import torch

    from featstore.loaders import make_loader
    from featstore.pipeline import store_preprocess

    root = write_dense_folder(tmp_path / "data")
    _, out = _extract(tmp_path, root)
    store = FeatureStore.open(out)
    info = target_info(store)
    assert info["kinds"] == ["depth", "mask"] and info["size"] == [16, 16] and info["num_classes"] == 3 and info["invalid"] == {}
    assert info["depth_scale"] == 0.001 and len(info["files_sha256"]) == 64
    for split in ("train", "val"):
        mask = read_targets(store, split, "mask")
        depth = read_targets(store, split, "depth")
        assert mask.shape == (3, 16, 16) and depth.dtype == np.float32 and target_valid(store, split).all()
        np.testing.assert_array_equal(depth, np.where(mask == 1, 1.0, 3.0))  # 1000 mm → 1 m
        loader = make_loader("torch", store_preprocess(store), torch.device("cpu"), 0)
        paths = [str(root / p) for p in store.paths(split)]
        images = next(iter(loader.batches(paths, [np.arange(3)]))).images.numpy()  # normalized (3, 16, 16)
        red = images[:, 0] > images[:, 2]
        interior = np.abs(images[:, 0] - images[:, 2]) > 1  # the one resampled column between halves is blended
        np.testing.assert_array_equal(mask[interior], np.where(red[interior], 1, 2))
        assert (mask[:, :, :7] == 1).all() and (mask[:, :, 9:] == 2).all()


def test_targets_of_exif_rotated_photos_turn_with_the_image(tmp_path):
    """Every loader turns a photo upright by its EXIF orientation; its targets must turn with it. A
    target with the stored pixels' shape (a quarter turn: 6) is turned with the image; one drawn on
    the upright image (6 again, and 3, a half turn, where the shapes cannot tell) is read as it is.
    Checked as above: the stored class at each pixel is the loaded image's colour there."""
    import torch

    from featstore.loaders import make_loader
    from featstore.pipeline import store_preprocess

    root = tmp_path / "data"
    for sub in ("images", "depth", "masks"):
        (root / "train" / sub).mkdir(parents=True)
    turns = {6: lambda a: np.rot90(a, -1), 3: lambda a: np.rot90(a, 2)}  # what exif_transpose does to the stored pixels
    cases = [("stored", 6), ("upright", 6), ("upright", 3)]
    for i, (layout, orientation) in enumerate(cases):
        img, mask, depth = _halves(40, 64)
        if layout == "upright":
            mask, depth = turns[orientation](mask).copy(), turns[orientation](depth).copy()
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(img).save(root / "train" / "images" / f"im{i}.jpg", quality=100, exif=exif.tobytes())
        Image.fromarray(mask, mode="L").save(root / "train" / "masks" / f"im{i}.png")
        Image.fromarray(depth).save(root / "train" / "depth" / f"im{i}.png")
    logs: list[str] = []
    out = tmp_path / "s.zarr"
    extract(ExtractConfig(model=_builder(tmp_path), dataset=str(root), out=str(out), image_size=16, resize=20, loader="torch", workers=0),
            progress=False, log=logs.append)  # fmt: skip
    assert any("3 images carry an EXIF orientation" in m and "the targets of 1 had the shape of the pixels as stored" in m for m in logs), (
        logs
    )
    store = FeatureStore.open(out)
    assert target_info(store)["invalid"] == {} and target_valid(store, "train").all()
    mask, depth = read_targets(store, "train", "mask"), read_targets(store, "train", "depth")
    loader = make_loader("torch", store_preprocess(store), torch.device("cpu"), 0)
    images = next(iter(loader.batches([str(root / p) for p in store.paths("train")], [np.arange(3)]))).images.numpy()
    red, interior = images[:, 0] > images[:, 2], np.abs(images[:, 0] - images[:, 2]) > 1
    assert interior.mean() > 0.8
    np.testing.assert_array_equal(mask[interior], np.where(red[interior], 1, 2))
    np.testing.assert_array_equal(depth, np.where(mask == 1, 1.0, 3.0))


def test_npy_depth_scale_and_the_cache_key(tmp_path):
    root = write_dense_folder(tmp_path / "data", splits=("train",))
    r1, out1 = _extract(tmp_path, root, "a.zarr")
    r2, out2 = _extract(tmp_path, root, "b.zarr", depth_scale=0.0002)  # a 16-bit PNG of 0.2 mm units
    s1, s2 = FeatureStore.open(out1), FeatureStore.open(out2)
    np.testing.assert_allclose(read_targets(s2, "train", "depth"), read_targets(s1, "train", "depth") * 0.2, rtol=1e-3)
    assert s1.attrs["cache_key"] != s2.attrs["cache_key"]
    assert "--depth-scale 0.0002" in s2.attrs["command"]
    # a changed target file is another store too
    (root / "train" / "depth" / "im0.png").unlink()
    np.save(root / "train" / "depth" / "im0.npy", np.full((40, 64), 2.5, np.float32))
    _, out3 = _extract(tmp_path, root, "c.zarr")
    s3 = FeatureStore.open(out3)
    assert s3.attrs["cache_key"] != s1.attrs["cache_key"]
    assert (read_targets(s3, "train", "depth")[0] == np.float32(2.5)).all()  # .npy: metres, no scale


def test_a_target_rewritten_in_place_is_not_answered_from_the_memo(tmp_path, monkeypatch, capsys):
    """The request memo answers "up to date" without reading the data; a depth map rewritten under
    its own name changes no folder's mtime, so the memo must stamp the target files themselves."""
    monkeypatch.setenv("FEATSTORE_HOME", str(tmp_path / "home"))
    root = write_dense_folder(tmp_path / "data", splits=("train",))
    extract_cli = partial(_extract_cli, capsys, tmp_path, "--dataset", str(root), "--image-size", "16", "--resize", "20")
    first = extract_cli()
    assert extract_cli()["status"] == "up to date"
    Image.fromarray(np.full((40, 64), 2000, np.uint16)).save(root / "train" / "depth" / "im0.png")  # 2 m everywhere
    again = extract_cli()
    assert again["status"] != "up to date" and again["store"] != first["store"]
    assert (read_targets(FeatureStore.open(again["store"]), "train", "depth")[0] == np.float32(2.0)).all()


def test_missing_and_mis_sized_targets_are_invalid_rows(tmp_path):
    root = write_dense_folder(tmp_path / "data", splits=("train",))
    (root / "train" / "masks" / "im1.png").unlink()
    Image.fromarray(np.zeros((10, 10), np.uint8), mode="L").save(root / "train" / "masks" / "im2.png")
    _, out = _extract(tmp_path, root)
    store = FeatureStore.open(out)
    np.testing.assert_array_equal(target_valid(store, "train"), [True, False, False])
    reasons = {r["row"]: r["reason"] for r in target_info(store)["invalid"]["train"]}
    assert reasons[1] == "no mask file for im1.png"
    assert reasons[2] == "mask im2.png is 10×10, the image 48×48"
    assert (read_targets(store, "train", "mask")[1:] == 255).all()  # nothing to learn from them


def _write_nyu(root, n=6, h=24, w=32):
    import h5py
    import scipy.io

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, h, w, 3), dtype=np.uint8)
    depths = rng.uniform(0.5, 10, (n, h, w)).astype(np.float32)
    root.mkdir()
    with h5py.File(root / "nyu_depth_v2_labeled.mat", "w") as f:  # MATLAB v7.3 stores arrays column-major: dims reversed
        f["images"] = images.transpose(0, 3, 2, 1)  # (N, 3, W, H)
        f["depths"] = depths.transpose(0, 2, 1)  # (N, W, H)
    scipy.io.savemat(root / "splits.mat", {"trainNdxs": np.array([[1], [3], [4], [6]]), "testNdxs": np.array([[2], [5]])})
    return images, depths


def test_nyu_labeled_mat_and_its_split(tmp_path):
    images, depths = _write_nyu(tmp_path / "nyu")
    result, out = _extract(tmp_path, "nyu-depth-v2", data_root=str(tmp_path / "nyu"), image_size=24, resize=24)
    store = FeatureStore.open(out)
    assert result.rows == {"train": 4, "test": 2}
    assert list(store.paths("test")) == ["test/images/0002.png", "test/images/0005.png"]
    # 32×24 → shorter side 24 is already 24: the crop takes the middle 24 columns
    np.testing.assert_allclose(read_targets(store, "test", "depth"), depths[[1, 4]][:, :, 4:28], rtol=1e-3)
    converted = store.meta.dataset.root
    assert converted is not None
    np.testing.assert_array_equal(np.asarray(Image.open(f"{converted}/train/images/0003.png")), images[2])
    assert "--dataset nyu-depth-v2" in store.attrs["command"]
    mat_time = (tmp_path / "nyu" / "nyu_depth_v2_labeled.mat").stat().st_mtime_ns
    assert {p.stat().st_mtime_ns for p in Path(converted).rglob("*") if p.is_file()} == {mat_time}  # as new as their source


def _write_nyu_classes(root, images, raw_ids=894, classes=40, rng_seed=1):
    """Raw labels in the .mat (0 = unlabeled) and a classMapping40.mat in Gupta et al.'s structure:
    ``mapClass`` (1 × 894, uint8, values 1..40), ``className`` (1 × 40 cell of names)."""
    import h5py
    import scipy.io

    rng = np.random.default_rng(rng_seed)
    n, h, w, _ = images.shape
    labels = rng.integers(0, raw_ids + 1, (n, h, w)).astype(np.uint16)
    labels[:, :4] = 0  # a band of unlabeled pixels
    with h5py.File(root / "nyu_depth_v2_labeled.mat", "a") as f:
        f["labels"] = labels.transpose(0, 2, 1)  # (N, W, H)
    map_class = rng.integers(1, classes + 1, (1, raw_ids)).astype(np.uint8)
    names = np.empty((1, classes), dtype=object)
    names[0, :] = [f"class {k}" for k in range(classes)]
    scipy.io.savemat(root / "classMapping40.mat", {"mapClass": map_class, "className": names})
    return labels, map_class.reshape(-1), [f"class {k}" for k in range(classes)]


def test_nyu_40_class_masks_from_the_class_mapping(tmp_path):
    images, depths = _write_nyu(tmp_path / "nyu")
    _, out_depth = _extract(tmp_path, "nyu-depth-v2", "depth.zarr", data_root=str(tmp_path / "nyu"), image_size=24, resize=24)
    labels, map_class, names = _write_nyu_classes(tmp_path / "nyu", images)
    result, out = _extract(tmp_path, "nyu-depth-v2", data_root=str(tmp_path / "nyu"), image_size=24, resize=24)
    store = FeatureStore.open(out)
    info = target_info(store)
    assert info["kinds"] == ["depth", "mask"] and info["class_names"] == names and info["num_classes"] == 40
    for split, rows in (("train", [0, 2, 3, 5]), ("test", [1, 4])):
        raw = labels[rows].astype(np.int64)
        expected = np.where(raw == 0, 255, map_class[np.maximum(raw, 1) - 1] - 1)  # raw k → mapClass[k] - 1; 0 → ignored
        np.testing.assert_array_equal(read_targets(store, split, "mask"), expected[:, :, 4:28])  # the middle 24 columns, as the image
        np.testing.assert_allclose(read_targets(store, split, "depth"), depths[rows][:, :, 4:28], rtol=1e-3)
    assert (read_targets(store, "train", "mask")[:, :4] == 255).all()  # unlabeled: ignored
    # featstore info says what the targets are (the images' one dummy class is not "1 classes")
    from featstore.cli import format_info

    text = format_info(store.info())
    assert "targets    depth + mask, 24×24, folder layout; 40 classes (class 0, class 1, class 2, class 3, class 4, class 5, …)\n" in text
    assert "  dense targets  manifest" in text and " 1 classes" not in text
    assert store.info()["targets"]["invalid_rows"] == 0 and store.info()["targets"]["num_classes"] == 40
    # the mapping is part of what was converted: another folder, another store than the depth-only one
    assert store.meta.dataset.root != FeatureStore.open(out_depth).meta.dataset.root
    assert store.attrs["cache_key"] != FeatureStore.open(out_depth).attrs["cache_key"]


def test_nyu_class_mapping_reads_the_authors_structure_and_refuses_others(tmp_path, capsys):
    import scipy.io

    from featstore.dense_layouts import nyu_class_mapping

    names = np.empty((1, 3), dtype=object)
    names[0, :] = ["wall", "floor", "otherprop"]
    scipy.io.savemat(tmp_path / "m.mat", {"mapClass": np.array([[3, 1, 2, 3]], np.uint8), "className": names})
    lut, got = nyu_class_mapping(tmp_path / "m.mat")
    assert lut.tolist() == [255, 2, 0, 1, 2] and got == ("wall", "floor", "otherprop")
    images, _ = _write_nyu(tmp_path / "nyu")
    _write_nyu_classes(tmp_path / "nyu", images)
    scipy.io.savemat(tmp_path / "nyu" / "classMapping40.mat", {"mapClass": np.array([[41, 1]], np.uint8), "className": names})
    code = run_cli(cli, "featstore", ["extract", "--model", _builder(tmp_path), "--dataset", "nyu-depth-v2", "--data-root",
                                      str(tmp_path / "nyu"), "--out", str(tmp_path / "o.zarr")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "maps raw labels outside its 3 classes" in err and "Gupta" in err
    assert not (tmp_path / "o.zarr").exists()


def _write_class13(root, classes=40, rng_seed=2):
    """class13Mapping.mat in the structure NYU's meta-data ships: a 1×1 struct classMapping13 with
    labels13 (1 × 40, uint8, values 1..13) and classNames (1 × 13 cell)."""
    import scipy.io

    to13 = np.random.default_rng(rng_seed).integers(1, 14, (1, classes)).astype(np.uint8)
    names = np.empty((1, 13), dtype=object)
    names[0, :] = [f"group {k}" for k in range(13)]
    scipy.io.savemat(root / "class13Mapping.mat", {"classMapping13": {"labels13": to13, "classNames": names}})
    return to13.reshape(-1), [f"group {k}" for k in range(13)]


def test_nyu_13_classes_and_a_mapping_added_later_is_a_new_store(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEATSTORE_HOME", str(tmp_path / "home"))
    images, _ = _write_nyu(tmp_path / "nyu")
    nyu = ["--dataset", "nyu-depth-v2", "--data-root", str(tmp_path / "nyu"), "--image-size", "24", "--resize", "24"]

    def extract_cli(*extra):
        return _extract_cli(capsys, tmp_path, *nyu, *extra)

    depth_only = extract_cli()
    assert target_info(FeatureStore.open(depth_only["store"]))["kinds"] == ["depth"]
    assert extract_cli()["status"] == "up to date"
    labels, map_class, _ = _write_nyu_classes(tmp_path / "nyu", images)  # the .mat and its mapping change: not "up to date"
    forty = extract_cli()
    assert forty["status"] != "up to date" and forty["store"] != depth_only["store"]
    assert target_info(FeatureStore.open(forty["store"]))["num_classes"] == 40
    # --nyu-classes 13 without class13Mapping.mat: says which file, nothing made
    capsys.readouterr()
    assert run_cli(cli, "featstore", ["extract", "--model", _builder(tmp_path), *nyu, "--nyu-classes", "13"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "class13Mapping.mat" in err
    to13, names13 = _write_class13(tmp_path / "nyu")
    thirteen = extract_cli("--nyu-classes", "13")
    store = FeatureStore.open(thirteen["store"])
    info = target_info(store)
    assert info["class_names"] == names13 and info["num_classes"] == 13 and thirteen["store"] != forty["store"]
    raw = labels[[1, 4]].astype(np.int64)
    expected = np.where(raw == 0, 255, to13[map_class[np.maximum(raw, 1) - 1] - 1] - 1)  # raw → 40 → 13
    np.testing.assert_array_equal(read_targets(store, "test", "mask"), expected[:, :, 4:28])
    assert "--nyu-classes 13" in store.attrs["command"]
    # the 40-class store is still the answer to the 40-class request
    assert extract_cli()["store"] == forty["store"]
    # the flag on another dataset: one line, exit 2
    assert (
        run_cli(cli, "featstore", ["extract", "--model", _builder(tmp_path), "--dataset", str(tmp_path / "nyu"), "--nyu-classes", "13"])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--nyu-classes applies to --dataset nyu-depth-v2" in err


def test_nyu_without_splits_is_one_line_error(tmp_path, capsys):
    (tmp_path / "nyu").mkdir()
    (tmp_path / "nyu" / "nyu_depth_v2_labeled.mat").write_bytes(b"x")
    code = run_cli(cli, "featstore", ["extract", "--model", _builder(tmp_path), "--dataset", "nyu-depth-v2", "--data-root",
                                      str(tmp_path / "nyu"), "--out", str(tmp_path / "o.zarr")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "splits.mat" in err and err.startswith("error:")


def test_voc_segmentation_layout(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    names = {"train": ["2007_000001", "2007_000002"], "val": ["2007_000003"]}
    palette = [0, 0, 0, 128, 0, 0] + [0] * (253 * 3) + [224, 224, 192]  # 256 colours, 255 = the boundary
    for split, ns in names.items():
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ns) + "\n")
        for n in ns:
            img, mask, _ = _halves(40, 40)
            Image.fromarray(img).save(voc / "JPEGImages" / f"{n}.jpg")
            mask[:, 18:22] = 255  # VOC's boundary band: ignore
            m = Image.fromarray(np.where(mask == 2, 15, mask).astype(np.uint8), mode="P")
            m.putpalette(palette)
            m.save(voc / "SegmentationClass" / f"{n}.png")
    _, out = _extract(tmp_path, tmp_path / "VOCdevkit", image_size=20, resize=20)
    store = FeatureStore.open(out)
    info = target_info(store)
    assert info["layout"] == "voc" and info["class_names"][15] == "person" and info["num_classes"] == 21
    mask = read_targets(store, "train", "mask")
    assert set(np.unique(mask).tolist()) == {1, 15, 255}
    assert (mask[:, :, 9:11] == 255).all() and (mask[:, :, :9] == 1).all()
    assert store.num_rows("val") == 1


def test_voc_split_list_rewritten_in_place_is_not_answered_from_the_memo(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEATSTORE_HOME", str(tmp_path / "home"))
    voc = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    listing = voc / "ImageSets" / "Segmentation" / "train.txt"
    listing.write_text("a\nb\n")
    for n in "ab":
        img, mask, _ = _halves(40, 40)
        Image.fromarray(img).save(voc / "JPEGImages" / f"{n}.jpg")
        Image.fromarray(mask).save(voc / "SegmentationClass" / f"{n}.png")
    extract_cli = partial(_extract_cli, capsys, tmp_path, "--dataset", str(voc), "--image-size", "16", "--resize", "20")
    assert extract_cli()["rows"] == {"train": 2} and extract_cli()["status"] == "up to date"
    listing.write_text("b\n")  # the same folder, the same files: only the list changed
    again = extract_cli()
    assert again["status"] != "up to date" and again["rows"] == {"train": 1}


def test_a_split_without_usable_targets_is_named(tmp_path):
    """Every val mask missing: with a test split, the LR cannot be chosen on val; without one, val is
    the reported split and has nothing to report. Said as such (was: KeyError 'confusion', or "every
    head diverged" from NaN scores)."""
    import pytest

    from featstore.errors import UsageError
    from probe.dense.fit import fit_dense
    from probe.protocol import Protocol

    for splits, role in ((("train", "val", "test"), "selection"), (("train", "val"), "report")):
        root = write_dense_folder(tmp_path / "-".join(splits), splits=splits)
        for mask in (root / "val" / "masks").iterdir():
            mask.unlink()
        _, out = _extract(tmp_path, root, f"{len(splits)}.zarr")
        assert not target_valid(FeatureStore.open(out), "val").any()
        with pytest.raises(UsageError, match=rf"no {role} rows \(val\) with a usable target"):
            fit_dense([str(out)], Protocol(lr_grid="1e-3,1e-2", epochs=1, batch_size=4), "seg", out=tmp_path / f"run{len(splits)}")


def test_repair_writes_damaged_targets_again_from_the_dataset(tmp_path):
    """A depth map changed in the store (and a mask chunk lost): --repair wrote the damaged units'
    features again but recorded the damaged targets' digests as their content, so verify then
    passed a wrong store. The targets are written again from the dataset's files instead."""
    import zarr

    from featstore.store.verify import verify_store

    root = write_dense_folder(tmp_path / "data")
    _, out = _extract(tmp_path, root, chunk_rows=2)
    fresh = {s: {k: read_targets(FeatureStore.open(out), s, k) for k in ("depth", "mask")} for s in ("train", "val")}
    depth = zarr.open_array(str(out / "train" / "targets" / "depth"), mode="r+")
    values = depth[:]
    values[1] *= 2
    depth[:] = values
    lost = sorted(p for p in (out / "val" / "targets" / "mask").rglob("*") if p.is_file() and p.name != "zarr.json")[0]
    lost.unlink()
    report = verify_store(FeatureStore.open(out))
    assert {(p.split, p.array) for p in report.problems} == {("train", "targets/depth"), ("val", "targets/mask")}
    result, _ = _extract(tmp_path, root, chunk_rows=2, repair=True)
    assert result.status == "repaired"
    store = FeatureStore.open(out)
    assert verify_store(store).ok and store.complete
    for split, kinds in fresh.items():
        for kind, values in kinds.items():
            np.testing.assert_array_equal(read_targets(store, split, kind), values, err_msg=f"{split} {kind}")
