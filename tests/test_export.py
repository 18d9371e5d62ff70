"""Stores outside their Zarr folder: HDF5 / npz exports, xarray and dask, lazy reads, and reading
stores at URLs (a real S3 API served by moto on 127.0.0.1, and plain HTTP)."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from featstore.cli import cli
from featstore.errors import FeatstoreError, UsageError
from featstore.store import FeatureStore
from featstore.store.export import export
from probe.fitting import fit
from probe.protocol import Protocol
from tests.test_cache import hold_lock, make_cached
from tests.test_probe import digits_splits, make_store

FAST = Protocol(lr_grid=(0.01, 0.1), epochs=3, batch_size=128)


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory) -> Path:
    """Real data (scikit-learn's digits, pixels as features), 3 splits, two invalid rows."""
    return make_store(tmp_path_factory.mktemp("d") / "digits.zarr", digits_splits(), invalid={"train": [5, 700]}, extra_views=("copy",))


def run(args):
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output


def same_store_contents(a: FeatureStore, b: FeatureStore) -> None:
    assert a.splits == b.splits and a.views == b.views
    for k in ("encoder", "dataset", "cache_key", "invalid", "splits", "views", "dtype", "chunk_rows", "complete"):
        assert a.attrs.get(k) == b.attrs.get(k), k
    for split in a.splits:
        np.testing.assert_array_equal(a.labels(split), b.labels(split))
        np.testing.assert_array_equal(a.valid(split), b.valid(split))
        assert a.paths(split).tolist() == b.paths(split).tolist()
        for view in a.views:
            x, y = a.features(split, view), b.features(split, view)
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)  # NaN rows equal too


def probe_rows(store) -> list[dict]:
    rows = fit(str(store), FAST, device="cpu", warn=lambda m: None)
    return [{k: v for k, v in r.items() if "seconds" not in k and k not in ("store", "label")} for r in rows]


# ---------------------------------------------------------------- item 4: HDF5 and npz


def test_hdf5_export_is_the_same_store_for_plain_h5py_featstore_and_probe(digits_store, tmp_path):
    code, output = run(["export", str(digits_store), "--to", str(tmp_path / "feats.h5")])
    assert code == 0 and output.startswith(f"wrote {tmp_path / 'feats.h5'} (every view,"), output
    zs, hs = FeatureStore.open(digits_store), FeatureStore.open(tmp_path / "feats.h5")
    same_store_contents(zs, hs)
    assert hs.format == "hdf5" and hs.complete and hs.invalid_rows("train") == zs.invalid_rows("train")

    import h5py  # what someone without featstore sees

    with h5py.File(tmp_path / "feats.h5", "r") as f:
        assert set(f) == {"train", "val", "test"}
        ds = f["train/features/pixels"]
        assert ds.shape == (zs.num_rows("train"), 64) and ds.dtype == np.float32 and ds.chunks == (256, 64)
        assert [d.label for d in ds.dims] == ["row", "pixels_dim"]
        assert json.loads(f.attrs["encoder"]) == zs.attrs["encoder"]
        assert json.loads(f.attrs["exported_from"]) == str(digits_store)
        assert f["train/paths"].asstr()[0] == zs.paths("train")[0]
        np.testing.assert_array_equal(f["val/labels"][:], zs.labels("val"))

    assert probe_rows(tmp_path / "feats.h5") == probe_rows(digits_store)  # identical results


def test_npz_export_holds_one_view(digits_store, tmp_path):
    code, output = run(["export", str(digits_store), "--to", str(tmp_path / "one.npz"), "--view", "copy"])
    assert code == 0 and "view copy" in output
    zs = FeatureStore.open(digits_store)
    with np.load(tmp_path / "one.npz") as z:  # no allow_pickle needed
        assert str(z["view"]) == "copy"
        for split in zs.splits:
            np.testing.assert_array_equal(z[f"{split}_features"], zs.features(split, "copy"))
            np.testing.assert_array_equal(z[f"{split}_labels"], zs.labels(split))
            np.testing.assert_array_equal(z[f"{split}_valid"], zs.valid(split))
            assert z[f"{split}_paths"].tolist() == zs.paths(split).tolist()
        assert json.loads(str(z["provenance"]))["dataset"]["manifest_sha256"] == "digits-manifest"
        assert not any(k.endswith("_features") and "pixels" in k for k in z.files)
    assert export(str(digits_store), str(tmp_path / "first.npz"))["view"] == "pixels"  # default: the first view


def test_export_refuses_bad_input(digits_store, tmp_path):
    partial = make_cached(tmp_path / "partial.zarr", "p" * 64, units=1)
    code, output = run(["export", str(partial), "--to", str(tmp_path / "p.h5")])
    assert code == 2 and "is incomplete" in output and not (tmp_path / "p.h5").exists()
    (tmp_path / "exists.h5").write_bytes(b"mine")
    code, output = run(["export", str(digits_store), "--to", str(tmp_path / "exists.h5")])
    assert code == 2 and "already exists" in output and (tmp_path / "exists.h5").read_bytes() == b"mine"
    assert run(["export", str(digits_store), "--to", str(tmp_path / "x.csv")])[1].startswith("error: cannot export to")
    code, output = run(["export", str(digits_store), "--to", str(tmp_path / "x.npz"), "--view", "nope"])
    assert code == 2 and "view 'nope' not in store" in output
    code, output = run(["export", str(tmp_path / "nope.zarr"), "--to", str(tmp_path / "y.h5")])
    assert code == 2 and "not found" in output
    (tmp_path / "plain").mkdir()
    code, output = run(["export", str(tmp_path / "plain"), "--to", str(tmp_path / "y.h5")])
    assert code == 2 and "is not a featstore store" in output
    assert not list(tmp_path.glob(".*tmp"))  # no half files left


def test_corrupt_or_foreign_h5_is_a_one_line_error(digits_store, tmp_path):
    export(str(digits_store), str(tmp_path / "good.h5"))
    data = (tmp_path / "good.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 3])
    (tmp_path / "text.h5").write_text("not hdf5 at all")
    for name in ("cut.h5", "text.h5"):
        with pytest.raises(FeatstoreError, match="is not a readable HDF5 file|lacks split|damaged"):
            fs = FeatureStore.open(tmp_path / name)
            [fs.features(s, v)[:] for s in fs.splits for v in fs.views]
        code, output = run(["info", str(tmp_path / name)])
        assert code != 0 and output.startswith("error: ") and len(output.strip().splitlines()) == 1
    import h5py

    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(UsageError, match="is not a featstore export"):
        FeatureStore.open(tmp_path / "foreign.h5")
    with pytest.raises(UsageError, match="read-only"):
        FeatureStore.open(tmp_path / "good.h5", mode="r+")


# ---------------------------------------------------------------- item 5: xarray and dask


def test_xarray_and_dask_open_the_store(digits_store):
    xr = pytest.importorskip("xarray")
    da = pytest.importorskip("dask.array")
    zs = FeatureStore.open(digits_store)
    ds = xr.open_zarr(str(digits_store), group="train/features")  # consolidated metadata
    assert dict(ds.sizes) == {"row": zs.num_rows("train"), "pixels_dim": 64, "copy_dim": 64}
    assert ds["pixels"].dims == ("row", "pixels_dim")
    np.testing.assert_array_equal(ds["pixels"].values, zs.features("train", "pixels"))
    split = xr.open_zarr(str(digits_store), group="val")
    np.testing.assert_array_equal(split["labels"].values, zs.labels("val"))
    arr = da.from_zarr(str(digits_store), component="test/features/copy")
    assert arr.chunks[0][0] == 256
    np.testing.assert_array_equal(arr.compute(), zs.features("test", "copy"))
    assert "consolidated_metadata" in json.loads((digits_store / "zarr.json").read_text())


# ---------------------------------------------------------------- item 6: lazy reads


def test_features_are_lazy_and_select_rows(tmp_path):
    store_path = make_cached(tmp_path / "s.zarr", "l" * 64, rows=10, chunk_rows=4)  # chunk i holds the value i
    fs = FeatureStore.open(store_path)
    feats = fs.features("train", "cls")
    assert repr(feats) == "FeatureArray(shape=(10, 6), dtype=float32, lazy)" and len(feats) == 10
    # damage the middle chunk: reads that do not touch it still work, so nothing else is read
    chunk = store_path / "train" / "features" / "cls" / "c" / "1" / "0"
    chunk.write_bytes(b"garbage")
    np.testing.assert_array_equal(feats[[9, 0, 0, 8]][:, 0], [2, 0, 0, 2])
    np.testing.assert_array_equal(fs.features("train", "cls", rows=slice(0, 4))[:, 1], [0, 0, 0, 0])
    mask = np.zeros(10, bool)
    mask[[1, 9]] = True
    np.testing.assert_array_equal(fs.features("train", "cls", rows=mask).read()[:, 0], [0, 2])
    np.testing.assert_array_equal(feats.select([9, 8, 1]).select(slice(1, None))[:, 2], [2, 0])
    assert feats[-1].tolist() == [2.0] * 6
    with pytest.raises(Exception):
        feats.read()  # the damaged chunk is read now


# ---------------------------------------------------------------- item 7: remote stores


@pytest.fixture(scope="module")
def s3(digits_store, tmp_path_factory):
    """A real S3 API (moto's server) on 127.0.0.1 holding the digits store and its HDF5 export."""
    from tests.s3_server import moto_s3

    with moto_s3("feats") as bucket:
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.put(str(digits_store), "feats/digits.zarr", recursive=True)
        h5 = tmp_path_factory.mktemp("h5") / "digits.h5"
        export(str(digits_store), str(h5))
        fs.put(str(h5), "feats/digits.h5")
        yield bucket


@pytest.mark.slow
def test_s3_store_info_ls_export_and_probe(s3, digits_store, tmp_path):
    remote = FeatureStore.open(f"{s3}/digits.zarr")
    same_store_contents(remote, FeatureStore.open(digits_store))
    same_store_contents(FeatureStore.open(f"{s3}/digits.h5"), FeatureStore.open(digits_store))

    code, output = run(["info", f"{s3}/digits.zarr"])
    assert code == 0 and output.startswith("store      s3://feats/digits.zarr  (complete,")
    code, output = run(["ls", "--json", f"{s3}/digits.zarr", f"{s3}/digits.h5"])
    entries = json.loads(output)
    assert code == 0 and [e["state"] for e in entries] == ["complete", "complete"] and entries[0]["rows"] == 1797
    assert entries[0]["size_bytes"] >= 1797 * 64 * 4 * 2

    code, output = run(["export", f"{s3}/digits.zarr", "--to", str(tmp_path / "from_s3.h5")])
    assert code == 0, output
    same_store_contents(FeatureStore.open(tmp_path / "from_s3.h5"), FeatureStore.open(digits_store))
    text = (tmp_path / "from_s3.h5").read_bytes()
    assert b"featstore-test-secret" not in text and b"featstore-test-key" not in text  # never in provenance

    assert probe_rows(f"{s3}/digits.zarr") == probe_rows(digits_store)


def test_s3_bad_urls(s3):
    with pytest.raises(UsageError, match="store 's3://feats/nope.zarr' not found"):
        FeatureStore.open(f"{s3}/nope.zarr")
    with pytest.raises(UsageError, match="store 's3://feats/nope.h5' not found"):
        FeatureStore.open(f"{s3}/nope.h5")
    with pytest.raises(UsageError, match="featstore writes to s3:// and gs:// URLs"):
        FeatureStore.open("https://example.org/digits.zarr", mode="r+")
    with pytest.raises(UsageError, match="HDF5 export, read-only"):
        FeatureStore.open(f"{s3}/digits.h5", mode="r+")
    code, output = run(["rm", f"{s3}/nope.zarr"])
    assert code == 2 and "store 's3://feats/nope.zarr' not found" in output


def test_http_store(digits_store):
    pytest.importorskip("aiohttp")
    handler = functools.partial(_QuietHandler, directory=str(digits_store.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{digits_store.name}"
        same_store_contents(FeatureStore.open(url), FeatureStore.open(digits_store))
        with pytest.raises(UsageError, match="not found"):
            FeatureStore.open(url.replace("digits", "nothing"))
    finally:
        server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_a_store_being_written_is_listed_not_exported(tmp_path):
    busy = make_cached(tmp_path / "busy.zarr", "w" * 64, units=1)
    hold_lock(busy)
    code, output = run(["ls", "--json", str(busy)])
    assert code == 0 and json.loads(output)[0]["state"].startswith("writing 1/3")
    code, output = run(["export", str(busy), "--to", str(tmp_path / "b.h5")])
    assert code == 2 and "is incomplete" in output


def test_rm_removes_exports_only(digits_store, tmp_path):
    export(str(digits_store), str(tmp_path / "a.h5"))
    export(str(digits_store), str(tmp_path / "a.npz"))
    np.savez(tmp_path / "mine.npz", x=np.zeros(3))
    (tmp_path / "mine.h5").write_bytes(b"my own data")
    for name in ("mine.npz", "mine.h5"):
        code, output = run(["rm", str(tmp_path / name)])
        assert code != 0 and output.startswith("error: ") and (tmp_path / name).exists()
    code, output = run(["rm", str(tmp_path / "a.h5"), str(tmp_path / "a.npz")])
    assert code == 0 and output.count("removed ") == 2
    assert not (tmp_path / "a.h5").exists() and not (tmp_path / "a.npz").exists()


def test_ls_describes_exports(digits_store, tmp_path):
    export(str(digits_store), str(tmp_path / "a.h5"))
    export(str(digits_store), str(tmp_path / "a.npz"), view="copy")
    code, output = run(["ls", "--json", str(tmp_path / "a.h5"), str(tmp_path / "a.npz")])
    h5, npz = json.loads(output)
    assert code == 0 and h5["views"] == {"pixels": 64, "copy": 64} and npz["views"] == {"copy": 64}
    assert h5["rows"] == npz["rows"] == 1797 and h5["invalid"] == npz["invalid"] == 2 and h5["state"] == "complete"
    assert npz["size_bytes"] == (tmp_path / "a.npz").stat().st_size
    # the name's case does not matter, as for opening it (FeatureStore.open)
    (tmp_path / "a.h5").rename(tmp_path / "A.H5")
    code, output = run(["ls", "--json", str(tmp_path / "A.H5")])
    assert code == 0 and json.loads(output)[0]["views"] == {"pixels": 64, "copy": 64}


def test_a_url_without_its_fsspec_backend_is_a_one_line_error():
    import importlib.util

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    code, output = run(["info", "gs://bucket/feats.zarr"])
    assert code == 1 and output.startswith("error: cannot read 'gs://bucket/feats.zarr'") and "gcsfs" in output
    assert len(output.strip().splitlines()) == 1


def test_credentials_in_a_url_are_refused():
    code, output = run(["info", "https://me:secret@example.org/feats.zarr"])
    assert code == 2 and "holds credentials" in output and "secret" not in output
