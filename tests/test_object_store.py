"""Stores written to object storage (issue 26): a real S3 API (moto's server on 127.0.0.1), no mock
of its semantics. The store API in this process: units, resume, the completion record, the lease,
creation that never overwrites, credentials refused. Extractions in subprocesses (kill, resume,
many nodes, the cache at a URL) are in test_object_store_runs.py."""

from __future__ import annotations

import json
import os
import socket
import time

import numpy as np
import pytest
from click.testing import CliRunner

from featstore.cli import cli
from featstore.errors import FeatstoreError, UsageError
from featstore.store import PROGRESS, FeatureStore
from featstore.store.lease import LEASE, Lease, _etag, _put_if_match, rank_lease, store_lock
from featstore.store.remote import CREATING, Remote
from tests.s3_server import moto_s3, objects
from tests.test_probe import digits_splits


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as bucket:
        yield bucket


@pytest.fixture(scope="module")
def plan():
    return digits_splits()


def _create(url, plan, **attrs):
    return FeatureStore.create(
        url,
        splits={s: ([f"{int(i)}.png" for i in ids], y) for s, (_, y, ids) in plan.items()},
        views={"pixels": 64},
        dtype="float32",
        chunk_rows=128,
        attrs={"cache_key": "k", "dataset": {"name": "digits", "class_names": [str(c) for c in range(10)]}, **attrs},
    )


def _write(store, plan, units):
    for unit in units:
        x = plan[unit.split][0][unit.start : unit.stop]
        store.write_unit(unit, {"pixels": x}, np.ones(unit.rows, bool))


@pytest.mark.slow  # ~5 s: some hundred requests to moto
def test_units_resume_and_complete_on_s3(s3, plan):
    """Units written by one open, the rest after a reopen (a resumed run), finalized: the store reads
    back, verified, equal to what was written, and leaves no progress objects."""
    url = f"{s3}/api/digits.zarr"
    store = _create(url, plan)
    assert objects(url) and "zarr.json" in objects(url) and CREATING not in objects(url)
    units = store.pending_units()
    assert len(units) == sum(-(-len(v[1]) // 128) for v in plan.values()) == 15
    _write(store, plan, units[:4])
    del store  # "killed": four unit markers on S3, the rest pending

    resumed = FeatureStore.open(url, mode="r+")
    assert not resumed.complete and resumed.pending_units() == units[4:]
    assert sorted(n for n in objects(url) if "/unit-" in n) == [f"{PROGRESS}/train/unit-{i:06d}.json" for i in range(4)]
    with pytest.raises(FeatstoreError, match="11 units not written yet"):
        resumed.finalize()
    _write(resumed, plan, resumed.pending_units())
    resumed.finalize()
    assert not [n for n in objects(url) if n.startswith(PROGRESS)]

    remote = FeatureStore.open(url, verify=True)
    assert remote.complete and remote.attrs["digests"]["splits"]["train"]["features/pixels"]
    for split, (x, y, ids) in plan.items():
        np.testing.assert_array_equal(remote.features(split, "pixels")[:], x)
        np.testing.assert_array_equal(remote.labels(split), y)
        assert remote.paths(split).tolist() == [f"{int(i)}.png" for i in ids]
    # the completion record is one object: zarr.json (consolidated, so one GET describes the store)
    meta = json.loads(Remote.of(url).read("zarr.json") or b"{}")
    assert meta["attributes"]["complete"] is True and "consolidated_metadata" in meta


@pytest.mark.slow
def test_a_damaged_unit_on_s3_is_refused(s3, plan):
    url = f"{s3}/damaged/digits.zarr"
    store = _create(url, plan, command=f"featstore extract --model resnet18 --dataset digits --out {url}")
    _write(store, plan, store.pending_units())
    store.finalize()
    remote = Remote.of(url)
    chunk = "val/features/pixels/c/1/0"
    data = bytearray(remote.read(chunk) or b"")
    data[10] ^= 0xFF
    remote.put(chunk, bytes(data))
    with pytest.raises(FeatstoreError, match="damaged") as refused:
        FeatureStore.open(url, verify=True).features("val", "pixels")[:]
    # --repair refuses a URL ("works on local stores"): the hint repairs a local copy and uploads it back
    hint = (
        f"copy it down (aws s3 sync {url} DIR), repair it there: featstore extract --model resnet18 --dataset digits --out DIR "
        f"--repair, and upload it back (aws s3 sync --delete DIR {url})"
    )
    assert refused.value.hint == hint
    code, output = run(["verify", url])
    assert code == 1 and output.rstrip().endswith(f"; {hint}"), output


@pytest.mark.slow
def test_verify_of_an_incomplete_store_on_s3_checks_its_written_units(s3, plan, tmp_path):
    """`featstore verify s3://…` of a store a killed run left checks each written unit against its
    marker's digests, as a local copy of the same objects is checked (it checked none and said ok)."""
    from featstore.store.verify import verify_store

    url = f"{s3}/partial/digits.zarr"
    store = _create(url, plan)
    _write(store, plan, store.pending_units()[:3])
    remote = Remote.of(url)
    remote.put("train/features/pixels/c/1/0", remote.read("train/features/pixels/c/0/0") or b"")  # unit 1 holds unit 0's rows
    report = verify_store(FeatureStore.open(url))
    remote.fs.get(remote.root, str(tmp_path / "copy.zarr"), recursive=True)
    local = verify_store(FeatureStore.open(tmp_path / "copy.zarr"))
    damage = "train/features/pixels rows 128-255: does not match its digest (changed or lost since it was written)"
    assert [p.line() for p in report.problems] == [p.line() for p in local.problems] == [damage]
    assert report.damaged_units == {"train": {1}} and report.units == local.units  # the unwritten units are not counted


def test_creating_never_overwrites(s3, plan):
    url = f"{s3}/twice/digits.zarr"
    _create(url, plan)
    before = Remote.of(url).read("train/labels/c/0")
    with pytest.raises(FeatstoreError, match="already exists"):
        _create(url, {k: (v[0], (v[1] + 1) % 10, v[2]) for k, v in plan.items()})
    assert Remote.of(url).read("train/labels/c/0") == before
    # a creator that lost the race (the prefix filled after its check) fails on its first object, overwriting none
    other = Remote.of(f"{s3}/race/digits.zarr")
    other.put("train/labels/c/0", b"someone else's")
    with pytest.raises(FeatstoreError, match="appeared while the store was being created"):
        other.upload_plan(_plan_folder(plan))
    assert other.read("train/labels/c/0") == b"someone else's" and other.attrs() is None


def _plan_folder(plan):
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp()) / "plan.zarr"
    _create(str(folder), plan)
    return folder


def test_a_half_created_store_is_cleared_and_foreign_objects_refused(s3, plan):
    from featstore.job import existing_store

    url = f"{s3}/half/digits.zarr"
    remote = Remote.of(url)
    remote.create(CREATING, b"{}")  # what a creation killed before its zarr.json leaves
    remote.put("train/labels/c/0", b"partial")
    said = []
    assert existing_store(url, "k", {}, False, said.append) is None
    assert said == [f"removing the half-created store at {url} (its creation was killed)"]
    assert objects(url) == []
    _create(url, plan)  # created afresh in its place
    assert FeatureStore.open(url).num_rows("train") == len(plan["train"][1])

    foreign = Remote.of(f"{s3}/foreign/data")
    foreign.put("README.txt", b"not a store")
    with pytest.raises(UsageError, match="holds objects and is not a featstore store"):
        existing_store(f"{s3}/foreign/data", "k", {}, False)
    assert objects(f"{s3}/foreign/data") == ["README.txt"]


def test_the_lease_keeps_a_second_writer_out(s3, monkeypatch):
    url = f"{s3}/lease/x.zarr"
    first = store_lock(url, job="job-1")
    assert isinstance(first, Lease)
    with first:
        holder = json.loads(Remote.of(url).read(LEASE) or b"{}")
        assert holder["pid"] == os.getpid() and holder["job"] == "job-1" and holder["expires"] > time.time() + 60
        with pytest.raises(FeatstoreError, match=f"store is being written by pid {os.getpid()} on host") as refused:
            Lease(Remote.of(url)).acquire()
        assert "lease runs" in str(refused.value) and LEASE in refused.value.hint
        first.renew()  # a renewal is conditional on the ETag it last wrote: it keeps the lease ours
        assert json.loads(Remote.of(url).read(LEASE) or b"{}")["token"] == holder["token"]
        first.check()
    assert LEASE not in objects(url)  # released: deleted
    with Lease(Remote.of(url)) as second:  # and free for the next writer
        assert second.held


def test_a_dead_or_expired_lease_is_taken_over_once(s3):
    url = f"{s3}/stale/x.zarr"
    remote = Remote.of(url)
    # a writer of this host whose pid is gone (kill -9): taken over at once, with a warning
    dead = {"pid": 2**22 + 12345, "host": socket.gethostname(), "expires": time.time() + 3600, "token": "dead"}
    remote.put(LEASE, json.dumps(dead).encode())
    warned = []
    with Lease(remote, warn=warned.append) as lease:
        assert lease.held and "taking over the lease of pid" in warned[0]
    # another host's writer: refused while its lease runs, taken over once it has expired
    other = {"pid": 1, "host": "node-17", "expires": time.time() + 3600, "token": "other"}
    remote.put(LEASE, json.dumps(other).encode())
    with pytest.raises(FeatstoreError, match="pid 1 on host node-17"):
        Lease(remote).acquire()
    remote.put(LEASE, json.dumps(dict(other, expires=time.time() - 1)).encode())
    stale_etag = _etag(remote)
    with Lease(remote) as taker:
        # a second taker that read the same expired lease cannot also win: its If-Match fails
        assert stale_etag is not None and not _put_if_match(remote, b'{"token": "late"}', stale_etag)
        assert json.loads(remote.read(LEASE) or b"{}")["token"] == taker._token
    # a renewal after someone else took the lease over finds it lost, and the writer stops
    lease = Lease(remote).acquire()
    remote.put(LEASE, json.dumps(dict(other, token="thief")).encode())
    lease.renew()
    with pytest.raises(FeatstoreError, match="lost the lease"):
        lease.check()
    lease.release()
    assert json.loads(remote.read(LEASE) or b"{}")["token"] == "thief"  # never deleted another writer's lease


def _count_requests(monkeypatch):
    """The lease's requests from now on, by kind (reads, plain and conditional writes)."""
    import featstore.store.lease as lease_module

    made = []
    for owner, name in [(Remote, "read"), (Remote, "put"), (lease_module, "_put_if_match"), (lease_module, "_etag")]:
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _o=original, _n=name, **k: made.append(_n) or _o(*a, **k))
    return made


def test_a_write_confirms_the_lease_and_renews_it_only_when_stale(s3, monkeypatch):
    """Before each unit the writer confirms its lease: no request while the renewer keeps it fresh; one
    stopped past its term renews it there and then (conditionally) and goes on if nobody took it, and
    stops with 'lost the lease' if another writer did (it used to write on into that writer's store)."""
    remote = Remote.of(f"{s3}/confirm/x.zarr")
    with Lease(remote) as lease:
        made = _count_requests(monkeypatch)
        for _ in range(100):
            lease.confirm()
        assert made == []
        lease._renewed -= lease.term  # stopped (SIGSTOP) past its term, and nobody took the lease
        lease.confirm()
        assert made[0] == "_put_if_match" and json.loads(remote.read(LEASE) or b"{}")["token"] == lease._token
        made.clear()
        lease.confirm()
        assert made == []  # fresh again
        remote.put(LEASE, json.dumps({"pid": 1, "host": "node-17", "expires": time.time() + 120, "token": "thief"}).encode())
        lease.confirm()  # fresh: the renewer vouches for it (a live lease is never taken over)
        lease._renewed -= lease.term  # stopped past its term, and meanwhile taken over
        with pytest.raises(FeatstoreError, match="lost the lease"):
            lease.confirm()
    assert json.loads(remote.read(LEASE) or b"{}")["token"] == "thief"


def test_a_rank_writes_only_while_its_jobs_rank_0_holds_the_lease(s3, monkeypatch, tmp_path):
    """A rank > 0 writes under rank 0's lease: it reads it (not before each unit) and stops once the lease
    is gone, another job's or running out unrenewed."""
    url = f"{s3}/ranks/x.zarr"
    remote = Remote.of(url)
    assert rank_lease(tmp_path / "x.zarr", "job-1") is None  # a local store: rank 0's flock
    with Lease(remote, job="job-1"):
        rank = rank_lease(url, "job-1")
        assert rank is not None
        made = _count_requests(monkeypatch)
        for _ in range(100):
            rank.confirm()
        assert made == ["read"]
        holder = json.loads(remote.read(LEASE) or b"{}")
        now = time.time()
        for lease, said in [
            (
                {"pid": 1, "host": "node-17", "job": "", "since": now, "expires": now + 120},
                "pid 1 on host node-17 holds it for another job",
            ),
            (dict(holder, since=now - 100, expires=now + 20), r"rank 0 stopped renewing it \(20 s left\)"),
            (dict(holder, pid=2**22 + 12345), f"rank 0, pid {2**22 + 12345} of this host, is no longer running"),
        ]:
            remote.put(LEASE, json.dumps(lease).encode())
            rank._until = 0.0  # what the last read vouched for has run out
            with pytest.raises(FeatstoreError, match=f"this job lost the lease {url}/{LEASE} \\({said}"):
                rank.confirm()
    remote.fs.rm_file(remote.key(LEASE))
    rank._until = 0.0
    with pytest.raises(FeatstoreError, match="it is gone"):
        rank.confirm()


def run(args):
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output


@pytest.mark.parametrize(
    "url",
    [
        "s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI@feats/x.zarr",
        "s3://feats/x.zarr?aws_secret_access_key=wJalrXUtnFEMI",
    ],
)
def test_credentials_in_an_out_url_are_refused(s3, url):
    code, output = run(["extract", "--model", "resnet18", "--random-init", "--dataset", "digits", "--out", url])
    assert code == 2 and len(output.strip().splitlines()) == 1, output
    assert output.startswith("error: the store URL holds credentials") and "AWS_ACCESS_KEY_ID" in output
    assert "AWS_ENDPOINT_URL" in output and "wJalr" not in output and "Traceback" not in output
    assert not [n for n in objects(s3) if n.startswith("x.zarr")]  # nothing written


def test_an_out_url_featstore_cannot_write_is_refused():
    code, output = run(["extract", "--model", "resnet18", "--random-init", "--dataset", "digits", "--out", "https://example.org/x.zarr"])
    assert code == 2 and output.strip() == (
        "error: cannot write a store to 'https://example.org/x.zarr': featstore writes to s3:// and gs:// URLs "
        "(write to s3://BUCKET/PREFIX/NAME.zarr (or gs://), or to a local folder)"
    )


def test_a_home_at_a_url_keeps_the_stores_there_and_the_rest_local(monkeypatch, tmp_path):
    from featstore import home

    monkeypatch.setenv("FEATSTORE_HOME", "s3://bucket/team/featstore/")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("FEATSTORE_WEIGHTS", raising=False)
    assert home.home_url() == "s3://bucket/team/featstore"
    assert home.stores_dir() == "s3://bucket/team/featstore/stores"
    assert (
        home.default_store_path("digits", "tv:resnet18", "ab" * 32)
        == "s3://bucket/team/featstore/stores/digits/tv_resnet18-abababababab.zarr"
    )
    assert home.home() == tmp_path / "featstore" and home.weights_dir() == tmp_path / "featstore" / "weights"
    assert home.index_dir() == tmp_path / "featstore" / "index"
    monkeypatch.setenv("FEATSTORE_HOME", str(tmp_path / "h"))  # a folder: everything there, as before
    assert home.home_url() is None and home.stores_dir() == tmp_path / "h" / "stores"


@pytest.mark.slow
def test_rm_of_a_store_at_a_url(s3, plan):
    from featstore.cache import remove_store

    small = {k: (v[0][:20], v[1][:20], v[2][:20]) for k, v in plan.items()}
    url = f"{s3}/rm/digits.zarr"
    store = _create(url, small)
    _write(store, small, store.pending_units())
    store.finalize()
    with store_lock(url), pytest.raises(FeatstoreError, match="store is being written by pid"):
        remove_store(url)  # a live writer's lease keeps rm out
    assert FeatureStore.open(url).complete
    assert remove_store(url) > 3 * 20 * 64 * 4
    assert objects(url) == []
    with pytest.raises(UsageError, match="not found"):
        remove_store(url)


def test_a_missing_bucket_or_an_unreachable_endpoint_is_one_line(s3, monkeypatch):
    from featstore.job import existing_store

    with pytest.raises(FeatstoreError, match="the bucket 'no-such-bucket' does not exist") as missing:
        existing_store("s3://no-such-bucket/x.zarr", "k", {}, False)
    assert "aws s3 mb s3://no-such-bucket" in missing.value.hint
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(FeatstoreError, match="cannot read s3://feats/y.zarr: EndpointConnectionError") as unreachable:
            existing_store("s3://feats/y.zarr", "k", {}, False)
        assert "AWS_ENDPOINT_URL" in unreachable.value.hint
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_a_removal_killed_half_way_is_cleared_by_the_next_run(s3, monkeypatch):
    """`--overwrite` and `rm` mark the prefix first: killed between deletes, the leftover is a
    half-created store the next run clears, not foreign objects it refuses."""
    from featstore.job import existing_store

    url = f"{s3}/removal/x.zarr"
    remote = Remote.of(url)
    remote.put("zarr.json", json.dumps({"attributes": {"schema_version": 1}}).encode())
    remote.put("train/labels/c/0", b"labels")
    calls = []

    def dies(keys):  # the batched delete never happens: killed
        calls.append(keys)
        raise KeyboardInterrupt

    monkeypatch.setattr(remote.fs, "rm", dies)
    with pytest.raises(KeyboardInterrupt):
        remote.remove_store()
    monkeypatch.undo()
    assert calls and sorted(objects(url)) == [CREATING, "train/labels/c/0"]  # zarr.json gone: no store to a reader
    assert existing_store(url, "k", {}, False) is None and objects(url) == []


def test_a_url_scheme_in_capitals_is_the_scheme():
    """--out S3://bucket/x.zarr is s3:// (URL schemes are case-insensitive): it reached fsspec as
    'S3' and ended with "unexpected ValueError: Protocol not known: S3"."""
    from featstore.store.remote import location

    assert location("S3://feats/Run A/x.zarr") == "s3://feats/Run A/x.zarr"
    assert location("Gs://b/x.zarr") == "gs://b/x.zarr" and str(location("dir/S3:/x.zarr")) == "dir/S3:/x.zarr"
