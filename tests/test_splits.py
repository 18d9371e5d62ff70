"""--split: seeded, stratified train/val/test splits of a dataset without splits (issue 23 item 1).

Before it, a plain folder of class folders became the single split ``all``, which ``probe fit`` never
scores. The assignment is checked against its definition (rank by sha256 of seed + path, cut per
class at round(n x cumulative fraction)), for stability when files are added and for seeding.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from featstore.console import run_cli
from featstore.errors import UsageError
from featstore.manifest import Manifest, SplitManifest
from featstore.splits import apply_split, min_class_size, parse_split
from tests.image_kinds import write_good_images

SPEC = "train=0.7,val=0.1,test=0.2"


def manifest_of(per_class: dict[str, list[str]]) -> Manifest:
    classes = sorted(per_class)
    paths = [p for c in classes for p in per_class[c]]
    labels = np.asarray([i for i, c in enumerate(classes) for _ in per_class[c]], np.int32)
    return Manifest("toy", Path("/data/toy"), tuple(classes), {"all": SplitManifest("all", tuple(paths), labels)})


def files(cls: str, n: int, start: int = 0) -> list[str]:
    return [f"{cls}/img_{i:04d}.jpg" for i in range(start, start + n)]


def assignment(m: Manifest) -> dict[str, str]:
    return {p: s for s, sm in m.splits.items() for p in sm.paths}


def expected_assignment(per_class: dict[str, list[str]], fractions: list[tuple[str, float]], seed: int) -> dict[str, str]:
    """The rule written out independently: rank by sha256('seed\\0path'), cut at floor(n*c + 0.5)."""
    out = {}
    for paths in per_class.values():
        ranked = sorted(paths, key=lambda p: hashlib.sha256(f"{seed}\0{p}".encode()).digest()[:8])
        n, start, c = len(ranked), 0, 0.0
        for name, f in fractions:
            c += f
            stop = n if name == fractions[-1][0] else int(np.floor(n * c + 0.5))
            out.update({p: name for p in ranked[start:stop]})
            start = stop
    return out


def test_split_is_the_documented_rule_and_stratified():
    per_class = {"cat": files("cat", 137), "dog": files("dog", 50), "eel": files("eel", 10)}
    m = apply_split(manifest_of(per_class), parse_split(SPEC, seed=3))
    assert assignment(m) == expected_assignment(per_class, [("train", 0.7), ("val", 0.1), ("test", 0.2)], 3)
    counts = {s: np.bincount(sm.labels, minlength=3).tolist() for s, sm in m.splits.items()}
    assert counts == {"train": [96, 35, 7], "val": [14, 5, 1], "test": [27, 10, 2]}  # round(n x 0.7), round(n x 0.8) - that, rest
    for sm in m.splits.values():  # labels follow the paths
        assert all(m.class_names[y] == p.split("/")[0] for p, y in zip(sm.paths, sm.labels.tolist()))
    assert m.split == {"fractions": {"train": 0.7, "val": 0.1, "test": 0.2}, "seed": 3, "rule": m.split["rule"]}
    assert m.to_dict()["split"]["seed"] == 3


def test_same_files_same_splits_in_any_order_and_seed_changes_them():
    per_class = {"a": files("a", 60), "b": files("b", 40)}
    shuffled = {c: random.Random(1).sample(v, len(v)) for c, v in per_class.items()}
    a = apply_split(manifest_of(per_class), parse_split(SPEC, seed=0))
    b = apply_split(manifest_of(shuffled), parse_split(SPEC, seed=0))
    assert assignment(a) == assignment(b) and a.sha256 == b.sha256
    c = apply_split(manifest_of(per_class), parse_split(SPEC, seed=1))
    moved = sum(assignment(a)[p] != assignment(c)[p] for p in assignment(a))
    assert moved > 20 and a.sha256 != c.sha256


def test_adding_images_moves_at_most_one_image_per_cut_of_its_class():
    rng = random.Random(7)
    per_class = {"a": files("a", 80), "b": files("b", 33)}
    before = assignment(apply_split(manifest_of(per_class), parse_split(SPEC, seed=0)))
    for step in range(25):  # one image at a time, to either class
        cls = rng.choice(["a", "b"])
        per_class[cls].append(f"{cls}/new_{step}.jpg")
        after = assignment(apply_split(manifest_of(per_class), parse_split(SPEC, seed=0)))
        moved = [p for p in before if after[p] != before[p]]
        assert len(moved) <= 2 and all(p.startswith(cls) for p in moved), moved  # 3 splits: 2 cuts
        before = after
    # and a batch of 40 new images leaves most old ones where they were
    start = assignment(apply_split(manifest_of({"a": files("a", 80)}), parse_split(SPEC, seed=0)))
    grown = assignment(apply_split(manifest_of({"a": files("a", 120)}), parse_split(SPEC, seed=0)))
    assert sum(grown[p] != start[p] for p in start) <= 40 * 2


def test_a_file_name_that_is_not_utf8_is_ranked_by_its_bytes():
    """A name of Latin-1 bytes (held surrogate-escaped, as the dataset walk holds it) is split like any
    other, ranked by sha256 of its raw bytes (before: an unexpected UnicodeEncodeError ended the run)."""
    odd = b"a/caf\xe9.jpg".decode("utf-8", "surrogateescape")
    per_class = {"a": files("a", 9) + [odd], "b": files("b", 10)}
    m = apply_split(manifest_of(per_class), parse_split(SPEC, seed=1))
    assert assignment(m)[odd] in ("train", "val", "test") and sum(len(sm) for sm in m.splits.values()) == 20
    ranked = sorted(per_class["a"], key=lambda p: hashlib.sha256(b"1\0" + p.encode("utf-8", "surrogateescape")).digest()[:8])
    assert [p for p in ranked if assignment(m)[p] == "train"] == ranked[:7]  # round(10 x 0.7)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("train=0.7,val=0.2,test=0.2", "sum to 1.1, not 1"),
        ("train=0.7,valid=0.1,test=0.2", "unknown split name 'valid'"),
        ("train=0.7,train=0.3", "names 'train' twice"),
        ("train=0.7,test=abc", "'abc' is not a number"),
        ("train=0.7,test", "'test' is not NAME=FRACTION"),
        ("train=1", "makes a single split"),
        ("train=1.2,test=-0.2", "must be in (0, 1]"),
    ],
)
def test_bad_split_specs(text, needle):
    with pytest.raises(UsageError) as e:
        parse_split(text)
    assert needle in e.value.message and "--split train=0.7,val=0.1,test=0.2" in (e.value.hint or "")


def test_a_class_too_small_for_every_split_is_named():
    # 5 images: cuts at round(3.5) = 4 and round(4.0) = 4 leave val empty; 6: 4, 5, 6
    assert min_class_size(parse_split(SPEC)) == 6
    m = manifest_of({"cat": files("cat", 30), "rare": files("rare", 5)})
    with pytest.raises(UsageError, match=r"class 'rare' has 5 images; --split train=0.7,val=0.1,test=0.2 needs at least 6 per class"):
        apply_split(m, parse_split(SPEC))
    ok = apply_split(manifest_of({"rare": files("rare", 6)}), parse_split(SPEC))
    assert {s: len(sm) for s, sm in ok.splits.items()} == {"train": 4, "val": 1, "test": 1}


def test_split_refuses_a_dataset_with_splits():
    m = Manifest("x", Path("/x"), ("a",), {"train": SplitManifest("train", ("a/1.jpg",), np.zeros(1, np.int32))})
    with pytest.raises(UsageError, match="already has train"):
        apply_split(m, parse_split(SPEC))


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory):
    """Class folders without split folders: 3 classes of 10 real-format JPEG/PNG images."""
    root = tmp_path_factory.mktemp("plain")
    for j, label in enumerate(("ant", "bee", "cow")):
        write_good_images(root / label, 10, seed=40 + j)
    return root


def extract(capsys, *args):
    from featstore.cli import cli

    code = run_cli(cli, "featstore", [str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


FAST = ["--model", "resnet18", "--random-init", "--image-size", "32", "--resize", "32", "--loader", "torch", "--workers", "0"]
FAST += ["--no-progress", "--dtype", "float32", "--batch-size", "16"]


@pytest.mark.slow
def test_extract_with_split_writes_scored_splits_and_probe_reports_test(capsys, plain_folder, tmp_path):
    import featstore
    from probe.cli import main as probe_cli

    out = tmp_path / "s.zarr"
    code, _, err = extract(capsys, "extract", "--dataset", plain_folder, "--split", SPEC, "--split-seed", "5", "--out", out, *FAST)
    assert code == 0, err
    store = featstore.open(out)
    assert {s: len(store.paths(s)) for s in ("train", "val", "test")} == {"train": 21, "val": 3, "test": 6}
    assert store.attrs["dataset"]["split"]["seed"] == 5 and store.attrs["cache_fields"]["split"]["seed"] == 5
    assert "--split train=0.7,val=0.1,test=0.2 --split-seed 5" in store.attrs["command"]
    # the same images land in the same splits as the rule says, whatever the run
    per_class = {c: sorted(f"{c}/{p.name}" for p in (plain_folder / c).iterdir()) for c in ("ant", "bee", "cow")}
    expected = expected_assignment(per_class, [("train", 0.7), ("val", 0.1), ("test", 0.2)], 5)
    assert {p: s for s in ("train", "val", "test") for p in store.paths(s)} == expected

    code, stdout, _ = extract(capsys, "info", out)
    assert code == 0 and "splits     train 21 rows, val 3 rows, test 6 rows  (--split train=0.7,val=0.1,test=0.2, seed 5)" in stdout
    # another seed is another store (cache key), the same request is up to date
    code, stdout, err = extract(capsys, "extract", "--dataset", plain_folder, "--split", SPEC, "--split-seed", "5", "--out", out, *FAST)
    assert code == 0 and "up to date" in stdout + err
    code, _, err = extract(capsys, "extract", "--dataset", plain_folder, "--split", SPEC, "--split-seed", "6", "--out", out, *FAST)
    assert code != 0 and "different" in err and "split" in err

    result = CliRunner().invoke(
        probe_cli, ["fit", "--store", str(out), "--lr", "0.05", "--epochs", "2", "--out", str(tmp_path / "r"), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "r" / "results.csv")))
    assert rows and {r["report_split"] for r in rows} == {"test"} and rows[0]["report_top1_pct"] != ""
    assert json.loads((tmp_path / "r" / "protocol.json").read_text())


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--split", "train=0.5,val=0.1,test=0.2"], "sum to 0.8, not 1"),
        (["--split", "train=0.7,dev=0.3"], "unknown split name 'dev'"),
        (["--split-seed", "3"], "--split-seed is the seed of --split"),
    ],
)
def test_bad_split_options_are_one_line_errors(capsys, plain_folder, tmp_path, args, needle):
    code, _, err = extract(capsys, "extract", "--dataset", plain_folder, "--out", tmp_path / "o.zarr", *FAST, *args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not (tmp_path / "o.zarr").exists()


def test_split_on_a_folder_with_splits_is_a_one_line_error(capsys, small_folder, tmp_path):
    code, _, err = extract(capsys, "extract", "--dataset", small_folder, "--split", SPEC, "--out", tmp_path / "o.zarr", *FAST)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "already has train, val" in lines[0], err
