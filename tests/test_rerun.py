"""Issue 23 item 5: protocol.json records the command line, version, git commit, absolute store
locations and content digests; ``probe fit --rerun DIR`` repeats the run, refusing a changed store."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from featstore.errors import UsageError
from featstore.store import FeatureStore
from featstore.version import __version__
from probe.provenance import git_commit, store_digest
from tests.test_probe import assert_one_line_error, digits, make_store, one_thread, run_cli  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def _rows(folder: Path) -> list[dict]:
    with open(folder / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_protocol_json_records_how_to_repeat_the_run_and_rerun_repeats_it(tmp_path, digits, monkeypatch):
    a = make_store(tmp_path / "a.zarr", digits)
    b = make_store(tmp_path / "b.zarr", {k: (x * 0.5 + 1, y, i) for k, (x, y, i) in digits.items()})
    monkeypatch.chdir(tmp_path)  # relative store paths, as a user types them
    args = ["fit", "--store", "A=a.zarr", "--store", "B=b.zarr", "--lr-grid", "0.01,0.1", "--epochs", "2", "--out", "first", "--quiet"]
    code, output = run_cli(args)
    assert code == 0, output
    run = json.loads((tmp_path / "first" / "protocol.json").read_text())["run"]
    assert run["command"] == ["probe", *args] and run["command_line"] == "probe " + " ".join(args) and run["cwd"] == str(tmp_path)
    assert run["featstore_version"] == __version__
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0 and (ROOT / "probe").is_dir():  # run from this checkout
        assert run["git_commit"] == head.stdout.strip() and isinstance(run["git_dirty"], bool)
    else:
        assert run["git_commit"] is None
    assert [s["location"] for s in run["stores"]] == [str(a), str(b)]
    assert [s["digest"] for s in run["stores"]] == [store_digest(FeatureStore.open(p)) for p in (a, b)]
    assert re.fullmatch("[0-9a-f]{64}", run["stores"][0]["digest"]) and run["stores"][0]["digest"] != run["stores"][1]["digest"]

    # from another folder: the absolute locations find the stores
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, output = run_cli(["fit", "--rerun", str(tmp_path / "first"), "--out", "again", "--quiet"])
    assert code == 0, output
    first, again = _rows(tmp_path / "first"), _rows(elsewhere / "again")
    keep = ["label", "lr", "selected", "select_top1_pct", "report_top1_pct", "ci95_low", "ci95_high", "protocol_hash"]
    assert [{k: r[k] for k in keep} for r in first] == [{k: r[k] for k in keep} for r in again]
    rerun = json.loads((elsewhere / "again" / "protocol.json").read_text())
    assert rerun["run"]["command"][:3] == ["probe", "fit", "--rerun"] and rerun["run"]["stores"][1]["digest"] == run["stores"][1]["digest"]

    assert "warning: the run was recorded with" not in output  # the same code: nothing to warn about
    record = json.loads((tmp_path / "first" / "protocol.json").read_text())
    record["run"]["git_commit"] = "0" * 40
    (tmp_path / "first" / "protocol.json").write_text(json.dumps(record))
    code, output = run_cli(["fit", "--rerun", str(tmp_path / "first"), "--out", "other-code", "--quiet"])
    assert code == 0 and f"warning: the run was recorded with featstore {__version__} at commit 000000000000" in output

    # options that would change the run are refused with --rerun
    code, output = run_cli(["fit", "--rerun", str(tmp_path / "first"), "--epochs", "3"])
    assert_one_line_error(code, output, 2, "--rerun", "--epochs")

    # a store extracted again at the same path, with other features, is refused, naming it
    shutil.rmtree(b)
    make_store(b, {k: (x * 0.5 + 2, y, i) for k, (x, y, i) in digits.items()})
    assert store_digest(FeatureStore.open(b)) != run["stores"][1]["digest"]
    code, output = run_cli(["fit", "--rerun", str(tmp_path / "first"), "--out", "third"])
    assert_one_line_error(code, output, 2, "store 'B'", str(b), "changed since the run")
    assert not (elsewhere / "third").exists()


def test_git_commit_is_null_outside_a_checkout(tmp_path):
    package = tmp_path / "site-packages" / "probe"
    package.mkdir(parents=True)
    assert git_commit(package) == {"commit": None, "dirty": None}


def test_citation_file_names_this_version():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["version"] == __version__ and cff["title"].startswith("featstore")
    assert cff["authors"] and cff["license"] == "Apache-2.0"


def test_a_hand_edited_protocol_record_is_a_one_line_error(tmp_path, digits):
    """protocol.json edited by hand (a None or a list where probe fit wrote a number, not an object
    at all): `probe fit --rerun` names the field, one line, exit 2 (it was an unexpected TypeError)."""
    import probe

    store = make_store(tmp_path / "a.zarr", digits)
    code, output = run_cli(["fit", "--store", str(store), "--lr-grid", "0.1", "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 0, output
    record = json.loads((tmp_path / "run" / "protocol.json").read_text())
    for field, value, needle in (
        ("seed", None, "seed must be an integer, got None"),
        ("batch_size", [256], "batch size must be an integer, got [256]"),
        ("epochs", float("inf"), "epochs must be an integer, got inf"),
        ("momentum", None, "momentum must be a number, got None"),
        ("betas", None, "betas must be two numbers, got None"),
        ("eps", "tiny", "eps must be a number, got 'tiny'"),
    ):
        edited = tmp_path / f"edited-{field}"
        shutil.copytree(tmp_path / "run", edited)
        (edited / "protocol.json").write_text(json.dumps({**record, "protocol": {**record["protocol"], field: value}}))
        code, output = run_cli(["fit", "--rerun", str(edited), "--out", str(tmp_path / f"again-{field}")])
        assert_one_line_error(code, output, 2, f"{str(edited / 'protocol.json')!r}: {needle}")  # naming the file
        with pytest.raises(UsageError, match=re.escape(needle)):
            probe.Protocol(**{field: value})
    (edited / "protocol.json").write_text("[]")
    code, output = run_cli(["fit", "--rerun", str(edited)])
    assert_one_line_error(code, output, 2, "is not a protocol record of probe fit")


@pytest.mark.slow
def test_the_same_extraction_run_again_is_the_same_store_to_rerun(tmp_path, small_folder, monkeypatch):
    """`featstore extract … --overwrite` of the same command writes bit-identical features with a new
    creation and completion time and run time: --rerun repeats the run on it (it refused, 'changed
    since the run': the digest counted the run log). What decides the numbers still counts, and a
    record of an older probe (its digest over every attribute) still reruns on an unchanged store."""
    import time

    import featstore

    monkeypatch.setenv("FEATSTORE_HOME", str(tmp_path / "home"))
    store = tmp_path / "s.zarr"
    extract = dict(model="resnet18", dataset=str(small_folder), out=str(store), random_init=True, loader="torch", workers=0,
                   image_size=32, resize=32, device="cpu", dtype="float32", progress=False, log=lambda m: None)  # fmt: skip
    featstore.extract(**extract)
    args = ["--lr-grid", "0.01,0.1", "--epochs", "2", "--quiet"]
    code, output = run_cli(["fit", "--store", f"A={store}", *args, "--out", str(tmp_path / "first")])
    assert code == 0, output
    before = FeatureStore.open(store).attrs
    time.sleep(1.1)  # the stamps are to the second
    featstore.extract(**extract, overwrite=True)
    after = FeatureStore.open(store)
    assert after.attrs["completed"] != before["completed"] and after.attrs["digests"] == before["digests"]
    code, output = run_cli(["fit", "--rerun", str(tmp_path / "first"), "--out", str(tmp_path / "again")])
    assert code == 0, output
    from probe.provenance import CONTENT, UNIT_DIGESTS

    record = json.loads((tmp_path / "first" / "protocol.json").read_text())
    assert record["run"]["stores"][0]["digest_scheme"] == CONTENT
    keep = ["label", "lr", "selected", "select_top1_pct", "report_top1_pct"]
    assert [{k: r[k] for k in keep} for r in _rows(tmp_path / "first")] == [{k: r[k] for k in keep} for r in _rows(tmp_path / "again")]

    # a record of an older probe: its digest of every attribute reruns on the store it was taken of
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "first", old)
    record["run"]["stores"][0] |= {"digest": store_digest(after, UNIT_DIGESTS), "digest_scheme": UNIT_DIGESTS}
    (old / "protocol.json").write_text(json.dumps(record))
    code, output = run_cli(["fit", "--rerun", str(old), "--out", str(tmp_path / "old-again"), "--quiet"])
    assert code == 0, output
    # … and cannot tell a re-extraction from a change: refused, saying why
    FeatureStore.open(store, mode="r+").update_attrs({"completed": "2030-01-01T00:00:00Z"})
    code, output = run_cli(["fit", "--rerun", str(old), "--out", str(tmp_path / "old-third")])
    assert_one_line_error(code, output, 2, "store 'A'", "changed since the run", "of an older probe")
    code, output = run_cli(["fit", "--rerun", str(tmp_path / "first"), "--out", str(tmp_path / "third"), "--quiet"])
    assert code == 0, output  # the run log is no part of the new digest

    # what decides the numbers does count
    FeatureStore.open(store, mode="r+").update_attrs({"preprocessing": {**before["preprocessing"], "interpolation": "bicubic"}})
    code, output = run_cli(["fit", "--rerun", str(tmp_path / "first"), "--out", str(tmp_path / "fourth")])
    assert_one_line_error(code, output, 2, "store 'A'", str(store), "changed since the run")


def test_rerun_finds_a_moved_store_by_its_recorded_label(tmp_path, digits, monkeypatch):
    """A results folder and its stores moved (another folder, another machine): `--rerun DIR --store
    LABEL=NEWPATH` reads the store recorded as LABEL there, checked by its content digest (it was
    refused: 'not found', and --store beside --rerun was 'not from --store')."""
    a = make_store(tmp_path / "old" / "a.zarr", digits)
    b = make_store(tmp_path / "b.zarr", {k: (x * 0.5 + 1, y, i) for k, (x, y, i) in digits.items()})
    args = ["--lr-grid", "0.1", "--epochs", "1", "--quiet"]
    code, output = run_cli(["fit", "--store", f"A={a}", "--store", f"B={b}", *args, "--out", str(tmp_path / "first")])
    assert code == 0, output
    shutil.move(tmp_path / "old", tmp_path / "new")
    monkeypatch.chdir(tmp_path)

    code, output = run_cli(["fit", "--rerun", "first", "--out", "again"])
    assert_one_line_error(code, output, 2, "store 'A' is not at", str(a), "--store A=PATH")
    code, output = run_cli(["fit", "--rerun", "first", "--store", "A=new/a.zarr", "--out", "again"])  # a relative path
    assert code == 0, output
    keep = ["label", "store", "lr", "selected", "select_top1_pct", "report_top1_pct"]
    moved = [{**r, "store": r["store"].replace(str(tmp_path / "new"), str(tmp_path / "old"))} for r in _rows(tmp_path / "again")]
    assert [{k: r[k] for k in keep} for r in _rows(tmp_path / "first")] == [{k: r[k] for k in keep} for r in moved]
    stores = json.loads((tmp_path / "again" / "protocol.json").read_text())["run"]["stores"]
    assert [s["location"] for s in stores] == [str(tmp_path / "new" / "a.zarr"), str(b)]

    code, output = run_cli(["fit", "--rerun", "first", "--store", "C=new/a.zarr", "--out", "third"])
    assert_one_line_error(code, output, 2, "--store 'C=new/a.zarr' names no store of the run", "'A', 'B'")
    code, output = run_cli(["fit", "--rerun", "first", "--store", "new/a.zarr", "--out", "third"])
    assert_one_line_error(code, output, 2, "names no store of the run", "--store LABEL=PATH")
    code, output = run_cli(["fit", "--rerun", "first", "--store", "A=new/a.zarr", "--store", "A=b.zarr", "--out", "third"])
    assert_one_line_error(code, output, 2, "two locations")
    code, output = run_cli(["fit", "--rerun", "first", "--store", "A=b.zarr", "--out", "third"])  # another store's content
    assert_one_line_error(code, output, 2, "store 'A'", str(b), "changed since the run")
    assert not (tmp_path / "third").exists()
