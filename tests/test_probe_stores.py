"""probe fit across architectures: per-store views, primary views, labels (issue 10, item 3)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

import probe
import probe.output.plots
import probe.output.tables
from featstore.errors import UsageError
from featstore.store import FeatureStore
from probe.protocol import Protocol
from probe.stores import StoreSpec, assign_labels, parse_store_spec, primary_view
from tests.test_probe import FAST, assert_one_line_error, digits_splits, make_store, one_thread, run_cli  # noqa: F401 (one_thread: autouse)

P = Protocol(lr_grid="1e-2,0.1", **FAST)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A CNN store (view pool) and a ViT store (views cls, avgpool, cls4) of the same data."""
    root = tmp_path_factory.mktemp("arch")
    d = digits_splits()
    narrow = {k: (x[:, :40], y, i) for k, (x, y, i) in d.items()}
    cnn = make_store(
        root / "r18.zarr", d, view="pool", encoder={"name": "resnet18", "family": "cnn", "weights_path": "/w/resnet18_a1_in1k.safetensors"}
    )
    vit = make_store(root / "dino.zarr", narrow, view="cls", extra_views=("avgpool", "cls4"), encoder={"name": "dino", "family": "vit"})
    vit2 = make_store(
        root / "other" / "dino.zarr",
        narrow,
        view="cls",
        encoder={"name": "dino", "family": "vit", "weights_path": "/w/dino_vitb16_pretrain.pth"},
    )
    ft = make_store(
        root / "ft.zarr", narrow, view="cls", encoder={"name": "dino", "family": "vit", "weights_path": "/w/my_dino_finetune.pth"}
    )
    return {"cnn": cnn, "vit": vit, "vit2": vit2, "ft": ft, "root": root}


def test_parse_store_spec(tmp_path):
    assert parse_store_spec("a.zarr") == StoreSpec("a.zarr")
    assert parse_store_spec("dino=runs/a.zarr") == StoreSpec("runs/a.zarr", "dino")
    assert parse_store_spec("runs/a.zarr:cls4") == StoreSpec("runs/a.zarr", None, "cls4")
    assert parse_store_spec("ft dino=runs/a.zarr:cls") == StoreSpec("runs/a.zarr", "ft dino", "cls")
    assert parse_store_spec("runs/lr=0.1/a.zarr") == StoreSpec("runs/lr=0.1/a.zarr")  # a '/' before '=': a path
    odd = tmp_path / "x=y:z.zarr"  # an existing path is a path, whatever it contains
    odd.mkdir()
    assert parse_store_spec(str(odd)) == StoreSpec(str(odd))
    assert parse_store_spec(tmp_path / "p=q.zarr") == StoreSpec(str(tmp_path / "p=q.zarr"))


def test_primary_views_compare_a_cnn_with_a_vit(stores):
    logs = []
    rows = probe.fit([stores["cnn"], stores["vit"]], P, device="cpu", warn=lambda m: None, log=logs.append)
    assert {(r["label"], r["view"]) for r in rows} == {("resnet18_a1_in1k", "pool"), ("dino", "cls")}
    assert sum(r["selected"] for r in rows) == 2 and len({r["protocol_hash"] for r in rows}) == 1
    assert any("share no feature view" in m and "pool" in m and "cls" in m for m in logs)
    assert primary_view(FeatureStore.open(stores["vit"])) == "cls" and primary_view(FeatureStore.open(stores["cnn"])) == "pool"
    title = probe.output.plots.plot_title(rows, P)
    assert "views resnet18_a1_in1k: pool, dino: cls" in title


def test_per_store_view_and_labels_through_the_cli(stores, tmp_path):
    out = tmp_path / "res"
    code, output = run_cli(
        [
            "fit",
            "--store",
            f"cnn={stores['cnn']}",
            "--store",
            f"vit={stores['vit']}:cls4",
            "--lr-grid",
            "1e-2,0.1",
            "--epochs",
            "5",
            "--batch-size",
            "128",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0, output
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["label"], r["view"]) for r in rows} == {("cnn", "pool"), ("vit", "cls4")}
    assert "| cnn |" in output and "| vit |" in output
    # a store's own view beside a shared --view for the others
    rows = probe.fit([stores["vit"], f"{stores['ft']}:cls"], P, views=["avgpool", "cls4"], device="cpu", warn=lambda m: None)
    assert sorted({(r["label"], r["view"]) for r in rows}) == [("dino", "avgpool"), ("dino", "cls4"), ("my_dino_finetune", "cls")]


def test_default_labels_tell_stores_apart(stores):
    opened = [FeatureStore.open(stores[k]) for k in ("vit", "vit2", "ft")]
    specs = [StoreSpec(str(stores[k])) for k in ("vit", "vit2", "ft")]
    # weights file name, else the model name; a fine-tuned and a pretrained DINO differ
    assert assign_labels(specs, opened) == ["dino", "dino_vitb16_pretrain", "my_dino_finetune"]
    # equal defaults: the folder name, or the whole path when the folder names are equal too
    twin = make_store(
        stores["root"] / "again" / "dino.zarr",
        {k: (x[:, :40], y, i) for k, (x, y, i) in digits_splits().items()},
        view="cls",
        encoder={"name": "dino", "family": "vit"},
    )
    pair = [StoreSpec(str(stores["vit"])), StoreSpec(str(twin))]
    opened = [FeatureStore.open(stores["vit"]), FeatureStore.open(twin)]
    assert assign_labels(pair, opened) == [f"dino ({stores['vit']})", f"dino ({twin})"]
    # a default equal to another store's given label gives way to it
    assert assign_labels([StoreSpec(str(stores["ft"]), "dino"), pair[1]], [FeatureStore.open(stores["ft"]), opened[1]]) == [
        "dino",
        "dino (dino.zarr)",
    ]
    rows = probe.fit([stores["vit"], stores["ft"]], P, device="cpu", warn=lambda m: None)
    assert {r["label"] for r in rows} == {"dino", "my_dino_finetune"}
    table = probe.output.tables.markdown_table(rows, P)
    assert "| dino |" in table and "| my_dino_finetune |" in table


def test_same_default_label_is_disambiguated_by_folder(tmp_path):
    d = digits_splits()
    a = make_store(tmp_path / "a.zarr", d)
    b = make_store(tmp_path / "b.zarr", d)
    rows = probe.fit([a, b], P, device="cpu", warn=lambda m: None)
    assert [r["label"] for r in rows if r["selected"]] == ["pixels (a.zarr)", "pixels (b.zarr)"]


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--store", "{cnn}", "--store", "{vit}", "--view", "cls"], ["view 'cls' not in store", "r18.zarr", ":VIEW"]),
        (["--store", "{vit}:cls5"], ["view 'cls5' not in store", "cls4"]),
        (["--store", "x={cnn}", "--store", "x={vit}"], ["label 'x' given to several stores"]),
        (["--store", "={cnn}"], ["not found"]),
        (["--store", "{vit}:cls4", "--view", "avgpool"], ["--view avgpool applies to no store", "its own view"]),  # was ignored
    ],
)
def test_bad_store_specs(args, needles, stores, tmp_path):
    args = [a.format(**{k: str(v) for k, v in stores.items()}) for a in args]
    code, output = run_cli(["fit", *args, "--lr", "0.1", "--epochs", "1", "--out", str(tmp_path / "o")])
    assert_one_line_error(code, output, 2, *needles)
    assert not (tmp_path / "o").exists()


def test_api_accepts_store_specs(stores):
    rows = probe.fit(StoreSpec(str(stores["vit"]), "mine", "avgpool"), P, device="cpu", warn=lambda m: None)
    assert {(r["label"], r["view"]) for r in rows} == {("mine", "avgpool")}
    with pytest.raises(UsageError, match="given twice"):
        probe.fit([stores["vit"], f"again={stores['vit']}:cls4"], P, device="cpu")
    assert np.isfinite([r["report_top1_pct"] for r in rows]).all()
