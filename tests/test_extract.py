"""featstore extract end to end on the embedded digits dataset and small image folders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from featstore.extraction import ExtractConfig, extract
from featstore.store import FeatureStore
from tests.helpers import digit_index_from_path

SMALL = dict(image_size=32, resize=32)  # digits are 8×8: no need for 224 px in tests


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "digits.zarr"
    result = extract(
        ExtractConfig(
            model="resnet18", dataset="digits", out=str(out), random_init=True, loader="torch", workers=0, batch_size=128, **SMALL
        ),
        progress=False,
    )
    return out, result


def test_digits_end_to_end(digits_store):
    from sklearn.datasets import load_digits

    out, result = digits_store
    store = FeatureStore.open(out)
    assert store.complete
    assert set(store.splits) == {"train", "val", "test"}
    counts = {s: store.num_rows(s) for s in store.splits}
    assert sum(counts.values()) == 1797
    assert result.rows == counts and result.rows_written == 1797 and result.invalid == 0
    target = load_digits().target
    seen = []
    for split in store.splits:
        idx = np.array([digit_index_from_path(p) for p in store.paths(split)])
        seen.extend(idx.tolist())
        np.testing.assert_array_equal(store.labels(split), target[idx])
        feats = store.features(split, "pool")
        assert feats.shape == (counts[split], 512) and feats.dtype == np.float16
        assert np.isfinite(feats).all()
        assert store.valid(split).all()
        assert np.abs(feats.astype(np.float32)).sum(axis=1).min() > 0  # every row written
    assert sorted(seen) == list(range(1797))  # each digit exactly once
    attrs = store.attrs
    assert attrs["encoder"]["name"] == "resnet18" and attrs["encoder"]["weights_sha256"] == "random-init"
    assert attrs["dataset"]["class_names"] == [str(d) for d in range(10)]
    assert attrs["preprocessing"]["image_size"] == 32 and attrs["views"] == {"pool": 512}
    assert len(attrs["dataset"]["manifest_sha256"]) == 64 and attrs["cache_key"]
    # the split is stratified: every class in every split
    for split in store.splits:
        assert len(np.unique(store.labels(split))) == 10


def test_same_command_is_up_to_date(digits_store):
    out, _ = digits_store
    before = (out / "train" / "features" / "pool" / "c" / "0" / "0").stat().st_mtime_ns
    result = extract(
        ExtractConfig(
            model="resnet18", dataset="digits", out=str(out), random_init=True, loader="torch", workers=0, batch_size=128, **SMALL
        ),
        progress=False,
    )
    assert result.status == "up to date" and result.rows_written == 0
    assert (out / "train" / "features" / "pool" / "c" / "0" / "0").stat().st_mtime_ns == before


def test_info_json_and_text(digits_store, capsys):
    from featstore.cli import cli
    from featstore.console import run_cli

    out, _ = digits_store
    assert run_cli(cli, "featstore", ["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["complete"] is True
    assert info["splits"]["train"]["rows"] + info["splits"]["val"]["rows"] + info["splits"]["test"]["rows"] == 1797
    assert info["views"] == {"pool": 512} and info["dtype"] == "float16"
    assert info["encoder"]["name"] == "resnet18" and info["size_bytes"] > 0
    assert run_cli(cli, "featstore", ["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "complete" in text and "pool (512)" in text and "train 1,078 rows" in text


def test_vit_views_and_selection(small_folder, tmp_path):
    out = tmp_path / "vit.zarr"
    extract(
        ExtractConfig(
            model="vit_small_patch16_224",
            dataset=str(small_folder),
            out=str(out),
            random_init=True,
            loader="torch",
            workers=0,
            views=["cls", "avgpool"],
            image_size=32,
            resize=32,
            dtype="float32",
        ),
        progress=False,
    )
    store = FeatureStore.open(out)
    assert store.views == {"cls": 384, "avgpool": 384}
    assert store.splits == ["train", "val"] and store.num_rows("train") == 16 and store.num_rows("val") == 8
    assert store.class_names == ["cat", "dog"]
    assert not any(p.endswith(".txt") for p in store.paths("train"))
    cls, avg = store.features("train", "cls"), store.features("train", "avgpool")
    assert np.isfinite(cls).all() and not np.allclose(cls, avg)


def test_vit_cls4_is_last_four_normed_cls_tokens(small_folder):
    """cls4's last block equals cls, and the views match timm's own forward_intermediates."""
    import torch

    from featstore.models.encoders import build_encoder, resolve_encoder

    spec = resolve_encoder("vit_small_patch16_224", random_init=True, preprocess_overrides=dict(image_size=32, resize=32))
    enc = build_encoder(spec)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        out = enc(x)
        tokens = enc.backbone.forward_features(x)
    assert out["cls4"].shape == (3, 4 * 384)
    torch.testing.assert_close(out["cls4"][:, -384:], out["cls"])
    torch.testing.assert_close(out["cls"], tokens[:, 0])
    torch.testing.assert_close(out["avgpool"], tokens[:, 1:].mean(1))


def test_csv_dataset_with_splits(small_folder, tmp_path):
    rows = ["path,label,split"]
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            for f in sorted((small_folder / split / label).glob("*.jpg"))[:2]:
                rows.append(f"{f},{label},{split}")
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    out = tmp_path / "csv.zarr"
    extract(
        ExtractConfig(model="resnet18", dataset=str(csv_path), out=str(out), random_init=True, loader="torch", workers=0, **SMALL),
        progress=False,
    )
    store = FeatureStore.open(out)
    assert sorted(store.splits) == ["train", "val"]
    assert store.num_rows("train") == 4 and store.num_rows("val") == 4
    np.testing.assert_array_equal(store.labels("train"), [0, 0, 1, 1])
