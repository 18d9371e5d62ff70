"""Dataset specs → manifests: ImageFolder with and without splits, ImageNet layout, CSV lists, digits."""

from __future__ import annotations

import numpy as np
import pytest

from featstore.datasets import resolve_dataset
from featstore.errors import UsageError
from tests.image_kinds import write_good_images


def _imagenet(root):
    for split, n in (("train", 3), ("val", 2)):
        for wnid in ("n01440764", "n02102040"):
            write_good_images(root / split / wnid, n, seed=len(wnid) + n)


def test_imagenet_from_data_root_and_env(tmp_path, monkeypatch):
    _imagenet(tmp_path / "in1k")
    m = resolve_dataset("imagenet", tmp_path / "in1k")
    assert m.name == "imagenet" and m.class_names == ("n01440764", "n02102040")
    assert {s: len(v) for s, v in m.splits.items()} == {"train": 6, "val": 4}
    assert m.splits["val"].paths[0].startswith("val/n01440764/")
    np.testing.assert_array_equal(m.splits["train"].labels, [0, 0, 0, 1, 1, 1])
    monkeypatch.setenv("FEATSTORE_DATA", str(tmp_path))
    (tmp_path / "imagenet").symlink_to(tmp_path / "in1k")
    assert resolve_dataset("imagenet").sha256 == m.sha256


def test_imagenet_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("FEATSTORE_DATA", raising=False)
    with pytest.raises(UsageError, match="needs its location"):
        resolve_dataset("imagenet")
    write_good_images(tmp_path / "flat" / "train" / "n0", 2)
    write_good_images(tmp_path / "flat" / "val", 2)
    with pytest.raises(UsageError, match="holds images directly") as e:
        resolve_dataset("imagenet", tmp_path / "flat")
    assert "valprep" in e.value.hint


def test_folder_without_splits_is_one_split_all(tmp_path):
    write_good_images(tmp_path / "d" / "x", 2)
    write_good_images(tmp_path / "d" / "y" / "nested", 3)
    (tmp_path / "d" / "x" / "README.md").write_text("ignored")
    m = resolve_dataset(str(tmp_path / "d"))
    assert list(m.splits) == ["all"] and len(m.splits["all"]) == 5
    assert m.splits["all"].paths[-1].startswith("y/nested/")
    assert m.skipped == []


def test_a_class_folder_without_images_is_named(tmp_path):
    """An empty class folder stays a class (the others keep their indices) and is said, once, in
    both layouts (torchvision's ImageFolder refuses it; silently it was one more class of no rows)."""
    for root in (tmp_path / "flat", tmp_path / "splits" / "train"):
        write_good_images(root / "a", 2)
        (root / "b").mkdir(parents=True)
        (root / "b" / "notes.txt").write_text("not an image")
        write_good_images(root / "c", 2)
    for spec in (tmp_path / "flat", tmp_path / "splits"):
        m = resolve_dataset(str(spec))
        assert m.class_names == ("a", "b", "c") and sorted(set(next(iter(m.splits.values())).labels.tolist())) == [0, 2]
        assert m.skipped == ["warning: 1 class folders hold no image ('b'): each is a class with no rows; remove the folder to drop it"]


def test_a_store_written_into_the_dataset_is_not_a_class(tmp_path):
    """`featstore extract --out DATASET/feats.zarr` must not make the next run's dataset one class
    larger (a class of no rows, another manifest, another cache key): a folder holding a zarr.json
    is a store, left out and said so, in both layouts."""
    for root in (tmp_path / "flat", tmp_path / "splits" / "train"):
        write_good_images(root / "a", 2)
        write_good_images(root / "c", 2)
    before = {spec: resolve_dataset(str(tmp_path / spec)) for spec in ("flat", "splits")}
    for store in (tmp_path / "flat" / "feats.zarr", tmp_path / "splits" / "train" / "b.zarr"):
        (store / "pool").mkdir(parents=True)
        (store / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    for spec, where in (("flat", "feats.zarr"), ("splits", "train/b.zarr")):
        m = resolve_dataset(str(tmp_path / spec))
        assert m.class_names == ("a", "c") and m.sha256 == before[spec].sha256
        assert m.skipped == [f"skipped 1 Zarr stores (a store written into the dataset is not a class): {where}"]


def test_manifest_hash_tracks_files_and_labels(tmp_path):
    write_good_images(tmp_path / "d" / "x", 2)
    write_good_images(tmp_path / "d" / "y", 2)
    before = resolve_dataset(str(tmp_path / "d")).sha256
    assert resolve_dataset(str(tmp_path / "d")).sha256 == before
    (tmp_path / "d" / "y" / "img000_rgb.jpg").rename(tmp_path / "d" / "x" / "moved.jpg")
    assert resolve_dataset(str(tmp_path / "d")).sha256 != before


def test_csv_with_integer_labels_and_errors(tmp_path):
    files = write_good_images(tmp_path / "imgs", 3)
    (tmp_path / "list.csv").write_text("path,label\n" + "".join(f"imgs/{f.name},{i % 2}\n" for i, f in enumerate(files)))
    m = resolve_dataset(str(tmp_path / "list.csv"))
    assert m.class_names == ("0", "1") and list(m.splits) == ["all"]
    np.testing.assert_array_equal(m.splits["all"].labels, [0, 1, 0])
    (tmp_path / "bad.csv").write_text("file,class\nx.jpg,1\n")
    with pytest.raises(UsageError, match="lacks a 'path' or 'label' column"):
        resolve_dataset(str(tmp_path / "bad.csv"))
    (tmp_path / "missing.csv").write_text("path,label\nnope.jpg,1\n")
    with pytest.raises(UsageError, match="line 2: image 'nope.jpg' not found"):
        resolve_dataset(str(tmp_path / "missing.csv"))
    # one image twice (here spelled two ways, in two splits with two labels): refused, naming both lines
    twice = f"path,label,split\nimgs/{files[0].name},0,train\nimgs/{files[1].name},1,train\n./imgs/{files[0].name},1,val\n"
    (tmp_path / "twice.csv").write_text(twice)
    with pytest.raises(UsageError, match=rf"line 4: image './imgs/{files[0].name}' is listed twice \(line 2 too\)"):
        resolve_dataset(str(tmp_path / "twice.csv"))


def test_digits_split_is_fixed_and_complete():
    from sklearn.datasets import load_digits

    from featstore.digits import digits_split_indices
    from tests.helpers import digit_index_from_path

    a, b = digits_split_indices(), digits_split_indices()
    assert all(np.array_equal(a[s], b[s]) for s in a)
    m = resolve_dataset("digits")
    assert {s: len(v) for s, v in m.splits.items()} == {"train": 1078, "val": 359, "test": 360}
    y = load_digits().target
    for split, sm in m.splits.items():
        idx = [digit_index_from_path(p) for p in sm.paths]
        assert sorted(idx) == a[split].tolist()
        np.testing.assert_array_equal(sm.labels, y[idx])
