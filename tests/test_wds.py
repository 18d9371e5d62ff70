"""WebDataset input (issue 26): ``--dataset wds:...`` reads tar shards made here from real photos.

The shards are written by the ``webdataset`` package's own ``TarWriter``, and what featstore lists in
them is checked against ``webdataset.WebDataset``'s own reading; brace patterns against
``braceexpand`` (WebDataset's expansion). Features from shards must equal, bit for bit, the features
of the same photos as a folder, with each loader (torch, and DALI's CPU pipeline).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from featstore.datasets import resolve_dataset
from featstore.errors import FeatstoreError, UsageError
from featstore.extraction import ExtractConfig, extract
from featstore.manifest import parse_member_ref
from featstore.shards import expand_braces, expand_shards
from featstore.store import FeatureStore
from featstore.tar_index import list_shard, split_name
from featstore.wds_dataset import wds_manifest
from tests.conftest import dali_or_skip

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(model="resnet18", random_init=True, image_size=32, resize=36, workers=0, dtype="float32")
PER_SHARD = 10


def _photos(folder: Path) -> tuple[list[str], np.ndarray, list[bytes]]:
    m = resolve_dataset(str(folder))
    split = m.splits["all"]
    return list(split.paths), split.labels, [(folder / p).read_bytes() for p in split.paths]


def write_shards(folder: Path, dest: Path, per_shard: int = PER_SHARD, extra: dict | None = None, prefix: str = "train") -> list[Path]:
    """The folder's photos, in its manifest's order, as WebDataset shards written by webdataset's TarWriter
    (``<key>.jpg`` + ``<key>.cls`` + ``<key>.json``); ``extra``: index → sample dict replacing that one."""
    import webdataset as wds

    paths, labels, data = _photos(folder)
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for s in range(0, len(paths), per_shard):
        shard = dest / f"{prefix}-{s // per_shard:06d}.tar"
        with wds.TarWriter(str(shard)) as sink:
            for i in range(s, min(s + per_shard, len(paths))):
                sample = {"__key__": f"{i:05d}", "jpg": data[i], "cls": int(labels[i]), "json": {"name": f"class{labels[i]}", "id": i}}
                if extra and i in extra:
                    sample = {"__key__": f"{i:05d}", **extra[i]}
                sink.write(sample)
        out.append(shard)
    return out


@pytest.fixture(scope="module")
def shards(real_photos, tmp_path_factory):
    return write_shards(real_photos, tmp_path_factory.mktemp("shards"))


def _extract(dataset: str, out: Path, loader: str, **kw):
    fields = {**SMALL, "batch_size": 8, **kw}
    return extract(ExtractConfig(dataset=dataset, out=str(out), loader=loader, **fields), progress=False)


# ------------------------------------------------------------------------------ naming shards


@pytest.mark.parametrize(
    "pattern",
    ["a-{000000..000012}.tar", "x{0..3}y{a,b}.tar", "{7..3}", "s-{08..11}.tar", "{a,b{1..2},c}.tar", "plain.tar", "{,x}.tar", "x{a}y"],
)
def test_brace_expansion_agrees_with_braceexpand(pattern):
    from braceexpand import braceexpand

    assert expand_braces(pattern) == list(braceexpand(pattern))


def test_shard_names_expand_in_order_with_globs_and_missing_shards_refused(shards, tmp_path):
    folder = shards[0].parent
    assert expand_shards(str(folder / "train-{000000..000002}.tar")) == [str(s) for s in shards]
    assert expand_shards(str(folder / "train-*.tar")) == [str(s) for s in shards]
    assert expand_shards("train-00000[02].tar", base=folder) == [str(shards[0]), str(shards[2])]
    with pytest.raises(UsageError, match=r"train-000003\.tar.* not found"):
        expand_shards(str(folder / "train-{000000..000003}.tar"))
    with pytest.raises(UsageError, match="matches no file"):
        expand_shards(str(folder / "val-*.tar"))
    with pytest.raises(UsageError, match="unclosed brace"):
        expand_shards(str(folder / "train-{0..2.tar"))
    with pytest.raises(UsageError, match="named twice"):
        expand_shards(str(folder / "train-{000000,000000}.tar"))


# ------------------------------------------------------------------------------ listing shards


def test_listing_agrees_with_webdataset_reading(shards):
    import webdataset as wds

    for shard in shards:
        listing = list_shard(str(shard))
        theirs = list(wds.WebDataset(str(shard), shardshuffle=False, empty_check=False))
        assert [s.key for s in listing.samples] == [t["__key__"] for t in theirs]
        raw = shard.read_bytes()
        for ours, their in zip(listing.samples, theirs):
            assert set(ours.components) == {k for k in their if not k.startswith("__")}
            for ext, (offset, size) in ours.components.items():
                assert raw[offset : offset + size] == their[ext]  # the byte ranges are the members' bytes
            assert ours.label == their["cls"].decode()


def test_split_name_follows_wds2idx():
    IndexCreator = pytest.importorskip("wds2idx", reason="DALI's wds2idx tool comes with its wheel").IndexCreator

    for name in ["a/0001.seg.png", "0001.jpg", "dir.v2/x.cls", "noext", "k.tar.gz"]:
        assert split_name(name) == IndexCreator.split_name(name) or "." not in name


def test_manifest_rows_labels_and_identity(shards, real_photos):
    paths, labels, _ = _photos(real_photos)
    m = wds_manifest(f"wds:{shards[0].parent}/train-{{000000..000002}}.tar")
    split = m.splits["all"]
    assert list(split.paths) == [f"train-{i // PER_SHARD:06d}.tar/{i:05d}" for i in range(len(paths))]
    np.testing.assert_array_equal(split.labels, labels)
    assert m.class_names == tuple(str(k) for k in range(6))
    refs = m.sources("all")
    shard, offset, size, problem = parse_member_ref(refs[13])
    assert shard == str(shards[1]) and not problem
    assert Path(shard).read_bytes()[offset : offset + size] == (real_photos / paths[13]).read_bytes()
    # a json field as the label: names become sorted classes
    by_name = wds_manifest(f"wds:{shards[0].parent}/train-*.tar", label="name")
    assert by_name.class_names == tuple(f"class{k}" for k in range(6))
    np.testing.assert_array_equal(by_name.splits["all"].labels, labels)
    assert by_name.sha256 != m.sha256  # the class names differ: another manifest, another cache key
    # an integer json field, sparse
    by_id = wds_manifest(f"wds:{shards[0].parent}/train-*.tar", label="json:id", labels="sparse")
    np.testing.assert_array_equal(by_id.splits["all"].labels, np.arange(len(paths)))
    with pytest.raises(UsageError, match="names no field"):
        wds_manifest(f"wds:{shards[0].parent}/train-*.tar", label="json:")
    from featstore.job import validate

    with pytest.raises(UsageError, match="applies to WebDataset shards only"):
        validate(ExtractConfig(model="resnet18", dataset="digits", wds_label="name"))


def test_splits_file_yaml_and_json(shards, tmp_path):
    folder = shards[0].parent
    (tmp_path / "sub").mkdir()
    yaml_file = tmp_path / "sub" / "splits.yaml"
    rel = os.path.relpath(folder, yaml_file.parent)
    yaml_file.write_text(f"train: {rel}/train-{{000000..000001}}.tar\nval: [{rel}/train-000002.tar]\n")
    m = wds_manifest(f"wds:{yaml_file}")
    assert {s: len(v) for s, v in m.splits.items()} == {"train": 20, "val": 4}
    assert m.splits["val"].paths[0] == "train-000002.tar/00020"
    json_file = tmp_path / "splits.json"
    json_file.write_text(json.dumps({"train": str(folder / "train-00000[01].tar"), "test": str(folder / "train-000002.tar")}))
    j = wds_manifest(f"wds:{json_file}")
    assert list(j.splits) == ["train", "test"] and j.splits["train"].paths == m.splits["train"].paths
    json_file.write_text(json.dumps({"train": str(folder / "train-*.tar"), "val": str(folder / "train-000002.tar")}))
    with pytest.raises(UsageError, match="in more than one split"):
        wds_manifest(f"wds:{json_file}")
    json_file.write_text(json.dumps(["train"]))
    with pytest.raises(UsageError, match="not a mapping"):
        wds_manifest(f"wds:{json_file}")


def test_split_option_draws_splits_from_one_shard_set(shards):
    from featstore.splits import apply_split, parse_split

    m = wds_manifest(f"wds:{shards[0].parent}/train-*.tar")
    split = apply_split(m, parse_split("train=0.5,val=0.5"))
    assert sorted(len(v) for v in split.splits.values()) == [12, 12]
    # the member table follows the rows wherever the split put them
    whole = dict(zip(m.splits["all"].paths, m.sources("all")))
    for name in split.splits:
        assert split.sources(name) == [whole[p] for p in split.splits[name].paths]


# ------------------------------------------------------------------------------ damaged input


def _damaged(real_photos, dest: Path) -> list[Path]:
    _, labels, data = _photos(real_photos)
    good = data[5]
    extra = {
        2: {"jpg": good[: len(good) // 2], "cls": int(labels[2])},  # truncated JPEG
        6: {"jpg": b"<html><body>not found</body></html>", "cls": int(labels[6])},  # not an image
        11: {"txt": b"a caption, no image", "cls": int(labels[11])},  # no image component
        17: {"jpg": data[17]},  # no label
    }
    return write_shards(real_photos, dest, extra=extra)


EXPECTED_INVALID = {
    "train-000000.tar/00002": "truncated JPEG",
    "train-000000.tar/00006": "not an image: an HTML page",
    "train-000001.tar/00011": "no image component",
    "train-000001.tar/00017": "no label: no .cls component",
}


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_damaged_members_are_invalid_rows_and_the_rest_equals_the_folder(loader, real_photos, tmp_path):
    if loader == "dali":
        dali_or_skip()
    shards = _damaged(real_photos, tmp_path / "shards")
    folder = _extract(str(real_photos), tmp_path / "folder.zarr", loader, batch_size=5)  # 5: DALI pads short batches
    result = _extract(f"wds:{tmp_path}/shards/train-{{000000..000002}}.tar", tmp_path / "wds.zarr", loader, batch_size=5)
    assert result.invalid == 4 and folder.invalid == 0
    store, ref = FeatureStore.open(tmp_path / "wds.zarr"), FeatureStore.open(tmp_path / "folder.zarr")
    reasons = {r["path"]: r["reason"] for r in store.invalid_rows("all")}
    assert reasons.keys() == EXPECTED_INVALID.keys()
    for path, why in EXPECTED_INVALID.items():
        assert why in reasons[path], (path, reasons[path])
    valid = store.valid("all")
    assert valid.sum() == 20 and not valid[[2, 6, 11, 17]].any()
    ours, theirs = store.features("all", "pool")[:], ref.features("all", "pool")[:]
    assert ours[valid].tobytes() == theirs[valid].tobytes()  # bitwise, every good row
    assert np.isnan(ours[~valid]).all()
    assert len(shards) == 3
    if loader == "torch":  # --strict stops at the first, naming the sample as a path inside its shard
        with pytest.raises(FeatstoreError, match=r"cannot decode .*/shards/train-000000\.tar/00002: truncated JPEG"):
            _extract(f"wds:{tmp_path}/shards/train-*.tar", tmp_path / "strict.zarr", loader, strict=True)


def test_truncated_and_garbled_shards(shards, tmp_path):
    raw = shards[1].read_bytes()
    listing = list_shard(str(shards[1]))
    cut_in = listing.samples[4].components["jpg"]  # cut the shard inside the 5th sample's image
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[: cut_in[0] + cut_in[1] // 2])
    m = wds_manifest(f"wds:{cut}", labels="sparse")  # one shard holds some classes only
    assert len(m.splits["all"]) == 5
    assert "truncated" in m.shards.problems["cut.tar/00014"]
    assert not m.skipped
    # a garbled header midway: what precedes it is kept, the rest left out and said so
    garbled = bytearray(raw)
    header = listing.samples[3].components["jpg"][0] - 512
    garbled[header : header + 100] = b"\x07" * 100
    bad = tmp_path / "garbled.tar"
    bad.write_bytes(bytes(garbled))
    g = wds_manifest(f"wds:{bad}", labels="sparse")
    # TarWriter writes a sample's members in sorted order (cls, jpg, json): the 4th sample's .cls came before the garble
    assert len(g.splits["all"]) == 4 and "damaged tar at byte" in g.skipped[0]
    assert "no image component" in g.shards.problems["garbled.tar/00013"]
    text = tmp_path / "text.tar"
    text.write_text("not a tar at all\n" * 40)
    with pytest.raises(UsageError, match="is not a tar archive"):
        wds_manifest(f"wds:{text}")


@pytest.mark.slow
def test_cli_bad_shard_is_one_line(tmp_path):
    text = tmp_path / "x-000000.tar"
    text.write_text("not a tar at all\n" * 40)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for dataset, message in [
        (f"wds:{text}", "is not a tar archive"),
        (f"wds:{tmp_path}/x-{{000000..000001}}.tar", "not found"),
    ]:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "featstore.cli",
                "extract",
                "--model",
                "resnet18",
                "--random-init",
                "--dataset",
                dataset,
                "--out",
                str(tmp_path / "o.zarr"),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], proc.stderr
        assert not (tmp_path / "o.zarr").exists()


# ------------------------------------------------------------------------------ features equal the folder's


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["torch", "dali", "nvjpeg"])  # nvjpeg: its torchvision.io path, on CPU here
def test_shard_features_equal_folder_features_bitwise(loader, shards, real_photos, tmp_path):
    if loader == "dali":
        dali_or_skip()
    folder = _extract(str(real_photos), tmp_path / "folder.zarr", loader)
    result = _extract(f"wds:{shards[0].parent}/train-{{000000..000002}}.tar", tmp_path / "wds.zarr", loader)
    assert result.status == "created" and result.invalid == 0 and folder.invalid == 0
    a, b = FeatureStore.open(tmp_path / "folder.zarr"), FeatureStore.open(tmp_path / "wds.zarr")
    assert b.features("all", "pool")[:].tobytes() == a.features("all", "pool")[:].tobytes()
    np.testing.assert_array_equal(b.labels("all"), a.labels("all"))
    assert b.attrs["dataset"]["shards"]["count"] == 3
    # the same request again: up to date, from the memo (the shards' stamps are unchanged)
    again = _extract(f"wds:{shards[0].parent}/train-{{000000..000002}}.tar", tmp_path / "wds.zarr", loader)
    assert again.status == "up to date"
    if loader == "torch":  # the same shards through an fsspec URL: the same rows, the same bits
        url = _extract(f"wds:file://{shards[0].parent}/train-{{000000..000002}}.tar", tmp_path / "url.zarr", loader)
        assert url.invalid == 0
        assert FeatureStore.open(tmp_path / "url.zarr").features("all", "pool")[:].tobytes() == a.features("all", "pool")[:].tobytes()


def _run_wds(shards, out: Path, mode: str = "none", param: str = "0", env_extra: dict | None = None, wait: bool = True):
    """``featstore extract`` of the test shards in a subprocess (through tests.fault_runner: ``mode`` injects a fault)."""
    dataset = f"wds:{shards[0].parent}/train-{{000000..000002}}.tar"
    args = ["extract", "--model", "resnet18", "--random-init", "--dataset", dataset, "--image-size", "32", "--resize", "36"]
    args += ["--loader", "torch", "--workers", "0", "--batch-size", "4", "--chunk-rows", "8", "--dtype", "float32", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "tests.fault_runner", mode, param, "--", *args, "--out", str(out)]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def clean_wds(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean-wds") / "clean.zarr"
    proc = _run_wds(shards, out)
    assert proc.returncode == 0, proc.stderr
    return out


def _same_store(a_path: Path, b_path: Path) -> None:
    a, b = FeatureStore.open(a_path), FeatureStore.open(b_path)
    assert b.complete and b.attrs["cache_key"] == a.attrs["cache_key"]
    assert b.features("all", "pool")[:].tobytes() == a.features("all", "pool")[:].tobytes()
    assert list(b.paths("all")) == list(a.paths("all"))
    np.testing.assert_array_equal(b.labels("all"), a.labels("all"))


@pytest.mark.slow
def test_resume_after_a_killed_run_equals_an_uninterrupted_one(shards, clean_wds, tmp_path):
    out = tmp_path / "resumed.zarr"
    killed = _run_wds(shards, out, "kill-in-unit", "1")  # dies halfway through writing the second of 3 units
    assert killed.returncode != 0
    assert not FeatureStore.open(out).complete
    resumed = _run_wds(shards, out)
    assert resumed.returncode == 0 and "resumed" in resumed.stdout + resumed.stderr
    _same_store(clean_wds, out)


@pytest.mark.slow
def test_two_ranks_write_one_store_equal_to_one_process(shards, clean_wds, tmp_path):
    """torchrun-style ranks (RANK/WORLD_SIZE) over shards: each lists them (the listing cache is shared), each
    writes its own units, and the store equals the single process's row for row."""
    out = tmp_path / "ranks.zarr"
    procs = [
        _run_wds(shards, out, env_extra=dict(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), TORCHELASTIC_RUN_ID="wds-job"), wait=False)
        for r in (1, 0)  # the follower first: it waits for rank 0
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    written = [int(o.split("wrote ")[1].split(" rows")[0]) for o, _ in outputs]
    assert sum(written) == 24 and min(written) > 0  # both ranks did part of the work
    _same_store(clean_wds, out)


def test_a_shard_rewritten_in_place_is_named_when_its_store_is_found_complete(real_photos, tmp_path):
    """A rewritten shard (same members and labels, other image bytes) keeps the manifest and the cache
    key; the run that finds the store complete names the shard (image_changes.py)."""
    from featstore.image_changes import created_ns

    shard_files = write_shards(real_photos, tmp_path / "shards")
    dataset, out = f"wds:{tmp_path / 'shards'}/train-{{000000..000002}}.tar", tmp_path / "s.zarr"
    config = ExtractConfig(dataset=dataset, out=str(out), loader="torch", batch_size=8, **SMALL)
    logs: list[str] = []
    assert extract(config, progress=False, log=logs.append).status == "created"
    assert extract(config, progress=False, log=logs.append).modified_images == []
    paths, labels, data = _photos(real_photos)
    swapped = {12: {"jpg": data[13], "cls": int(labels[12]), "json": {"name": f"class{labels[12]}", "id": 12}}}
    write_shards(real_photos, tmp_path / "shards", extra=swapped)  # every shard written again; only the second's bytes differ
    since = created_ns(FeatureStore.open(out).attrs["created"])
    assert since is not None
    os.utime(shard_files[1], ns=(since, since))
    for f in (shard_files[0], shard_files[2]):
        os.utime(f, ns=(since - 10**9 - 1,) * 2)  # the others as if untouched since before the store
    logs.clear()
    again = extract(config, progress=False, log=logs.append)
    assert again.status == "up to date" and again.modified_images == [str(shard_files[1])]
    warned = [line for line in logs if line.startswith("warning")]
    assert len(warned) == 1 and warned[0].startswith("warning: 1 of 3 shards were modified after this store was created"), logs
    assert "train-000001.tar" in warned[0] and "--overwrite" in warned[0]


def test_a_shard_added_to_a_glob_is_not_answered_up_to_date(shards, tmp_path):
    """The up-to-date memo stamped the shards it found, not what the glob would match now: a shard
    copied in beside them was answered "up to date" with the old store (rows missing, silently);
    the folder it matched in is stamped too."""
    import shutil

    folder = tmp_path / "d"
    folder.mkdir()
    for shard in shards[:2]:
        shutil.copy(shard, folder)
    config = ExtractConfig(dataset=f"wds:{folder}/*.tar", out=None, loader="torch", batch_size=8, **SMALL)
    first = extract(config, progress=False, log=lambda s: None)
    assert first.status == "created" and extract(config, progress=False, log=lambda s: None).status == "up to date"
    shutil.copy(shards[2], folder)
    grown = extract(config, progress=False, log=lambda s: None)
    assert grown.status == "created" and grown.store != first.store
    assert sum(grown.rows.values()) > sum(first.rows.values())


def test_a_sample_with_a_component_twice_is_an_invalid_row(real_photos, tmp_path):
    """Two members named s1.jpg (and two s1.cls): which is the sample's? featstore kept the last of
    each silently; webdataset refuses the shard. The sample is an invalid row naming why; the rest read."""
    photos = sorted(real_photos.rglob("*.JPEG"))[:2]
    a, b = (p.read_bytes() for p in photos)
    shard = tmp_path / "dup.tar"
    with tarfile.open(shard, "w") as tf:
        for name, data in (("s1.jpg", a), ("s1.cls", b"0"), ("s1.jpg", b), ("s1.cls", b"1"), ("s2.jpg", a), ("s2.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    m = wds_manifest(f"wds:{shard}")
    assert list(m.splits["all"].paths) == ["dup.tar/s1", "dup.tar/s2"]
    assert m.shards is not None and m.shards.problems.get("dup.tar/s1", "").endswith(
        "its .jpg component appears twice (two members named s1.jpg)"
    )
    assert "dup.tar/s2" not in m.shards.problems


def test_member_reads_match_tarfile(shards):
    from featstore.loaders.members import read_member, read_member_checked

    m = wds_manifest(f"wds:{shards[0].parent}/train-*.tar")
    with tarfile.open(shards[2]) as tar:
        expected = {Path(t.name).stem: tar.extractfile(t).read() for t in tar if t.name.endswith(".jpg")}
    for path, ref in zip(m.splits["all"].paths, m.sources("all")):
        if path.startswith("train-000002.tar/"):
            data, problem = read_member(ref)
            assert not problem and data == expected[path.rsplit("/", 1)[1]]
            assert read_member_checked(ref)[2] is not None  # the JPEG's declared size
    ref = m.sources("all")[0]
    shard, offset, size, _ = parse_member_ref(ref)
    assert read_member(f"{shard}#{offset}:{size + 10**9}")[1].startswith("truncated")


@pytest.mark.slow
def test_many_shards_are_listed_in_processes_with_the_same_rows(real_photos, tmp_path, monkeypatch):
    import featstore.wds_dataset as wds_dataset

    many = write_shards(real_photos, tmp_path / "many", per_shard=1)  # 24 shards: over PROCESS_POOL_FROM
    assert len(many) >= wds_dataset.PROCESS_POOL_FROM
    pools = []
    real = wds_dataset.ProcessPoolExecutor
    monkeypatch.setattr(wds_dataset, "ProcessPoolExecutor", lambda *a, **k: pools.append(1) or real(*a, **k))
    m = wds_manifest(f"wds:{tmp_path}/many/train-*.tar")
    assert pools == [1]
    _, labels, data = _photos(real_photos)
    np.testing.assert_array_equal(m.splits["all"].labels, labels)
    for i, ref in enumerate(m.sources("all")):
        shard, offset, size, _ = parse_member_ref(ref)
        assert Path(shard).name == f"train-{i:06d}.tar" and Path(shard).read_bytes()[offset : offset + size] == data[i]
    again = wds_manifest(f"wds:{tmp_path}/many/train-*.tar")  # every listing cached now: no pool of processes
    assert pools == [1] and again.sha256 == m.sha256


def test_resume_command_and_memo_key_name_the_shards_absolutely(shards, monkeypatch):
    import shlex

    from featstore.job import resume_command
    from featstore.request import request_of

    folder = shards[0].parent
    monkeypatch.chdir(folder.parent)
    relative = f"wds:{folder.name}/train-{{000000..000002}}.tar"
    config = ExtractConfig(model="resnet18", dataset=relative, out="x.zarr", wds_label="name")
    args = shlex.split(resume_command(config, "torch"))
    assert args[args.index("--dataset") + 1] == f"wds:{folder}/train-{{000000..000002}}.tar"
    assert args[args.index("--wds-label") + 1] == "name"
    assert request_of(config)["dataset"] == f"wds:{folder}/train-{{000000..000002}}.tar"
    assert request_of(config)["wds_label"] == "name"
    url = ExtractConfig(model="resnet18", dataset="wds:s3://bucket/p/train-{0..9}.tar")
    assert request_of(url)["dataset"] == "wds:s3://bucket/p/train-{0..9}.tar"


def test_listing_without_a_writable_home(shards, tmp_path, monkeypatch):
    blocked = tmp_path / "home-is-a-file"
    blocked.write_text("")
    monkeypatch.setenv("FEATSTORE_HOME", str(blocked))  # $FEATSTORE_HOME/shards cannot be made
    m = wds_manifest(f"wds:{shards[0].parent}/train-*.tar")
    assert len(m.splits["all"]) == 24 and not list(tmp_path.glob("**/shards/*.json"))


def test_member_reads_from_threads_over_more_shards_than_kept_open(real_photos, tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    import featstore.loaders.members as members

    monkeypatch.setattr(members, "_KEEP_OPEN", 2)  # descriptors evicted while other threads read theirs
    write_shards(real_photos, tmp_path / "many", per_shard=1)
    m = wds_manifest(f"wds:{tmp_path}/many/train-*.tar")
    _, _, data = _photos(real_photos)
    refs = m.sources("all") * 20
    order = np.random.default_rng(0).permutation(len(refs))
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: members.read_member(refs[i])[0], order))
    assert all(g == data[i % len(data)] for g, i in zip(got, order))
    assert sum(1 for pid, _ in members._OPEN if pid == os.getpid()) <= 2


@pytest.fixture(scope="module")
def s3_shards(shards):
    """The test shards in a real S3 API (moto's server on 127.0.0.1); credentials and endpoint in the environment."""
    from tests.s3_server import moto_s3

    with moto_s3("wds") as bucket:
        import s3fs

        fs = s3fs.S3FileSystem()
        for shard in shards:
            fs.put(str(shard), f"wds/data/{shard.name}")
        yield f"{bucket}/data"


@pytest.mark.slow
def test_shards_on_s3_give_the_folder_features(s3_shards, real_photos, tmp_path):
    folder = _extract(str(real_photos), tmp_path / "folder.zarr", "torch")
    m = wds_manifest(f"wds:{s3_shards}/train-*.tar")  # a glob on the bucket
    assert list(m.splits["all"].paths)[:2] == ["train-000000.tar/00000", "train-000000.tar/00001"]
    result = _extract(f"wds:{s3_shards}/train-{{000000..000002}}.tar", tmp_path / "s3.zarr", "torch", workers=2)
    assert result.invalid == 0 and folder.invalid == 0
    ours = FeatureStore.open(tmp_path / "s3.zarr")
    assert ours.features("all", "pool")[:].tobytes() == FeatureStore.open(tmp_path / "folder.zarr").features("all", "pool")[:].tobytes()
    assert "featstore-test-secret" not in json.dumps(ours.attrs)
    with pytest.raises(UsageError, match="reads local shards only"):
        _extract(f"wds:{s3_shards}/train-*.tar", tmp_path / "dali.zarr", "dali")
    with pytest.raises(UsageError, match="holds credentials"):
        wds_manifest("wds:s3://key:secret@wds/data/train-000000.tar")
    with pytest.raises(UsageError, match="not found"):
        wds_manifest(f"wds:{s3_shards}/train-000009.tar")


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_png_and_bmp_members_equal_the_same_files(loader, real_photos, tmp_path):
    """Members of other formats: PNG goes to DALI as it is, BMP through PIL into a PNG in a temporary tar."""
    import shutil

    import webdataset as wds
    from PIL import Image

    if loader == "dali":
        dali_or_skip()
    folder = tmp_path / "folder"
    shutil.copytree(real_photos, folder)
    m = resolve_dataset(str(folder))
    paths, labels = list(m.splits["all"].paths), m.splits["all"].labels
    formats = {3: "png", 9: "bmp", 10: "png", 17: "bmp"}
    for i, ext in formats.items():
        jpeg = folder / paths[i]
        Image.open(jpeg).save(jpeg.with_suffix(f".{ext}"))
        jpeg.unlink()
        paths[i] = str(Path(paths[i]).with_suffix(f".{ext}"))
    assert list(resolve_dataset(str(folder)).splits["all"].paths) == paths  # the same order as files
    (tmp_path / "shards").mkdir()
    with wds.TarWriter(str(tmp_path / "shards" / "mixed-000000.tar")) as sink:
        for i, p in enumerate(paths):
            sink.write({"__key__": f"{i:05d}", formats.get(i, "jpg"): (folder / p).read_bytes(), "cls": int(labels[i])})
    a = _extract(str(folder), tmp_path / "folder.zarr", loader, batch_size=5)
    b = _extract(f"wds:{tmp_path}/shards/mixed-000000.tar", tmp_path / "wds.zarr", loader, batch_size=5)
    assert a.invalid == 0 and b.invalid == 0
    fa, fb = FeatureStore.open(tmp_path / "folder.zarr"), FeatureStore.open(tmp_path / "wds.zarr")
    assert fb.features("all", "pool")[:].tobytes() == fa.features("all", "pool")[:].tobytes()


def test_plain_header_reader_agrees_with_tarfile(shards, tmp_path):
    """The listing's own ustar/GNU header reader gives what Python's tarfile gives, damage included; pax and
    GNU long names go to tarfile."""
    from featstore import tar_index

    def both(path: Path):
        size = path.stat().st_size
        out = []
        for members in (tar_index._plain_members, tar_index._tarfile_members):
            damage: list[str] = []
            with open(path, "rb") as f:
                out.append((list(members(f, size, str(path), damage)), [d.split(" (")[0] for d in damage]))
        return out

    raw = shards[0].read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[: len(raw) // 2])
    mid_header = tmp_path / "mid-header.tar"
    mid_header.write_bytes(raw[: list_shard(str(shards[0])).samples[2].components["cls"][0] - 512 + 100])
    garbled = bytearray(raw)
    garbled[list_shard(str(shards[0])).samples[3].components["cls"][0] - 512] ^= 0x55
    bad = tmp_path / "garbled.tar"
    bad.write_bytes(bytes(garbled))
    made = []
    for fmt, name in ((tarfile.USTAR_FORMAT, "ustar"), (tarfile.GNU_FORMAT, "gnu")):
        path = tmp_path / f"{name}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            # ustar: 105-character names, held by its prefix field; GNU: short ones (long ones are LongLink headers, tarfile's)
            for i, stem in enumerate(["a", ("deep/" * 20 if name == "ustar" else "d/") + "b", "c"]):
                for ext, data in (("jpg", raw[512 : 512 + 1000 + i]), ("cls", b"1")):
                    info = tarfile.TarInfo(f"{stem}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            folder = tarfile.TarInfo("folder")
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
        made.append(path)
    for path in [*shards, cut, mid_header, bad, *made]:
        plain, reference = both(path)
        assert plain == reference, path.name
    assert len(both(made[0])[0][0]) == 6 and both(bad)[0][1] == ["damaged tar at byte " + str(both(bad)[0][1][0].split()[-1])]
    long_names = tmp_path / "pax.tar"
    with tarfile.open(long_names, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("x" * 300 + ".jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    gnu_long = tmp_path / "gnu-long.tar"
    with tarfile.open(gnu_long, "w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("y" * 150 + ".jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    for path in (long_names, gnu_long):
        plain, reference = both(path)
        assert plain == reference and len(plain[0]) == 1 and len(plain[0][0][0]) > 100
    assert shards[0].read_bytes()[156:157] == b"x"  # webdataset's TarWriter writes a pax header before every member


@pytest.mark.slow
def test_augmented_views_of_shards_are_cropped_by_the_torch_loader(shards, tmp_path):
    """--augment over shards: --loader auto crops the train rows' views with the torch loader; DALI's shard
    reader cannot, and --loader dali is refused in one line before anything is written."""
    dataset = f"wds:{shards[0].parent}/train-{{000000..000002}}.tar"
    kw = dict(split="train=0.7,val=0.3", augment="rrc-flip", augment_views=2, batch_size=6)
    result = _extract(dataset, tmp_path / "a.zarr", "auto", **kw)
    assert result.invalid == 0
    fs = FeatureStore.open(tmp_path / "a.zarr")
    assert fs.attrs["loader"] == "torch"
    n = fs.num_rows("train")
    params = fs.augmented("train").read()
    assert params.shape == (n, 2, 5) and (params[..., 2:4] > 0).all()
    assert np.isfinite(fs.augmented("train", "pool").read()).all()
    with pytest.raises(UsageError, match="cannot crop augmented views of WebDataset shards"):
        _extract(dataset, tmp_path / "b.zarr", "dali", **kw)
    assert not (tmp_path / "b.zarr").exists()
