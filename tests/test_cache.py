"""The feature cache: default store location, up-to-date without torch, ls / rm / gc, lookup by
model and dataset (featstore.cache, featstore.request)."""

from __future__ import annotations

import calendar
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

import numpy as np
import pytest
from click.testing import CliRunner

from featstore import cache
from featstore import home as featstore_home
from featstore.cli import cli
from featstore.errors import FeatstoreError, UsageError
from featstore.extraction import ExtractConfig, extract
from featstore.store import PROGRESS, FeatureStore

REPO = Path(__file__).resolve().parent.parent
TINY = dict(model="resnet18", random_init=True, loader="torch", workers=0, image_size=32, resize=32, device="cpu", dtype="float32")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh $FEATSTORE_HOME per test (digits and weights included)."""
    h = tmp_path / "home"
    monkeypatch.setenv("FEATSTORE_HOME", str(h))
    return h


def run(args, env=None):
    result = CliRunner().invoke(cli, args, env=env)
    return result.exit_code, result.output


def make_cached(
    path: Path,
    key: str,
    *,
    model="dino",
    dataset="imagenet",
    sha="a" * 64,
    rows=10,
    chunk_rows=4,
    units=None,
    views=None,
    invalid_rows=(),
    weights_path="/w/dinov2_vits14_pretrain.pth",
) -> Path:
    """A store as extract writes it (cache key and fields in the attributes); ``units``: how many
    units to write (default all, then finalized), fewer leaves it partial."""
    views = views or {"cls": 6, "avgpool": 6}
    store = FeatureStore.create(
        path,
        splits={"train": ([f"train/{i}.jpg" for i in range(rows)], np.arange(rows) % 2)},
        views=views,
        dtype="float32",
        chunk_rows=chunk_rows,
        attrs={
            "encoder": {"name": model, "arch": f"timm:{model}", "family": "vit", "weights_path": weights_path, "weights_sha256": sha},
            "dataset": {
                "name": dataset,
                "spec": dataset,
                "root": f"/data/{dataset}",
                "class_names": ["a", "b"],
                "num_classes": 2,
                "manifest_sha256": "m" * 64,
            },
            "loader": "torch",
            "cache_key": key,
            "cache_fields": {"compute": "cpu-fp32", "weights_sha256": sha, "manifest_sha256": "m" * 64},
        },
    )
    all_units = store.units("train")
    for u in all_units[: len(all_units) if units is None else units]:
        valid = np.array([r not in invalid_rows for r in range(u.start, u.stop)])
        store.write_unit(
            u,
            {v: np.full((u.rows, d), u.index, np.float32) for v, d in views.items()},
            valid,
            {r: "broken" for r in invalid_rows if u.start <= r < u.stop},  # rows of the split, as the pipeline records them
        )
    if units is None:
        store.finalize()
    return path


def hold_lock(store: Path) -> None:
    """Mark ``store`` as being written by a live process (this one)."""
    import socket

    (store / PROGRESS).mkdir(exist_ok=True)
    (store / PROGRESS / "lock.json").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))


# ---------------------------------------------------------------- item 1: default location, up to date


def test_home_holds_digits_weights_and_stores(home, monkeypatch):
    monkeypatch.delenv("FEATSTORE_WEIGHTS", raising=False)
    assert (
        featstore_home.home() == home
        and featstore_home.weights_dir() == home / "weights"
        and featstore_home.stores_dir() == home / "stores"
    )
    monkeypatch.delenv("FEATSTORE_HOME")
    monkeypatch.setenv("FEATSTORE_CACHE", str(home / "old"))  # the older name still works
    assert featstore_home.home() == home / "old"
    monkeypatch.delenv("FEATSTORE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "xdg"))
    assert featstore_home.home() == home / "xdg" / "featstore"
    monkeypatch.setenv("FEATSTORE_WEIGHTS", str(home / "w"))
    from featstore.models.encoders import weights_dir

    assert weights_dir() == home / "w"


@pytest.mark.slow
def test_extract_without_out_caches_by_key_and_reruns_up_to_date_without_torch(home, small_folder, tmp_path):
    data = tmp_path / "pics"
    shutil.copytree(small_folder, data)
    first = extract(ExtractConfig(dataset=str(data), **TINY), progress=False)
    store = FeatureStore.open(first.store)
    key = store.attrs["cache_key"]
    assert Path(first.store) == home / "stores" / "pics" / f"resnet18-{key[:12]}.zarr"
    assert first.status == "created" and store.complete and store.num_rows("train") == 16

    # the same command again, in a fresh process: answered from the cache without importing torch
    code = (
        "import sys; from featstore.console import run_cli; from featstore.cli import cli; "
        f"rc = run_cli(cli, 'featstore', {['extract', '--dataset', str(data), '--model', 'resnet18', '--random-init', '--loader', 'torch', '--workers', '0', '--image-size', '32', '--resize', '32', '--device', 'cpu', '--dtype', 'float32']!r}); "
        "print('torch imported:', 'torch' in sys.modules, 'zarr imported:', 'zarr' in sys.modules); sys.exit(rc)"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), FEATSTORE_HOME=str(home))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"{first.store}: up to date (24 rows" in out.stdout
    assert "torch imported: False zarr imported: False" in out.stdout

    # another spelling of the same data (a symlink, a relative path) meets the same store by its key
    (tmp_path / "alias").symlink_to(data)
    again = extract(ExtractConfig(dataset=str(tmp_path / "alias"), **TINY), progress=False)
    assert again.status == "up to date" and again.store == first.store

    # a changed dataset is another request: a new store, never a stale "up to date"
    shutil.copy(next((data / "train" / "cat").glob("*.png")), data / "train" / "cat" / "zz-extra.png")
    changed = extract(ExtractConfig(dataset=str(data), **TINY), progress=False)
    assert changed.status == "created" and changed.store != first.store
    assert FeatureStore.open(changed.store).num_rows("train") == 17
    assert len(cache.list_stores()) == 2


def test_cli_extract_asks_the_memo_once_per_command(home, small_folder, monkeypatch):
    """The CLI asks the up-to-date memo before importing torch; on a miss, extract() does not ask again."""
    import featstore.extraction
    import featstore.request

    asked, recall = [], featstore.request.recall_up_to_date
    for module in (featstore.request, featstore.extraction):
        monkeypatch.setattr(module, "recall_up_to_date", lambda config: asked.append(config) or recall(config))
    args = [
        "extract",
        "--dataset",
        str(small_folder),
        "--model",
        "resnet18",
        "--random-init",
        "--loader",
        "torch",
        "--workers",
        "0",
        "--image-size",
        "32",
        "--resize",
        "32",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--no-progress",
    ]
    for status in ("created", "up to date"):
        code, out = run(args)
        assert code == 0 and f": {status}" in out, out
    assert len(asked) == 2  # the miss, then the hit


def test_the_memos_answer_names_the_store_as_the_full_path_does(home, small_folder, tmp_path, monkeypatch):
    """--out as given (here relative) in the summary, whether the memo or the full path answered."""
    import featstore.request

    answered, recall = [], featstore.request.recall_up_to_date
    monkeypatch.setattr(featstore.request, "recall_up_to_date", lambda config: answered.append(r := recall(config)) or r)
    monkeypatch.chdir(tmp_path)
    args = ["extract", "--dataset", str(small_folder), "--model", "resnet18", "--random-init", "--loader", "torch", "--workers", "0"]
    args += ["--image-size", "32", "--resize", "32", "--device", "cpu", "--dtype", "float32", "--no-progress", "--out", "./s.zarr"]
    outputs = [run(args) for _ in range(2)]
    assert answered[0] is None and answered[1] is not None  # the second was the memo's answer
    assert outputs[0][0] == outputs[1][0] == 0
    assert "s.zarr: created, wrote 24 rows" in outputs[0][1] and "\ns.zarr: up to date (24 rows" in "\n" + outputs[1][1], outputs
    full = extract(ExtractConfig(dataset=str(small_folder), out="./s.zarr", **TINY), progress=False, recalled=True)
    assert full.store == answered[1].store == "s.zarr"


def test_the_memo_is_not_trusted_under_another_weights_folder(home, small_folder, tmp_path, monkeypatch):
    """A preset finds its checkpoint in $FEATSTORE_WEIGHTS (or a hub model in the HF cache): under
    another folder the same command may mean another checkpoint, so the memo leaves it to the full
    path (which reads the file and compares its sha256). Was: "up to date" with the other weights."""
    import featstore.request

    answered, recall = [], featstore.request.recall_up_to_date
    monkeypatch.setattr(featstore.request, "recall_up_to_date", lambda config: answered.append(r := recall(config)) or r)
    args = ["extract", "--dataset", str(small_folder), "--model", "resnet18", "--random-init", "--loader", "torch", "--workers", "0"]
    args += ["--image-size", "32", "--resize", "32", "--device", "cpu", "--dtype", "float32", "--no-progress"]
    for weights in ("a", "a", "b", "a", "a", "hub"):
        if weights == "hub":
            monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
        else:
            monkeypatch.setenv("FEATSTORE_WEIGHTS", str(tmp_path / weights))
        code, out = run(args)
        assert code == 0, out
    assert [r is not None for r in answered] == [False, True, False, False, True, False]


def test_two_folders_of_the_same_names_are_two_stores(home, tmp_path):
    """ImageNet-C's severities (or two preprocessed copies) have the same file names and labels, so
    the same manifest digest; other pixels all the same. Was: the second answered "up to date" with
    the first folder's features, in the cache and at an --out of the first."""
    from tests.image_kinds import write_good_images

    for severity, seed in (("1", 0), ("2", 7)):
        for label in ("cat", "dog"):
            write_good_images(tmp_path / severity / "train" / label, 4, seed=seed + len(label))
    one, two = (extract(ExtractConfig(dataset=str(tmp_path / s), **TINY), progress=False) for s in ("1", "2"))
    assert one.status == two.status == "created" and one.store != two.store
    a, b = (FeatureStore.open(r.store) for r in (one, two))
    assert a.meta.dataset.manifest_sha256 == b.meta.dataset.manifest_sha256  # the same names: paired comparisons still pair them
    assert not np.array_equal(a.features("train", "pool"), b.features("train", "pool"))
    with pytest.raises(UsageError, match="holds another store .different dataset_root"):
        extract(ExtractConfig(dataset=str(tmp_path / "2"), out=one.store, **TINY), progress=False)


def test_a_store_keyed_before_the_dataset_location_is_still_found_for_its_own_folder(home, small_folder, tmp_path):
    """Stores made before the dataset's location entered the cache key keep serving the folder they
    were made from (no re-extraction after an upgrade), and no other folder of the same names."""
    from featstore.job import ROOT_FIELD, cache_key

    data = tmp_path / "pics"
    shutil.copytree(small_folder, data)
    made = extract(ExtractConfig(dataset=str(data), **TINY), progress=False)
    store = FeatureStore.open(made.store, mode="r+")
    older = {k: v for k, v in store.attrs["cache_fields"].items() if k != ROOT_FIELD}  # as an older featstore wrote it
    key = cache_key(older)
    store.update_attrs({"cache_key": key, "cache_fields": older})
    legacy = Path(made.store).with_name(f"resnet18-{key[:12]}.zarr")
    os.rename(made.store, legacy)
    again = extract(ExtractConfig(dataset=str(data), **TINY), progress=False)
    assert again.status == "up to date" and again.store == str(legacy)
    assert extract(ExtractConfig(dataset=str(data), out=str(legacy), **TINY), progress=False).status == "up to date"
    copy = tmp_path / "copy"
    shutil.copytree(small_folder, copy)  # the same names elsewhere: not that store
    other = extract(ExtractConfig(dataset=str(copy), **TINY), progress=False)
    assert other.status == "created" and other.store != str(legacy)


def test_folders_reached_by_links_are_stamped_once(tmp_path):
    """Two links to their own folder (a/ and b/ → .) made the memo's folder walk grow without end
    (a/a/b/a/…): extraction finished, then hung. Each folder is visited once; run in a child with a
    time limit, so that a regression fails instead of hanging the suite."""
    cls = tmp_path / "data" / "cat"
    cls.mkdir(parents=True)
    (cls / "a").symlink_to(".")
    (cls / "b").symlink_to(".")
    (tmp_path / "data" / "dog").mkdir()
    code = f"from featstore.request import dataset_dirs; print(len(dataset_dirs({str(tmp_path / 'data')!r})))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO))
    )
    assert out.returncode == 0 and out.stdout.strip() == "3", out.stderr  # data, data/cat, data/dog


def test_changed_weights_are_not_up_to_date(home, small_folder, tmp_path):
    import torch
    import torchvision

    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    cfg = dict(TINY, random_init=False, weights=str(weights))
    first = extract(ExtractConfig(dataset=str(small_folder), **cfg), progress=False)
    assert extract(ExtractConfig(dataset=str(small_folder), **cfg), progress=False).status == "up to date"
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), weights)  # same path, new content
    second = extract(ExtractConfig(dataset=str(small_folder), **cfg), progress=False)
    assert second.status == "created" and second.store != first.store
    assert FeatureStore.open(second.store).attrs["encoder"]["weights_sha256"] == featstore_home.file_sha256(weights)


def test_an_image_rewritten_in_place_is_named_on_every_rerun_until_overwrite(home, small_folder, tmp_path):
    """The cache key digests the images' names and labels, not their bytes: an image rewritten under
    its own name meets the store of its old bytes. Every rerun says so in one warning naming the file
    (the memo's quick answer steps aside for it); --overwrite extracts again, and only that image's
    features move."""
    from PIL import Image

    from featstore.image_changes import created_ns

    data = tmp_path / "pics"
    shutil.copytree(small_folder, data)
    logs: list[str] = []
    first = extract(ExtractConfig(dataset=str(data), **TINY), progress=False, log=logs.append)
    before = FeatureStore.open(first.store)
    created, old = before.attrs["created"], before.features("train", "pool")[:]
    untouched = extract(ExtractConfig(dataset=str(data), **TINY), progress=False, log=logs.append)
    assert untouched.status == "up to date" and untouched.modified_images == []
    assert not [line for line in logs if line.startswith("warning")]

    target = sorted((data / "train" / "dog").glob("*.png"))[1]
    with Image.open(target) as im:
        im.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(target)  # other pixels, the same name
    later = cast(int, created_ns(created))  # the first instant after the store's creation second (made now, it could fall within it)
    os.utime(target, ns=(later, later))
    expected = (
        f"warning: 1 of 24 images were modified after this store was created ({created}): train/dog/{target.name}. Its "
        "features are those of the images as they were then; --overwrite extracts them again (if the files were only copied "
        "without their modification times, nothing changed)"
    )
    for _ in range(2):  # said on every rerun, not once: the memo no longer answers for this store
        logs.clear()
        rerun = extract(ExtractConfig(dataset=str(data), **TINY), progress=False, log=logs.append)
        assert rerun.status == "up to date" and rerun.store == first.store
        assert rerun.modified_images == [str(target)]
        assert [line for line in logs if line.startswith("warning")] == [expected]
    args = ["extract", "--dataset", str(data), "--model", "resnet18", "--random-init", "--loader", "torch", "--workers", "0"]
    args += ["--image-size", "32", "--resize", "32", "--device", "cpu", "--dtype", "float32", "--no-progress"]
    code, out = run(args)  # the command line: the warning line, then the summary, exit 0
    assert code == 0 and expected in out and f"{first.store}: up to date" in out, out

    time.sleep(max(0.0, later / 1e9 + 1 - time.time()))  # the new store is created in a later second than the rewrite
    fresh = extract(ExtractConfig(dataset=str(data), overwrite=True, **TINY), progress=False)
    assert fresh.status == "created" and fresh.store == first.store
    new = FeatureStore.open(fresh.store)
    moved = np.flatnonzero(np.abs(new.features("train", "pool")[:] - old).max(axis=1) > 1e-6)
    assert list(new.paths("train")[moved]) == [f"train/dog/{target.name}"]
    logs.clear()
    after = extract(ExtractConfig(dataset=str(data), **TINY), progress=False, log=logs.append)
    assert after.status == "up to date" and after.modified_images == [] and not logs


def test_digits_written_again_are_the_same_images_not_modified_ones(home, tmp_path):
    """The digits folder, deleted and written again (the same bytes), keeps its files' time: a store
    made from the first writing is up to date with no warning."""
    from featstore.digits import FILE_MTIME_NS
    from featstore.image_changes import created_ns

    config = ExtractConfig(dataset="digits", out=str(tmp_path / "d.zarr"), **TINY)
    first = extract(config, progress=False)
    png = home / "digits-v1" / "train" / "0" / "0020.png"
    data = png.read_bytes()
    assert png.stat().st_mtime_ns == FILE_MTIME_NS
    since = cast(int, created_ns(FeatureStore.open(first.store).attrs["created"]))
    shutil.rmtree(home / "digits-v1")
    time.sleep(max(0.0, since / 1e9 + 0.1 - time.time()))  # written again after the store's creation second
    logs: list[str] = []
    again = extract(config, progress=False, log=logs.append)
    assert png.read_bytes() == data and png.stat().st_mtime_ns == FILE_MTIME_NS
    assert again.status == "up to date" and again.modified_images == [] and not [line for line in logs if "warning" in line]


def test_modified_after_compares_each_files_mtime_with_the_stores_creation_second(tmp_path):
    from featstore.image_changes import any_file_modified_after, created_ns, modified_after

    since = created_ns("2026-12-07T21:40:05Z")
    assert since == (calendar.timegm((2026, 12, 7, 21, 40, 5, 0, 0, 0)) + 1) * 10**9  # the next second: the store's own is not "after"
    assert created_ns(None) is None and created_ns("yesterday") is None
    files = {name: tmp_path / "d" / name for name in ("a.png", "b.png", "c.png")}
    files["a.png"].parent.mkdir()
    for offset, f in zip((-1, 0, 7), files.values()):  # within the creation second, the first after it, later
        f.write_bytes(b"x")
        os.utime(f, ns=(since + offset * 10**9 - (1 if offset < 0 else 0),) * 2)
    paths = [str(f) for f in files.values()] + [str(tmp_path / "gone.png")]
    assert modified_after(paths, cast(int, since)) == [str(files["b.png"]), str(files["c.png"])]
    assert any_file_modified_after([str(tmp_path / "d")], cast(int, since))
    assert not any_file_modified_after([str(tmp_path / "d"), str(tmp_path / "none")], cast(int, since) + 8 * 10**9)


def test_a_killed_cached_extraction_resumes_in_place_and_shows_as_partial(home, small_folder, monkeypatch):
    original = FeatureStore.write_unit
    calls = {"n": 0}

    def failing(self, *a, **k):  # the process dies after its first unit
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(FeatureStore, "write_unit", failing)
    with pytest.raises(KeyboardInterrupt):
        extract(ExtractConfig(dataset=str(small_folder), chunk_rows=4, **TINY), progress=False)
    monkeypatch.setattr(FeatureStore, "write_unit", original)
    (entry,) = cache.list_stores()
    assert not entry.complete and entry.state == "partial 1/6 units (17%)"
    with pytest.raises(UsageError, match="not complete"):
        cache.lookup("resnet18", str(small_folder))
    done = extract(ExtractConfig(dataset=str(small_folder), chunk_rows=4, **TINY), progress=False)
    assert done.status == "resumed" and done.store == entry.path and done.rows_written == 20
    assert cache.lookup("resnet18", str(small_folder)) == entry.path
    assert FeatureStore.open(entry.path).attrs["command"].split("--out ")[1].startswith(entry.path)  # info's resume line


def test_a_resumed_store_names_the_images_of_its_finished_units_modified_since(home, small_folder, tmp_path, monkeypatch):
    """Killed after its first unit; then an image of that unit and one of a unit still to come are
    rewritten. The resumed run names the first only: the second is read as it is now."""
    from PIL import Image

    from featstore.image_changes import created_ns

    data = tmp_path / "pics"
    shutil.copytree(small_folder, data)
    config = ExtractConfig(dataset=str(data), out=str(tmp_path / "s.zarr"), chunk_rows=4, **TINY)
    original = FeatureStore.write_unit

    def dies_after_one(self, *a, **k):
        if any(self.is_done(u) for s in self.splits for u in self.units(s)):
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(FeatureStore, "write_unit", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        extract(config, progress=False)
    monkeypatch.setattr(FeatureStore, "write_unit", original)
    store = FeatureStore.open(config.out)
    (done,) = [u for s in store.splits for u in store.units(s) if store.is_done(u)]
    in_done, in_pending = store.paths(done.split)[done.start], store.paths(done.split)[done.stop]
    since = cast(int, created_ns(store.attrs["created"]))
    for rel in (in_done, in_pending):
        with Image.open(data / rel) as im:
            im.convert("RGB").rotate(90).save(data / rel)
        os.utime(data / rel, ns=(since, since))
    logs: list[str] = []
    resumed = extract(config, progress=False, log=logs.append)
    assert resumed.status == "resumed" and resumed.modified_images == [str(data / in_done)]
    assert [line for line in logs if line.startswith("warning")] == [
        f"warning: 1 of 4 images in its finished units were modified after this store was created ({store.attrs['created']}): "
        f"{in_done}. Their rows keep the features of the images as they were then; --overwrite extracts them again (if the "
        "files were only copied without their modification times, nothing changed)"
    ]


def test_file_sha256_matches_hashlib_and_is_memoized(home, tmp_path):
    import hashlib

    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(3 << 20))
    assert featstore_home.file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    assert len(list((home / "index" / "sha256").iterdir())) == 1
    f.write_bytes(b"other")  # size and mtime change: hashed again
    assert featstore_home.file_sha256(f) == hashlib.sha256(b"other").hexdigest()


def test_an_out_url_featstore_cannot_write_is_refused_and_creates_nothing(home, tmp_path, monkeypatch):
    """s3:// and gs:// are written (test_object_store*.py); http(s) and the like are refused."""
    monkeypatch.chdir(tmp_path)
    code, output = run(["extract", "--model", "resnet18", "--random-init", "--out", "http://host/x.zarr"])
    assert code == 2
    assert output.strip().splitlines() == [
        "error: cannot write a store to 'http://host/x.zarr': featstore writes to s3:// and gs:// URLs "
        "(write to s3://BUCKET/PREFIX/NAME.zarr (or gs://), or to a local folder)"
    ]
    assert list(tmp_path.iterdir()) == []  # no http:/host/x.zarr folder


# ---------------------------------------------------------------- item 2: ls, rm, gc


def test_ls_lists_complete_partial_and_written_stores(home):
    done = make_cached(home / "stores" / "imagenet" / "dino-aaaaaaaaaaaa.zarr", "a" * 64, invalid_rows=(3,))
    part = make_cached(home / "stores" / "imagenet" / "dino-bbbbbbbbbbbb.zarr", "b" * 64, units=2, invalid_rows=(1, 5, 9))
    busy = make_cached(home / "stores" / "digits" / "resnet18-cccccccccccc.zarr", "c" * 64, model="resnet18", dataset="digits", units=2)
    hold_lock(busy)
    (home / "stores" / "imagenet" / "notes").mkdir()  # not a store: ignored

    code, output = run(["ls", "--json"])
    assert code == 0, output
    entries = {Path(e["path"]).name: e for e in json.loads(output)}
    assert set(entries) == {done.name, part.name, busy.name}
    d = entries[done.name]
    assert (d["model"], d["dataset"], d["rows"], d["invalid"], d["complete"]) == ("dino", "imagenet", 10, 1, True)
    assert d["views"] == {"cls": 6, "avgpool": 6} and d["label"] == "dinov2_vits14_pretrain"
    assert d["weights"] == "dinov2_vits14_pretrain.pth (aaaaaaaa)" and d["state"] == "complete"
    assert d["size_bytes"] == sum(p.stat().st_size for p in done.rglob("*") if p.is_file())
    assert entries[part.name]["state"] == "partial 2/3 units (67%)"
    assert entries[busy.name]["state"] == "writing 2/3 units (67%)"
    # a partial store's invalid rows so far: its finished units' (rows 1 and 5; row 9's unit is not written)
    assert entries[part.name]["invalid"] == 2
    assert [(r["row"], r["path"], r["reason"]) for r in FeatureStore.open(part).invalid_rows()] == [
        (1, "train/1.jpg", "broken"),
        (5, "train/5.jpg", "broken"),
    ]

    code, text = run(["ls"])
    lines = text.strip().splitlines()
    assert code == 0 and lines[0].split()[:4] == ["LABEL", "MODEL", "WEIGHTS", "DATASET"] and len(lines) == 4
    assert any("partial 2/3 units" in line and str(part) in line for line in lines)


def test_ls_and_probe_give_a_store_the_same_label(home, tmp_path):
    """One label rule (featstore.store.store_label): ``x.pth.tar`` is ``x`` in ``featstore ls`` and in probe."""
    from probe.stores import default_label

    tar = make_cached(tmp_path / "t.zarr", "e" * 64, weights_path="/w/x.pth.tar")
    bare = make_cached(tmp_path / "b.zarr", "f" * 64, weights_path="")
    for path, label in ((tar, "x"), (bare, "dino")):
        assert cache.describe(path).label == label
        assert [e.label for e in cache.list_stores([str(path)])] == [label]
        assert default_label(FeatureStore.open(path)) == label
    code, output = run(["ls", "--json", str(tar)])
    assert code == 0 and json.loads(output)[0]["label"] == "x"


def test_ls_paths_and_bad_paths(home, tmp_path):
    elsewhere = make_cached(tmp_path / "mine" / "deep" / "s.zarr", "d" * 64)
    code, output = run(["ls", "--json", str(tmp_path / "mine")])  # a folder holding stores
    assert code == 0 and [e["path"] for e in json.loads(output)] == [str(elsewhere)]
    code, output = run(["ls", "--json", str(elsewhere)])
    assert code == 0 and json.loads(output)[0]["cache_key"] == "d" * 64
    (tmp_path / "empty").mkdir()
    assert run(["ls", str(tmp_path / "empty")]) == (
        2,
        f"error: no featstore stores in {str(tmp_path / 'empty')!r} (pass store folders, or folders holding them)\n",
    )
    code, output = run(["ls", str(tmp_path / "nope.zarr")])
    assert code == 2 and output.startswith("error: store") and "not found" in output
    code, output = run(["ls"])
    assert code == 0 and "no stores in" in output


def test_rm_removes_stores_and_refuses_others(home, tmp_path):
    a = make_cached(home / "stores" / "imagenet" / "dino-aaaaaaaaaaaa.zarr", "a" * 64)
    b = make_cached(home / "stores" / "imagenet" / "dino-bbbbbbbbbbbb.zarr", "b" * 64)
    busy = make_cached(home / "stores" / "imagenet" / "dino-cccccccccccc.zarr", "c" * 64, units=1)
    hold_lock(busy)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.txt").write_text("mine")

    code, output = run(["rm", str(a), str(tmp_path / "typo.zarr")])  # a typo: nothing is removed
    assert code == 2 and "not found" in output and a.exists()
    code, output = run(["rm", str(other)])
    assert code == 2 and "is not a featstore store" in output and (other / "keep.txt").read_text() == "mine"
    code, output = run(["rm", str(busy)])
    assert code == 1 and "being written" in output and busy.exists()
    with pytest.raises(FeatstoreError, match="being written by pid"):
        cache.remove_store(busy)  # the library refuses too (the lock is taken before deleting)

    code, output = run(["rm", str(a), str(b)])
    assert code == 0 and output.count("removed ") == 2 and not a.exists() and not b.exists()
    assert not any(p.name.startswith(".") for p in a.parent.iterdir())  # no leftovers
    assert [Path(e.path) for e in cache.list_stores()] == [busy]


def test_rm_through_a_link_twice_or_from_inside(home, tmp_path, monkeypatch):
    """A link to a store is refused (was: "removed", the store intact, its link renamed away and a
    stale lock left in it); one store named twice is removed once (was: an error after deleting it);
    `featstore rm .` inside a store removes it (was: "unexpected ValueError")."""
    a = make_cached(home / "stores" / "imagenet" / "dino-aaaaaaaaaaaa.zarr", "a" * 64)
    b = make_cached(home / "stores" / "imagenet" / "dino-bbbbbbbbbbbb.zarr", "b" * 64)
    link = tmp_path / "link.zarr"
    link.symlink_to(a)
    code, output = run(["rm", str(b), str(link)])
    assert code == 2 and output.startswith(f"error: {str(link)!r} is a symbolic link") and output.count("\n") == 1, output
    assert b.exists() and link.is_symlink() and not (a / PROGRESS / "lock.json").exists()
    with pytest.raises(UsageError, match="is a symbolic link"):
        cache.remove_store(link)
    code, output = run(["rm", str(a), str(a.parent / ".." / "imagenet" / a.name)])
    assert code == 0 and output.count("removed ") == 1 and not a.exists(), output
    monkeypatch.chdir(b)
    code, output = run(["rm", "."])
    assert code == 0 and "removed ." in output and not b.exists(), output
    assert not any(p.name.startswith(".") for p in b.parent.iterdir())


def test_a_killed_overwrite_leaves_no_half_deleted_store(home, small_folder, tmp_path, monkeypatch):
    """--overwrite deletes the old store before creating the new one; killed in the middle of the
    delete, what was left at --out used to be read as a complete store ("up to date" with missing
    chunks). The old store is renamed away first: --out is absent, the next run creates it, and the
    hidden leftover of a dead process is removed then."""
    import featstore.atomic

    out = tmp_path / "s.zarr"
    extract(ExtractConfig(dataset=str(small_folder), out=str(out), **TINY), progress=False)

    def killed(path, *a, **k):
        raise KeyboardInterrupt  # the process dies inside the delete

    monkeypatch.setattr(featstore.atomic.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        extract(ExtractConfig(dataset=str(small_folder), out=str(out), overwrite=True, **TINY), progress=False)
    monkeypatch.undo()
    assert not out.exists()
    (leftover,) = tmp_path.glob(".s.zarr.removing-*")
    leftover.rename(tmp_path / ".s.zarr.removing-999999999")  # as a killed process (a pid no process has) leaves it
    again = extract(ExtractConfig(dataset=str(small_folder), out=str(out), **TINY), progress=False)
    assert again.status == "created" and FeatureStore.open(out).complete
    assert not list(tmp_path.glob(".s.zarr.*"))
    link = tmp_path / "link.zarr"  # --overwrite through a link: refused, the store and the link kept
    link.symlink_to(out)
    with pytest.raises(UsageError, match="is a symbolic link"):
        extract(ExtractConfig(dataset=str(small_folder), out=str(link), overwrite=True, **TINY), progress=False)
    assert link.is_symlink() and FeatureStore.open(out).complete


def test_gc_least_recently_used_first(home):
    stores = {}
    for i, k in enumerate("abcd"):
        stores[k] = make_cached(home / "stores" / "imagenet" / f"dino-{k * 12}.zarr", k * 64, rows=10 + 10 * i)
    partial = make_cached(home / "stores" / "imagenet" / "dino-eeeeeeeeeeee.zarr", "e" * 64, units=1)
    busy = make_cached(home / "stores" / "imagenet" / "dino-ffffffffffff.zarr", "f" * 64, units=1)
    hold_lock(busy)
    now = time.time()
    for days, k in ((40, "a"), (1, "b"), (20, "c"), (0, "d")):  # last used
        featstore_home.mark_used(stores[k], k * 64)
        os.utime(home / "index" / "used" / (k * 64), (now - days * 86400, now - days * 86400))
    sizes = {k: e.size_bytes for k, e in ((Path(e.path).name[5], e) for e in cache.list_stores())}

    assert run(["gc"])[0] == 2  # no rule: nothing to guess
    code, output = run(["gc", "--older-than", "30", "--dry-run"])
    assert code == 0 and output.splitlines()[0].startswith(f"would remove {stores['a']} (") and stores["a"].exists()
    assert str(stores["c"]) not in output and len(output.splitlines()) == 2

    # a size cap removes the least recently used first (a, then c) until the rest fit
    cap = sizes["b"] + sizes["d"] + sizes["e"] + sizes["f"] + 100
    plan = cache.plan_gc(max_size=cap)
    assert [Path(e.path).name[5] for e in plan.remove] == ["a", "c"] and plan.freed == sizes["a"] + sizes["c"]
    code, output = run(["gc", "--max-size", str(cap), "--partial"])
    assert code == 0, output
    left = sorted(Path(e.path).name[5] for e in cache.list_stores())
    assert left == ["b", "d", "f"]  # the partial one went, the one being written stayed
    assert not partial.exists() and busy.exists()


def test_parse_size():
    assert cache.parse_size("50G") == 50 << 30 and cache.parse_size("1.5M") == int(1.5 * (1 << 20)) and cache.parse_size("123") == 123
    with pytest.raises(UsageError, match="cannot read the size"):
        cache.parse_size("lots")


# ---------------------------------------------------------------- item 3: lookup by model and dataset


def test_lookup_finds_one_store_and_explains_none_or_several(home, tmp_path):
    with pytest.raises(UsageError) as e:
        cache.lookup("dino", "imagenet")
    assert "is empty" in e.value.message and "featstore extract --model dino --dataset imagenet" in e.value.hint

    a = make_cached(home / "stores" / "imagenet" / "dino-aaaaaaaaaaaa.zarr", "a" * 64)
    make_cached(home / "stores" / "digits" / "resnet18-bbbbbbbbbbbb.zarr", "b" * 64, model="resnet18", dataset="digits")
    assert cache.lookup("dino", "imagenet") == str(a)
    with pytest.raises(UsageError) as e:
        cache.lookup("dino", "digits")
    assert "dino on imagenet" in e.value.message and "resnet18 on digits" in e.value.message
    assert e.value.hint == "extract it first: `featstore extract --model dino --dataset digits`"

    weights = tmp_path / "finetuned.pth"
    weights.write_bytes(b"tuned")
    tuned = make_cached(
        home / "stores" / "imagenet" / "dino-cccccccccccc.zarr",
        "c" * 64,
        sha=featstore_home.file_sha256(weights),
        weights_path=str(weights),
    )
    with pytest.raises(UsageError, match="2 cached stores match") as e:
        cache.lookup("dino", "imagenet")
    assert "--weights" in e.value.hint
    # what tells them apart: the cache-key fields that differ (digests shortened), and when each was made
    assert "differing in weights_sha256:" in e.value.message and "manifest_sha256" not in e.value.message
    sha = featstore_home.file_sha256(weights)
    assert f"weights_sha256 {'a' * 12}…]" in e.value.message and f"weights_sha256 {sha[:12]}…]" in e.value.message
    assert e.value.message.count("created ") == 2
    assert cache.lookup("dino", "imagenet", weights=str(weights)) == str(tuned)

    make_cached(home / "stores" / "imagenet" / "dinov1-dddddddddddd.zarr", "d" * 64, model="dinov1", units=1)
    with pytest.raises(UsageError, match="not complete") as e:
        cache.lookup("dinov1", "imagenet")
    assert "featstore extract --model dinov1 --dataset imagenet" in e.value.hint


def test_probe_fit_by_model_and_dataset_equals_by_store(home, tmp_path):
    from probe.cli import main as probe_main

    def tiny_store(model: str, seed: int) -> Path:
        rng = np.random.default_rng(seed)
        n, dim = 120, 8
        labels = np.random.default_rng(0).integers(0, 3, n)  # the same images and labels in every store
        x = (rng.normal(size=(n, dim)) + 2.0 * np.eye(3, dim)[labels]).astype(np.float32)
        path = home / "stores" / "toy" / f"{model}-{'abcdef'[seed] * 12}.zarr"
        split = {"train": slice(0, 80), "val": slice(80, 100), "test": slice(100, 120)}
        store = FeatureStore.create(
            path,
            splits={s: ([f"{i}.png" for i in range(r.start, r.stop)], labels[r]) for s, r in split.items()},
            views={"pool": dim},
            dtype="float32",
            chunk_rows=32,
            attrs={
                "encoder": {"name": model, "arch": f"tv:{model}", "family": "cnn", "weights_path": None, "weights_sha256": "random-init"},
                "dataset": {"name": "toy", "spec": "toy", "root": "/toy", "class_names": ["a", "b", "c"], "num_classes": 3,
                            "manifest_sha256": "t"},
                "cache_key": "abcdef"[seed] * 64,
            },
        )  # fmt: skip
        for s in split:
            for u in store.units(s):
                store.write_unit(u, {"pool": x[split[s]][u.start : u.stop]}, np.ones(u.rows, bool))
        store.finalize()
        return path

    path = tiny_store("tiny", 0)
    runner = CliRunner()
    common = ["fit", "--lr-grid", "0.01,0.1", "--epochs", "3", "--device", "cpu", "--quiet"]
    by_model = runner.invoke(probe_main, common + ["--model", "tiny", "--dataset", "toy", "--out", str(tmp_path / "a")])
    by_store = runner.invoke(probe_main, common + ["--store", str(path), "--out", str(tmp_path / "b")])
    assert by_model.exit_code == 0 and by_store.exit_code == 0, by_model.output + by_store.output
    import csv

    def rows(folder):  # every column but the timing
        with open(folder / "results.csv") as f:
            return [{k: v for k, v in r.items() if "seconds" not in k} for r in csv.DictReader(f)]

    assert len(rows(tmp_path / "a")) == 2 and rows(tmp_path / "a") == rows(tmp_path / "b")
    missing = runner.invoke(probe_main, common + ["--model", "tiny", "--dataset", "imagenet"])
    assert missing.exit_code == 2 and "no cached store of --model tiny --dataset imagenet; the cache holds: tiny on toy" in missing.output
    alone = runner.invoke(probe_main, common + ["--model", "tiny"])
    assert alone.exit_code == 2 and "--model and --dataset go together" in alone.output

    # --model repeated compares the models' cached stores, in the order given, as --store would
    other = tiny_store("tiny2", 1)
    both = runner.invoke(probe_main, common + ["--model", "tiny2", "--model", "tiny", "--dataset", "toy", "--out", str(tmp_path / "c")])
    as_stores = runner.invoke(probe_main, common + ["--store", str(other), "--store", str(path), "--out", str(tmp_path / "d")])
    assert both.exit_code == 0 and as_stores.exit_code == 0, both.output + as_stores.output
    assert [r["label"] for r in rows(tmp_path / "c")] == ["tiny2", "tiny2", "tiny", "tiny"]
    assert rows(tmp_path / "c") == rows(tmp_path / "d")
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    unpaired = runner.invoke(probe_main, common + ["--model", "tiny", "--model", "tiny2", "--dataset", "toy", "--weights", str(weights)])
    assert unpaired.exit_code == 2 and "2 --model and 1 --weights" in unpaired.output and "one --weights per --model" in unpaired.output
