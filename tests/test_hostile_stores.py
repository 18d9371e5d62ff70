"""Damaged stores never become numbers (issue 29 item 1): each damage of the adversarial trials,
done to a store on disk, is found by `featstore verify` (one line naming split, array and rows)
and refused by `probe fit` (one line naming them and the `--repair` command); `--repair`
re-extracts just the damaged units, to the same bytes.

The fast tests use a small synthetic store (a second or two in all); the repair tests run real
extractions (resnet18, random init, 16 px digits) and are marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import probe
from featstore.cli import cli
from featstore.console import run_cli
from featstore.errors import FeatstoreError
from featstore.manifest import Manifest, SplitManifest
from featstore.store import FeatureStore
from featstore.store.digests import ATTRIBUTE, StoreDamaged, rows_digest
from featstore.store.verify import MAX_UNRECORDED_CLASSES, verify_store
from probe.protocol import Protocol

FAST = dict(lr_grid=(0.1,), epochs=3, batch_size=64)
CLASSES = ["a", "b", "c"]
COMMAND = "featstore extract --model m --dataset d --out s.zarr"
SIZES = {"train": 300, "val": 100, "test": 100}


def _data(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, 8)) * 1.5
    out = {}
    for split, n in SIZES.items():
        y = rng.integers(0, 3, n)
        out[split] = (y, (centers[y] + rng.normal(size=(n, 8))).astype(np.float32))
    return out


def _paths(split: str, n: int) -> list[str]:
    return [f"{split}/{i:04d}.png" for i in range(n)]


def make(path: Path, *, labels: dict[str, np.ndarray] | None = None, classes: bool = True, invalid_row: int | None = 70,
         paths=_paths) -> Path:  # fmt: skip
    """A complete store: 3 Gaussian classes, 64-row units; train row ``invalid_row`` undecodable."""
    data = _data()
    labels = labels or {s: y for s, (y, _) in data.items()}
    manifest = Manifest("toy", Path("/data"), tuple(CLASSES), {s: SplitManifest(s, tuple(paths(s, len(y))), y) for s, y in labels.items()})
    dataset = {"name": "toy", "root": "/data", "manifest_sha256": manifest.sha256}
    if manifest.raw_paths():
        dataset["raw_paths"] = manifest.raw_paths()
    if classes:
        dataset.update(class_names=CLASSES, num_classes=3)
    store = FeatureStore.create(
        path,
        splits={s: (manifest.stored_paths(s), y) for s, y in labels.items()},
        views={"cls": 8},
        dtype="float16",
        chunk_rows=64,
        attrs={"dataset": dataset, "command": COMMAND},
    )
    for split, (_, x) in data.items():
        valid = np.ones(len(x), bool)
        x = x.copy()
        if split == "train" and invalid_row is not None:
            valid[invalid_row] = False
            x[invalid_row] = np.nan
        for u in store.units(split):
            bad = {r: "cannot decode" for r in range(u.start, u.stop) if not valid[r]}
            store.write_unit(u, {"cls": x[u.start : u.stop]}, valid[u.start : u.stop], bad)
    store.finalize()
    return Path(path)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make(tmp_path_factory.mktemp("hostile") / "s.zarr")


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    """A fresh copy to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "s.zarr"))


def fit(path, **options):
    return probe.fit(path, Protocol(**FAST), device="cpu", warn=lambda m: None, **options)


def verify_lines(capsys, path) -> tuple[int, list[str]]:
    code = run_cli(cli, "featstore", ["verify", str(path)])
    out = capsys.readouterr().out
    return code, [line for line in out.splitlines() if line.startswith("damaged: ")]


def refusal(path, *needles: str, **options) -> str:
    with pytest.raises(FeatstoreError) as e:
        fit(path, **options)
    line = e.value.one_line()
    assert "\n" not in line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def _edit_json(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


# ---------------------------------------------------------------- intact


def test_an_intact_store_verifies_and_fits(pristine, capsys):
    code, lines = verify_lines(capsys, pristine)
    assert code == 0 and lines == []
    report = verify_store(FeatureStore.open(pristine))
    assert report.ok and report.digests and report.units == (5 + 2 + 2) * 4  # units × (labels, paths, valid, features/cls)
    rows = fit(pristine)
    assert rows[0]["report_top1_pct"] > 80


def test_every_array_of_every_unit_has_a_digest_of_its_values(pristine):
    store = FeatureStore.open(pristine)
    recorded = store.digests
    assert recorded.present and recorded.created == {s: ["labels", "paths"] for s in SIZES}
    for split in SIZES:
        units = store.units(split)
        assert set(recorded.splits[split]) == {"labels", "paths", "valid", "features/cls"}
        assert all(len(digests) == len(units) for digests in recorded.splits[split].values())
        group = store.split_group(split)
        for u in units:  # the digest is of the values as stored, however they are chunked
            assert recorded.splits[split]["features/cls"][u.index] == rows_digest(np.asarray(group["features/cls"][u.start : u.stop]))
            assert recorded.splits[split]["labels"][u.index] == rows_digest(np.asarray(group["labels"][u.start : u.stop]))


def test_fill_values_cannot_pass_for_data_and_every_chunk_is_written(tmp_path):
    # a unit whose rows are all invalid equals the fill values: its chunks must still exist
    store = FeatureStore.create(tmp_path / "f.zarr", splits={"train": (_paths("train", 4), np.array([0, 1, 0, 1]))}, views={"v": 2},
                                chunk_rows=2)  # fmt: skip
    group = store.split_group("train")
    assert group["labels"].fill_value == -1
    for u in store.units("train"):
        store.write_unit(u, {"v": np.full((2, 2), np.nan)}, np.zeros(2, bool), {r: "bad" for r in range(u.start, u.stop)})
    for name in ("valid", "features/v"):
        assert len([p for p in (tmp_path / "f.zarr" / "train" / name / "c").rglob("*") if p.is_file()]) == 2, name


def test_future_arrays_of_a_unit_are_covered_too(tmp_path):
    """A split's array that a later schema adds (dense targets, patch tokens) gets digests without
    code of its own: the units' markers digest every array of the split."""
    path = tmp_path / "t.zarr"
    store = FeatureStore.create(path, splits={"train": (_paths("train", 6), np.array([0, 1, 2, 0, 1, 2]))}, views={"v": 2}, chunk_rows=3)
    group = store.split_group("train")
    group.create_array("targets/mask", shape=(6, 2, 2), dtype="uint8", chunks=(3, 2, 2), fill_value=255)
    for u in store.units("train"):
        group["targets/mask"][u.start : u.stop] = np.arange(u.rows * 4, dtype=np.uint8).reshape(u.rows, 2, 2)
        store.write_unit(u, {"v": np.ones((u.rows, 2))}, np.ones(u.rows, bool))
    store.finalize()
    assert len(FeatureStore.open(path).digests.splits["train"]["targets/mask"]) == 2
    assert verify_store(FeatureStore.open(path)).ok
    FeatureStore.open(path, mode="r+").split_group("train")["targets/mask"][4] = 9
    report = verify_store(FeatureStore.open(path))
    assert [p.line() for p in report.problems] == [
        "train/targets/mask rows 3-5: does not match its digest (changed or lost since it was written)"
    ]


# ---------------------------------------------------------------- the damages of the trials


def test_a_deleted_labels_chunk_is_refused_not_read_as_class_0(store, capsys):
    (store / "val" / "labels" / "c" / "0").unlink()
    code, lines = verify_lines(capsys, store)
    assert code == 1 and lines[0] == "damaged: val/labels rows 0-99: chunk file missing (reads as the fill value -1)"
    line = refusal(store, "val/labels rows 0-63", "--repair", COMMAND)
    assert line.startswith(f"store {str(store)!r} is damaged:")
    # without digest checks the lost labels read -1: outside [0, 3), still refused
    refusal(store, "val/labels", "outside [0, 3)", "a lost chunk", verify=False)


def test_labels_beyond_the_class_count_are_refused(tmp_path, capsys):
    labels = {s: y.copy() for s, (y, _) in _data().items()}
    labels["test"][5] = 3  # written that way: its digest matches, its value is no class
    path = make(tmp_path / "l.zarr", labels=labels)
    refusal(path, "test/labels row 5", "outside [0, 3)", "e.g. 3 at row 5")
    code, lines = verify_lines(capsys, path)
    assert code == 1 and lines == ["damaged: test/labels row 5: 1 label outside [0, 3), e.g. 3 at row 5"]


def test_a_label_of_2e9_is_refused_not_a_12_TB_allocation(store):
    FeatureStore.open(store, mode="r+").split_group("train")["labels"][10] = 2_000_000_000
    refusal(store, "train/labels rows 0-63", "do not match their digest")
    refusal(store, "train/labels row 10", "2000000000", verify=False)


def test_a_huge_label_without_a_recorded_class_count_is_refused(tmp_path):
    labels = {s: y.copy() for s, (y, _) in _data().items()}
    labels["train"][0] = MAX_UNRECORDED_CLASSES
    refusal(make(tmp_path / "n.zarr", labels=labels, classes=False), "label 1048576", "records no class count")


def test_a_deleted_valid_chunk_does_not_drop_rows_silently(store, capsys):
    (store / "train" / "valid" / "c" / "1").unlink()
    code, lines = verify_lines(capsys, store)
    assert code == 1 and lines == ["damaged: train/valid rows 64-127: chunk file missing (reads as the fill value False)"]
    refusal(store, "train/valid rows 64-127", "--repair")


def test_a_truncated_chunk_is_one_line_not_an_unexpected_error(store, capsys):
    chunk = store / "train" / "features" / "cls" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    code, lines = verify_lines(capsys, store)
    assert code == 1 and lines[0].startswith("damaged: train/features/cls rows 64-127: cannot be read (ValueError")
    refusal(store, "train/features/cls rows 64-127", "cannot be read")
    refusal(store, "train/features/cls rows 64-127", "cannot be read", verify=False)
    truncated = store / "val" / "labels" / "c" / "0"  # a zstd chunk: another error type, the same refusal
    truncated.write_bytes(truncated.read_bytes()[:5])
    refusal(store, "val/labels rows 0-99", "cannot be read", verify=False)


@pytest.mark.parametrize("where", ["attributes", "consolidated", "own"])
def test_a_zarr_json_claiming_more_rows_is_refused(store, capsys, where):
    root = store / "zarr.json"
    if where == "attributes":  # the store's record of the split: 160 rows instead of 100
        _edit_json(root, lambda m: m["attributes"]["splits"].update(val=160))
    elif where == "consolidated":  # the metadata zarr reads
        _edit_json(root, lambda m: m["consolidated_metadata"]["metadata"]["val/labels"].update(shape=[160]))
    else:  # the array's own zarr.json (another reader, or a store without consolidation, reads this one)
        _edit_json(store / "val" / "labels" / "zarr.json", lambda m: m.update(shape=[160]))
    code, lines = verify_lines(capsys, store)
    assert code == 1 and lines, lines
    assert any("val/" in line and "160" in line for line in lines), lines
    refusal(store, "val/", "160")


def test_a_negative_split_size_in_the_attributes_is_named(store, capsys):
    """A recorded split size edited below zero: verify names it (it ended with "unexpected ValueError:
    negative dimensions are not allowed"), as export and probe fit refuse it."""
    _edit_json(store / "zarr.json", lambda m: m["attributes"]["splits"].update(val=-5))
    code, lines = verify_lines(capsys, store)
    assert code == 1 and lines and all("unexpected" not in line for line in lines), lines
    assert any(line.startswith("damaged: val/") and "-5" in line for line in lines), lines


def test_an_arrays_own_zarr_json_edited_otherwise_than_its_shape_is_refused(store, capsys):
    """zarr reads the consolidated metadata, so an array's own zarr.json could say another dtype or
    fill value unseen, until a reader without consolidation (or a repair's re-consolidation) read
    it: every field zarr decodes by is compared, not only the shape."""
    _edit_json(store / "val" / "features" / "cls" / "zarr.json", lambda m: m.update(data_type="float32", fill_value=0.0))
    code, lines = verify_lines(capsys, store)
    assert code == 1 and lines == [
        'damaged: val/features/cls: its zarr.json says data_type "float32", the store\'s metadata "float16"',
        'damaged: val/features/cls: its zarr.json says fill_value 0.0, the store\'s metadata "NaN"',
    ], lines


@pytest.mark.parametrize("damage", ["missing", "unreadable"])
def test_an_arrays_own_zarr_json_missing_is_found_and_restored_by_repair(store, capsys, damage):
    """featstore reads the consolidated metadata and would read on; zarr without it (xarray, the
    re-consolidation a repair ends with) finds no array: verify names it (it said "ok"), and a repair
    writes the file back from the consolidated entry (it refused, or, with a chunk lost too, dropped
    the array at its re-consolidation)."""
    import zarr

    from featstore.store.repair import reopen_damaged

    own = store / "val" / "features" / "cls" / "zarr.json"
    before = json.loads(own.read_text())
    own.unlink() if damage == "missing" else own.write_bytes(b"\x00not json")
    said = "is missing (readers without the consolidated metadata find no array)" if damage == "missing" else "is unreadable"
    code, lines = verify_lines(capsys, store)
    assert code == 1 and len(lines) == 1 and lines[0].startswith(f"damaged: val/features/cls: its own zarr.json {said}"), lines
    assert reopen_damaged(FeatureStore.open(store, mode="r+"), {}) == 0  # restored: nothing left to re-extract
    assert json.loads(own.read_text()) == before and verify_store(FeatureStore.open(store)).ok
    unconsolidated = zarr.open_group(str(store), mode="r", use_consolidated=False)
    np.testing.assert_array_equal(unconsolidated["val/features/cls"][:], FeatureStore.open(store).features("val", "cls").read())


def test_class_names_edited_in_the_attributes_are_refused(store, capsys):
    """Labels and paths have digests; the class names live in the attributes, covered by the
    manifest digest only: reordered, every per-class result would carry another class's name."""
    _edit_json(store / "zarr.json", lambda m: m["attributes"]["dataset"]["class_names"].reverse())
    code, lines = verify_lines(capsys, store)
    assert code == 1 and lines == ["damaged: the class names in the store's attributes do not match the dataset's manifest digest (edited)"]


def test_an_edited_feature_value_is_refused(store):
    FeatureStore.open(store, mode="r+").split_group("test")["features/cls"][70, 3] = 0.5
    refusal(store, "test/features/cls rows 64-99", "do not match their digest")
    assert fit(store, verify=False)[0]["report_top1_pct"] > 80  # --no-verify reads it as it is (documented)


def test_a_deleted_features_chunk_is_refused(store, capsys):
    (store / "val" / "features" / "cls" / "c" / "1" / "0").unlink()
    code, lines = verify_lines(capsys, store)
    assert code == 1 and lines == ["damaged: val/features/cls rows 64-99: chunk file missing (reads as the fill value nan)"]
    refusal(store, "val/features/cls rows 64-99")


def test_verify_names_every_problem_on_its_own_line(store, capsys):
    (store / "train" / "valid" / "c" / "2").unlink()
    FeatureStore.open(store, mode="r+").split_group("test")["features/cls"][3, 3] = 1.0
    code, lines = verify_lines(capsys, store)
    assert code == 1
    assert lines == [
        "damaged: train/valid rows 128-191: chunk file missing (reads as the fill value False)",
        "damaged: test/features/cls rows 0-63: does not match its digest (changed or lost since it was written)",
    ]


# ---------------------------------------------------------------- stores written before digests


def _strip_digests(path: Path) -> None:
    """What a store of the previous featstore looked like: no digests, labels filled with 0."""
    _edit_json(path / "zarr.json", lambda m: m["attributes"].pop(ATTRIBUTE))
    for split in SIZES:
        _edit_json(path / "zarr.json", lambda m, s=split: m["consolidated_metadata"]["metadata"][f"{s}/labels"].update(fill_value=0))
        _edit_json(path / split / "labels" / "zarr.json", lambda m: m.update(fill_value=0))


def test_a_store_without_digests_opens_and_verify_checks_what_it_can(store, capsys):
    _strip_digests(store)
    warnings: list[str] = []
    assert probe.fit(store, Protocol(**FAST), device="cpu", warn=warnings.append)[0]["report_top1_pct"] > 80
    assert any("records no content digests" in w for w in warnings)
    code = run_cli(cli, "featstore", ["verify", str(store)])
    out = capsys.readouterr().out
    assert code == 0 and "note: no content digests" in out and "ok" in out.splitlines()[-1]

    (store / "train" / "valid" / "c" / "3").unlink()  # reads False: 43 rows dropped, caught by the invalid-row record
    (store / "test" / "features" / "cls" / "c" / "0" / "0").unlink()  # reads NaN for valid rows
    (store / "val" / "labels" / "c" / "0").unlink()  # reads 0, a real class: caught by the chunk and the manifest
    code, lines = verify_lines(capsys, store)
    assert code == 1
    assert lines == [
        "damaged: train/valid rows 192-255: 64 rows read as invalid but none is recorded invalid",
        "damaged: val/labels rows 0-99: chunk file missing (reads as the fill value 0)",
        "damaged: test/features/cls rows 0-63: chunk file missing: valid rows read as NaN",
        "damaged: the labels and paths do not match the dataset's manifest digest (a label or path changed or was lost)",
    ]


def test_a_file_name_that_is_not_utf8_verifies_and_so_does_its_export(tmp_path, capsys):
    """The manifest digest was taken over the raw names; the store keeps such a name as ``\\xNN``
    text (its bytes in ``raw_paths``), and verify hashed the text: a fresh store was 'edited'."""
    from featstore.store.export import export

    def paths(split: str, n: int) -> list[str]:
        names = _paths(split, n)
        names[5] = os.fsdecode(b"val/v\xff" + os.fsencode(names[5])) if split == "val" else names[5]
        return names

    path = make(tmp_path / "s.zarr", paths=paths)
    assert FeatureStore.open(path).paths("val")[5] == "val/v\\xffval/0005.png"
    code, lines = verify_lines(capsys, path)
    assert code == 0 and lines == []
    export(str(path), str(tmp_path / "s.h5"))
    code, lines = verify_lines(capsys, tmp_path / "s.h5")
    assert code == 0 and lines == []
    _edit_json(path / "zarr.json", lambda m: m["attributes"]["dataset"]["raw_paths"]["val"].update({"5": b"val/v\xfe".hex()}))
    code, lines = verify_lines(capsys, path)  # a raw name that is not the stored one is not taken
    assert code == 1 and lines == ["damaged: the class names in the store's attributes do not match the dataset's manifest digest (edited)"]


# ---------------------------------------------------------------- HDF5 exports


def test_an_hdf5_export_carries_the_digests_and_is_checked_the_same_way(pristine, tmp_path, capsys):
    import h5py

    from featstore.store.export import export

    h5 = tmp_path / "s.h5"
    export(str(pristine), str(h5))
    assert verify_store(FeatureStore.open(h5)).ok
    with h5py.File(h5, "r+") as f:
        f["val/labels"][3] = 2_000_000_000
    code, lines = verify_lines(capsys, h5)
    assert code == 1 and lines == [
        "damaged: val/labels rows 0-63: does not match its digest (changed or lost since it was written)",
        "damaged: val/labels row 3: 1 label outside [0, 3), e.g. 2000000000 at row 3",
    ]
    line = refusal(h5, "val/labels rows 0-63", "an HDF5 export", "then export it again")
    assert COMMAND in line
    refusal(h5, "val/labels row 3", verify=False)


def test_a_damaged_store_is_not_exported(store, tmp_path):
    from featstore.store.export import export

    (store / "test" / "valid" / "c" / "0").unlink()
    with pytest.raises(StoreDamaged, match="test/valid rows 0-63"):
        export(str(store), str(tmp_path / "x.h5"))
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize(
    "damage, needle",
    [
        ("rows", "train/labels: has 12 rows, the store records 300"),
        ("size", "val/features/cls: has 100 rows, the store records -5"),
        ("classes", "train/labels rows 2-296: 114 labels outside [0, 2)"),
    ],
)
def test_a_store_verify_calls_damaged_is_not_exported(store, tmp_path, capsys, damage, needle):
    """docs/verify.md: export refuses a damaged store. It checked the digests only, and exported a
    store whose train/labels said 12 rows (the others 8), or whose split size was -5."""
    root = store / "zarr.json"
    if damage == "rows":
        _edit_json(store / "train" / "labels" / "zarr.json", lambda m: m.update(shape=[12]))
        _edit_json(root, lambda m: m["consolidated_metadata"]["metadata"]["train/labels"].update(shape=[12]))
    elif damage == "size":
        _edit_json(root, lambda m: m["attributes"]["splits"].update(val=-5))
    else:  # a class count the labels exceed
        _edit_json(root, lambda m: m["attributes"]["dataset"].update(num_classes=2, class_names=CLASSES[:2]))
    assert run_cli(cli, "featstore", ["verify", str(store)]) == 1
    capsys.readouterr()
    for to in ("x.h5", "x.npz"):
        code = run_cli(cli, "featstore", ["export", str(store), "--to", str(tmp_path / to)])
        err = capsys.readouterr().err
        assert code == 1 and len(err.splitlines()) == 1 and needle in err and "is damaged" in err, err
        assert not list(tmp_path.glob("x*")) and not list(tmp_path.glob(".*tmp"))


def test_a_feature_chunk_changed_in_place_is_not_exported(store, tmp_path):
    """One flipped byte in a feature chunk keeps its size, so the export copied the chunk's bytes
    as they were (its fast path), damaged, over a good export; they are checked like every read."""
    from featstore.store.export import export

    export(str(store), str(tmp_path / "good.h5"))
    good = (tmp_path / "good.h5").read_bytes()
    chunk = store / "train" / "features" / "cls" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0x40
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreDamaged, match="train/features/cls rows 64-127"):
        export(str(store), str(tmp_path / "good.h5"), overwrite=True)
    assert (tmp_path / "good.h5").read_bytes() == good and not list(tmp_path.glob(".*tmp"))


# ---------------------------------------------------------------- --repair (real extractions)

EXTRACT = dict(model="resnet18", random_init=True, dataset="digits", image_size=16, resize=16, loader="torch", workers=0, batch_size=32,
               chunk_rows=64)  # fmt: skip


def _extract(out: Path, **options):
    from featstore.extraction import ExtractConfig, extract

    return extract(ExtractConfig(**EXTRACT, out=str(out), **options), log=lambda m: None, progress=False)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> Path:
    import torch

    torch.set_num_threads(1)  # the same bits in every run of the same unit
    out = tmp_path_factory.mktemp("repair") / "clean.zarr"
    _extract(out)
    return out


def _contents(path: Path) -> dict:
    store = FeatureStore.open(path)
    out = {ATTRIBUTE: store.attrs[ATTRIBUTE], "invalid": store.attrs.get("invalid")}
    for s in store.splits:
        out.update({f"{s}/pool": store.features(s, "pool").read().tobytes(), f"{s}/labels": store.labels(s).tobytes(),
                    f"{s}/valid": store.valid(s).tobytes(), f"{s}/paths": tuple(store.paths(s))})  # fmt: skip
    return out


@pytest.mark.slow
def test_repair_reextracts_just_the_damaged_units_to_the_same_bytes(extracted, tmp_path):
    out = Path(shutil.copytree(extracted, tmp_path / "s.zarr"))
    chunk = out / "train" / "features" / "pool" / "c" / "3" / "0"
    chunk.write_bytes(chunk.read_bytes()[:50])  # truncated
    (out / "test" / "valid" / "c" / "2").unlink()  # lost
    (out / "val" / "labels" / "c" / "0").unlink()  # lost: rewritten from the dataset, no unit re-extracted for it
    # the store is a copy: its repair command names the copy (the recorded command names the intact original)
    recorded = FeatureStore.open(out).attrs["command"]
    assert f"--out {extracted}" in recorded
    assert refusal(out, "val/labels rows 0-63").endswith(f"(repair it: {recorded.replace(str(extracted), str(out))} --repair)")
    result = _extract(out, repair=True)
    assert result.status == "repaired" and result.rows_written == 2 * 64
    assert verify_store(FeatureStore.open(out)).ok
    assert _contents(out) == _contents(extracted)
    again = _extract(out, repair=True)  # intact now: nothing to do
    assert again.status == "up to date" and again.rows_written == 0


@pytest.mark.slow
def test_repair_of_an_array_folder_deleted_whole(extracted, tmp_path):
    """The folder of one array gone (its zarr.json and every chunk): repaired to the same bytes in one
    run, the array still there for readers without the consolidated metadata (before: "repaired", then
    verify said the array was missing, and a second --repair refused)."""
    import zarr

    out = Path(shutil.copytree(extracted, tmp_path / "s.zarr"))
    shutil.rmtree(out / "val" / "features" / "pool")
    assert _extract(out, repair=True).status == "repaired"
    assert verify_store(FeatureStore.open(out)).ok and _contents(out) == _contents(extracted)
    assert zarr.open_group(str(out), mode="r", use_consolidated=False)["val/features/pool"].shape[0] == len(
        FeatureStore.open(out).labels("val")
    )


@pytest.mark.slow
def test_repair_gives_a_store_without_digests_its_digests(extracted, tmp_path):
    out = Path(shutil.copytree(extracted, tmp_path / "old.zarr"))
    _edit_json(out / "zarr.json", lambda m: m["attributes"].pop(ATTRIBUTE))
    (out / "train" / "valid" / "c" / "5").unlink()
    assert (
        verify_store(FeatureStore.open(out)).problems[0].line()
        == "train/valid rows 320-383: 64 rows read as invalid but none is recorded invalid"
    )
    result = _extract(out, repair=True)
    assert result.status == "repaired" and result.rows_written == 64
    repaired, clean = _contents(out), _contents(extracted)
    # the same digests of every unit (a store without digests records labels and paths with its units, not as created)
    assert repaired.pop(ATTRIBUTE)["splits"] == clean.pop(ATTRIBUTE)["splits"]
    assert repaired == clean


@pytest.mark.slow
def test_a_killed_repair_is_finished_by_the_plain_command(extracted, tmp_path, monkeypatch):
    from featstore.store import feature_store

    out = Path(shutil.copytree(extracted, tmp_path / "k.zarr"))
    (out / "val" / "valid" / "c" / "1").unlink()
    (out / "train" / "features" / "pool" / "c" / "0" / "0").unlink()

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt  # the repair dies before its first unit is written

    monkeypatch.setattr(feature_store.FeatureStore, "write_unit", killed)
    with pytest.raises(KeyboardInterrupt):
        _extract(out, repair=True)
    monkeypatch.undo()
    assert not FeatureStore.open(out).complete
    result = _extract(out)  # no --repair: an ordinary resume of the two pending units
    assert result.status == "resumed" and result.rows_written == 2 * 64
    assert _contents(out) == _contents(extracted)


def test_repair_and_overwrite_contradict(tmp_path, capsys):
    code = run_cli(cli, "featstore", ["extract", "--model", "resnet18", "--out", str(tmp_path / "x.zarr"), "--repair", "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --repair and --overwrite contradict each other") and len(err.splitlines()) == 1


def test_probe_fit_command_refuses_on_one_line_and_no_verify_skips_the_digests(store, tmp_path, capsys):
    from probe.cli import main as probe_cli

    FeatureStore.open(store, mode="r+").split_group("val")["features/cls"][3, 0] = 2.0
    args = ["fit", "--store", str(store), "--lr", "0.1", "--epochs", "1", "--device", "cpu", "--quiet"]
    code = run_cli(probe_cli, "probe", [*args, "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 1 and not (tmp_path / "a").exists()
    assert err.splitlines() == [
        f"error: store {str(store)!r} is damaged: val/features/cls rows 0-63 do not match their digest (changed or lost since they "
        f"were written) (repair it: {COMMAND} --repair)"
    ]
    assert run_cli(probe_cli, "probe", [*args, "--out", str(tmp_path / "b"), "--no-verify"]) == 0
    assert (tmp_path / "b" / "results.csv").is_file()


def _partial(path: Path, units: int) -> FeatureStore:
    """A store in progress: the first ``units`` train units written, nothing else."""
    data = _data()
    store = FeatureStore.create(path, splits={s: (_paths(s, len(y)), y) for s, (y, _) in data.items()}, views={"cls": 8}, chunk_rows=64,
                                attrs={"dataset": {"class_names": CLASSES, "num_classes": 3}})  # fmt: skip
    x = data["train"][1]
    for u in store.units("train")[:units]:
        store.write_unit(u, {"cls": x[u.start : u.stop]}, np.ones(u.rows, bool))
    return store


def test_a_unit_marker_cut_short_or_not_the_units_is_pending_and_named(tmp_path):
    """A marker cut short read as written (it exists): verify said ok and the resume died with
    'unexpected JSONDecodeError' reading it. Such a unit is pending: verify names it, the resume
    writes it again."""
    store = _partial(tmp_path / "p.zarr", 4)
    units = store.units("train")
    cut = store._marker(units[1])
    cut.write_bytes(cut.read_bytes()[:40])
    _edit_json(store._marker(units[2]), lambda m: m.update(rows=[0, 64]))
    _edit_json(store._marker(units[3]), lambda m: m.update(invalid=["x"]))
    reopened = FeatureStore.open(store.path)
    assert [(u.split, u.index) for u in reopened.pending_units("train")] == [("train", i) for i in (1, 2, 3, 4)]
    assert [p.line() for p in verify_store(reopened).problems] == [
        f"train rows {a}-{b}: its progress marker _progress/train/unit-00000{i}.json does not record the unit ({why}): "
        "the unit counts as not written, resuming writes it again"
        for i, a, b, why in [
            (1, 64, 127, "unreadable: JSONDecodeError"),
            (2, 128, 191, "its rows are [0, 64], not [128, 192]"),
            (3, 192, 255, "its invalid rows are not a record of rows"),
        ]
    ]
    reopened = FeatureStore.open(store.path, mode="r+")
    for split, (_, x) in _data().items():  # the resume: every pending unit written again
        for u in reopened.pending_units(split):
            reopened.write_unit(u, {"cls": x[u.start : u.stop]}, np.ones(u.rows, bool))
    reopened.finalize()
    assert verify_store(FeatureStore.open(store.path)).ok


def test_an_incomplete_store_has_its_written_units_checked_and_repair_drops_the_damaged_ones(tmp_path):
    from featstore.store.repair import reopen_damaged

    store = _partial(tmp_path / "p.zarr", 3)
    assert verify_store(FeatureStore.open(store.path)).ok
    store.split_group("train")["features/cls"][130, 1] = 4.0  # unit 2
    report = verify_store(FeatureStore.open(store.path))
    assert [p.line() for p in report.problems] == [
        "train/features/cls rows 128-191: does not match its digest (changed or lost since it was written)"
    ]
    assert any(n.startswith("incomplete: 6 units") for n in report.notes)
    data = _data()
    assert reopen_damaged(FeatureStore.open(store.path, mode="r+"), {s: (_paths(s, len(y)), y) for s, (y, _) in data.items()}) == 1
    assert [(u.split, u.index) for u in FeatureStore.open(store.path).pending_units("train")] == [("train", 2), ("train", 3), ("train", 4)]


def test_a_store_begun_before_digests_gets_them_when_it_is_finished(tmp_path):
    store = _partial(tmp_path / "old.zarr", 2)
    for marker in (store.path / "_progress" / "train").glob("unit-*.json"):  # markers of the previous featstore
        _edit_json(marker, lambda m: m.pop("digests"))
    _edit_json(store.path / "zarr.json", lambda m: m["attributes"].pop(ATTRIBUTE))
    store = FeatureStore.open(store.path, mode="r+")
    data = _data()
    for split, (_, x) in data.items():
        for u in store.pending_units(split):
            store.write_unit(u, {"cls": x[u.start : u.stop]}, np.ones(u.rows, bool))
    store.finalize()
    recorded = FeatureStore.open(store.path).digests
    assert recorded.present and len(recorded.splits["train"]["features/cls"]) == 5 and len(recorded.splits["train"]["labels"]) == 5
    assert verify_store(FeatureStore.open(store.path)).ok
    FeatureStore.open(store.path, mode="r+").split_group("train")["features/cls"][5, 5] = 3.0  # a unit written before the upgrade
    assert not verify_store(FeatureStore.open(store.path)).ok


def test_an_empty_split_verifies(tmp_path):
    store = FeatureStore.create(tmp_path / "e.zarr", splits={"train": (["a", "b"], np.array([0, 1])), "test": ([], np.array([], int))},
                                views={"v": 2}, chunk_rows=2)  # fmt: skip
    for u in store.pending_units():
        store.write_unit(u, {"v": np.ones((u.rows, 2))}, np.ones(u.rows, bool))
    store.finalize()
    report = verify_store(FeatureStore.open(store.path))
    assert report.ok, [p.line() for p in report.problems]
    assert report.units == 4  # train's one unit × labels, paths, valid, features/v; test has none


def test_featstore_open_verify_checks_what_is_read(store):
    import featstore

    FeatureStore.open(store, mode="r+").split_group("train")["features/cls"][200, 0] = 9.0  # unit 3
    opened = featstore.open(store, verify=True)
    features = opened.features("train", "cls")
    assert features[0:192].shape == (192, 8)  # units 0-2 are intact: read and checked
    with pytest.raises(StoreDamaged, match="train/features/cls rows 192-255"):
        features[192:256]
    assert featstore.open(store).features("train", "cls")[200, 0] == 9.0  # unverified: as it is


def test_a_shape_that_disagrees_with_the_schema_is_refused(store, capsys):
    _edit_json(store / "zarr.json", lambda m: m["attributes"]["views"].update(cls=9))
    refusal(store, "train/features/cls: has rows of shape (8,), the schema says (9,)", verify=False)
    code = run_cli(cli, "featstore", ["verify", str(store), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["ok"] is False and len(report["problems"]) == 3  # one per split
    assert report["problems"][0] == "train/features/cls: has rows of shape (8,), the schema says (9,)"


def test_results_that_cannot_be_written_are_one_line_and_leave_nothing(pristine, tmp_path):
    """A full disk or a quota when probe fit writes its results (after training): one line, exit 1,
    no half-written folder (was "unexpected OSError" from the plot). A file-size limit is the full
    disk here (RLIMIT_FSIZE: writes past it fail with EFBIG), in a subprocess."""
    import resource
    import signal
    import subprocess
    import sys

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # results.csv fits; the plot does not

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "probe.cli", "fit", "--store", str(pristine), "--out", str(out), "--epochs", "2", "--lr-grid", "0.1,1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=limited, cwd=Path(__file__).resolve().parents[1])
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines == [
        f"error: cannot write the results to {str(out)!r}: File too large (free space there (or pass another --out) and run again; nothing was written)"
    ], proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
