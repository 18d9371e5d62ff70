"""The public API: ``featstore.open/extract/ls/lookup/export`` and ``probe.fit/fit_run/compare/report``,
their names, their docstrings, a light ``import featstore``, and one run end to end on real images."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import featstore
import probe

REPO = Path(__file__).resolve().parents[1]
FEATSTORE_API = ["open", "extract", "ls", "lookup", "export"]
PROBE_API = ["fit", "fit_run", "compare", "report"]
TINY = dict(random_init=True, loader="torch", workers=0, device="cpu", dtype="float32", batch_size=8)


def test_the_public_names_exist_and_are_documented_numpydoc_style():
    expected = {
        *FEATSTORE_API,
        "FeatureStore",
        "ExtractConfig",
        "ExtractResult",
        "StoreEntry",
        "FeatstoreError",
        "UsageError",
        "__version__",
    }
    assert expected <= set(featstore.__all__) and expected <= set(dir(featstore))
    assert {*PROBE_API, "Protocol", "StoreSpec", "COLUMNS", "ProbeWarning", "FitResult", "Comparison"} <= set(probe.__all__)
    from featstore.version import __version__

    assert featstore.__version__ == __version__
    assert issubclass(featstore.UsageError, featstore.FeatstoreError)
    assert issubclass(probe.ProbeWarning, UserWarning) and "report_top1_pct" in probe.COLUMNS
    for module, names in ((featstore, FEATSTORE_API), (probe, PROBE_API)):
        for name in names:
            doc = getattr(module, name).__doc__
            for section in ("Parameters\n    ----------", "Returns\n    -------", "Raises\n    ------", "Examples\n    --------"):
                assert section in doc, (module.__name__, name, section)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        featstore.nope  # noqa: B018
    with pytest.raises(AttributeError):
        probe.nope  # noqa: B018


def test_extract_takes_a_config_or_its_fields_and_refuses_anything_else(tmp_path):
    with pytest.raises(TypeError, match="ExtractConfig or its fields"):
        featstore.extract({"model": "resnet18"})
    with pytest.raises(TypeError):
        featstore.extract(model="resnet18", dataset="digits", no_such_field=1)
    with pytest.raises(featstore.UsageError, match="batch-size"):  # keywords override the config's fields
        featstore.extract(featstore.ExtractConfig(model="resnet18", dataset="digits"), batch_size=0, out=str(tmp_path / "x.zarr"))
    with pytest.raises(TypeError, match="results folder"):
        probe.compare(42)
    with pytest.raises(featstore.UsageError, match="not found"):
        probe.compare(tmp_path / "missing")


@pytest.mark.slow
def test_import_featstore_and_its_api_names_import_no_torch_zarr_or_timm():
    code = (
        "import sys, featstore, probe\n"
        "featstore.open, featstore.extract, featstore.ls, featstore.lookup, featstore.export, featstore.ExtractConfig\n"
        # probe.fit and fit_run are the sweep itself (probe.fitting, which imports torch); the rest is light
        "probe.compare, probe.report, probe.Protocol, probe.StoreSpec, probe.COLUMNS\n"
        "print(sorted(m for m in ('torch', 'zarr', 'timm', 'torchvision', 'nvidia.dali') if m in sys.modules))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def _two_class_images(root: Path) -> Path:
    """Dark and bright 16×16 noise images, PNG and JPEG, in train/val/test class folders (30 files)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 7), ("val", 4), ("test", 4)):
        for cls, base in (("dark", 40), ("bright", 200)):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(base + rng.normal(0, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.mark.slow
def test_extract_open_fit_compare_report_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATSTORE_HOME", str(tmp_path / "home"))
    data = _two_class_images(tmp_path / "pics")
    stores = {}
    for size in (32, 48):
        result = featstore.extract(
            model="resnet18",
            dataset=str(data),
            out=str(tmp_path / f"r18-{size}.zarr"),
            image_size=size,
            resize=size,
            progress=False,
            log=lambda m: None,
            **TINY,
        )
        assert isinstance(result, featstore.ExtractResult)
        assert result.status == "created" and result.rows == {"test": 8, "train": 14, "val": 8} and result.invalid == 0
        stores[size] = result.store
    # the same request again: up to date, nothing written
    again = featstore.extract(
        featstore.ExtractConfig(model="resnet18", dataset=str(data), out=stores[32], image_size=32, resize=32, **TINY),
        progress=False,
        log=lambda m: None,
    )
    assert again.status == "up to date"

    store = featstore.open(stores[32])
    assert isinstance(store, featstore.FeatureStore)
    assert sorted(store.splits) == ["test", "train", "val"] and store.views == {"pool": 512}
    features = store.features("train", "pool")
    assert features.shape == (14, 512) and np.isfinite(np.asarray(features)).all()
    assert sorted(np.bincount(store.labels("train")).tolist()) == [7, 7]
    assert store.attrs["preprocessing"]["image_size"] == 32

    entries = featstore.ls(tmp_path)
    assert sorted(e.path for e in entries) == sorted(stores.values()) and all(e.complete and e.rows == 30 for e in entries)
    exported = featstore.export(stores[32], tmp_path / "r18.npz")
    assert exported["format"] == "npz" and exported["view"] == "pool"
    with np.load(tmp_path / "r18.npz") as npz:
        assert npz["test_features"].shape == (8, 512)

    protocol = probe.Protocol(lr_grid="1e-2,1e-1", epochs=3, batch_size=8)
    out = tmp_path / "run"
    rows = probe.fit([f"r18-32={stores[32]}", probe.StoreSpec(stores[48], label="r18-48")], protocol, device="cpu", out=out)
    assert len(rows) == 2 * 2  # 2 stores × 2 learning rates
    selected = [r for r in rows if r["selected"]]
    assert [r["label"] for r in selected] == ["r18-32", "r18-48"]
    assert all(r["report_split"] == "test" and r["n_report"] == 8 and 0 <= r["report_top1_pct"] <= 100 for r in selected)
    assert set(probe.COLUMNS) <= set(rows[0])
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4

    for source in (out, rows):  # a results folder, or the rows in hand: the same comparison
        comparison = probe.compare(source)
        assert isinstance(comparison, probe.Comparison) and comparison.reference == "r18-32"
        ref, other = comparison.rows
        assert ref.is_reference and ref.delta is None and ref.n == 8
        assert other.label == "r18-48" and other.n_paired == 8 and other.delta is not None
        assert other.delta == pytest.approx(other.top1 - ref.top1) and other.delta_ci95[0] <= other.delta <= other.delta_ci95[1]
        assert 0 <= other.mcnemar_p <= 1
    assert probe.compare(out, reference="r18-48").reference == "r18-48"
    assert comparison.to_json()["reference"] == "r18-32"

    paths = probe.report(out, out=tmp_path / "report")
    assert sorted(paths) == ["leaderboard.csv", "leaderboard.md", "report.html"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    assert "r18-48" in paths["leaderboard.md"].read_text()
