"""Extractions into object storage (issue 26), each in subprocesses against a real S3 API (moto's
server on 127.0.0.1, started here): killed and resumed, a second writer refused, the cache at a
URL, and two torchrun "nodes" (c10d rendezvous on 127.0.0.1) writing one store, killed and resumed.
Every finished store is compared row for row, bitwise, with the single-process local store."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from featstore.store import PROGRESS, FeatureStore
from featstore.store.lease import LEASE, Lease
from featstore.store.remote import Remote
from tests.s3_server import moto_s3, objects
from tests.test_resume import ARGS, _env, _snapshot

pytestmark = pytest.mark.slow  # every test here runs extractions in subprocesses

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as bucket:
        yield bucket


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The reference: one process, a local store."""
    out = tmp_path_factory.mktemp("clean") / "clean.zarr"
    proc = subprocess.run(_cmd(str(out)), capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return _snapshot(out)


def _cmd(out: str | None, mode: str = "none", param: str = "0") -> list[str]:
    return [sys.executable, "-m", "tests.fault_runner", mode, param, "--", *ARGS, *(["--out", out] if out else [])]


def _run(out: str | None, mode: str = "none", param: str = "0", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(out, mode, param), capture_output=True, text=True, env=env or _env(), cwd=REPO, timeout=600)


def _assert_identical(url: str, clean: dict) -> None:
    snap = _snapshot(url)  # type: ignore[arg-type]  (FeatureStore.open takes URLs)
    assert snap.keys() == clean.keys()
    for k in clean:
        if snap[k].dtype.kind == "f":
            assert snap[k].tobytes() == clean[k].tobytes(), k  # bitwise
        else:
            np.testing.assert_array_equal(snap[k], clean[k], err_msg=k)
    assert not [n for n in objects(url) if n.startswith(PROGRESS)]  # no marker, lease or plan left
    assert FeatureStore.open(url, verify=True).complete


def _markers(url: str) -> list[str]:
    from featstore.store.remote import Remote

    return [n for n in Remote.of(url).names(PROGRESS) if "/unit-" in n]


def _featstore(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "featstore.cli", *args], capture_output=True, text=True, env=env or _env(), cwd=REPO, timeout=600
    )


def test_extract_to_s3_killed_in_a_unit_and_in_finalize_resumes_to_the_same_store(s3, clean):
    url = f"{s3}/kill/digits.zarr"
    proc = _run(url, "kill-in-unit", "5")  # SIGKILL halfway through the 6th unit's chunks
    assert proc.returncode == -signal.SIGKILL
    assert len(_markers(url)) == 5  # five whole units are marked; the torn sixth is not
    listed = json.loads(_featstore("ls", "--json", url).stdout)[0]
    assert listed["state"] == "partial 5/29 units (17%)" and not listed["writing"]  # the lease's pid is dead
    proc = _run(url, "kill-in-finalize", "before-complete")  # the resume, killed once every unit is marked
    assert proc.returncode == -signal.SIGKILL
    assert not FeatureStore.open(url).complete and len(_markers(url)) == 29
    resumed = _run(url)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed, wrote 0 rows" in resumed.stdout
    _assert_identical(url, clean)
    again = _run(url)
    assert again.returncode == 0 and "up to date" in again.stdout


def test_a_second_writer_is_refused_while_one_writes(s3, clean):
    url = f"{s3}/two-writers/digits.zarr"
    first = subprocess.Popen(
        _cmd(url, "slow-units", "0.5"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO
    )
    deadline = time.time() + 120
    while not _markers(url) and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    assert _markers(url), "the first writer wrote no unit"
    listed = json.loads(_featstore("ls", "--json", url).stdout)[0]
    assert listed["writing"] and listed["state"].startswith("writing ")
    second = _run(url)  # ~15 s of units at 0.5 s each: the first is still writing when the second reaches the lease
    assert first.poll() is None, "the first writer finished before the second started: nothing was tested"
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stdout + second.stderr
    line = second.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: store is being written by pid {first.pid} on host {socket.gethostname()}"), second.stderr
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    _assert_identical(url, clean)


def test_a_job_stopped_past_its_lease_writes_no_unit_once_another_writer_took_it(s3):
    """Rank 0 and rank 1 of a job stopped (SIGSTOP) past their lease, which another writer then takes
    over: resumed, neither writes another unit into the store that writer now holds (rank 0 renews
    its stale lease before a unit and finds it lost; rank 1 reads it and finds it another's). Both
    used to write on, rank 1 to the end, rank 0 until its check before finalize."""
    url = f"{s3}/stopped/digits.zarr"
    env = dict(_env(), FEATSTORE_LEASE_SECONDS="4", WORLD_SIZE="2", TORCHELASTIC_RUN_ID="stopped-1")
    ranks = [
        subprocess.Popen(
            _cmd(url, "slow-units", "0.5"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), cwd=REPO,
        )
        for r in (0, 1)
    ]  # fmt: skip
    try:
        deadline = time.time() + 180
        while len(_markers(url)) < 4 and time.time() < deadline and all(p.poll() is None for p in ranks):
            time.sleep(0.1)
        for p in ranks:
            os.kill(p.pid, signal.SIGSTOP)
        assert all(p.poll() is None for p in ranks) and len(_markers(url)) >= 4, [p.communicate()[1][-2000:] for p in ranks]
        remote = Remote.of(url)
        time.sleep(max(0.0, json.loads(remote.read(LEASE) or b"{}")["expires"] - time.time()) + 0.5)
        written = set(_markers(url))
        with Lease(remote) as taker:  # another writer (an --overwrite run) takes the expired lease over
            for p in ranks:
                os.kill(p.pid, signal.SIGCONT)
            outputs = [p.communicate(timeout=120) for p in ranks]
            assert json.loads(remote.read(LEASE) or b"{}")["token"] == taker._token
            assert set(_markers(url)) == written  # no unit written after the takeover
    finally:
        for p in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
    lines = [err.strip().splitlines()[-1] for _, err in outputs]
    assert [p.returncode for p in ranks] == [1, 1] and "Traceback" not in "".join(e for _, e in outputs), lines
    assert lines[0].startswith(f"error: lost the lease {url}/{LEASE} to another writer"), lines
    assert lines[1].startswith(f"error: this job lost the lease {url}/{LEASE} (pid {os.getpid()} on host"), lines


def test_the_cache_on_s3(s3, clean, tmp_path):
    """FEATSTORE_HOME=s3://…: extraction without --out caches the store there; ls lists it, the
    same request finds it up to date, probe finds it by model and dataset, verify checks it, gc deletes it."""
    env = dict(_env(), FEATSTORE_HOME=f"{s3}/home", FEATSTORE_CACHE="", XDG_CACHE_HOME=str(tmp_path / "local"))
    first = _run(None, env=env)
    assert first.returncode == 0, first.stderr
    stored = first.stdout.split(":")[0] + ":" + first.stdout.split(":")[1]  # "s3://feats/home/stores/digits/resnet18-….zarr"
    assert stored.startswith(f"{s3}/home/stores/digits/resnet18-") and stored.endswith(".zarr"), first.stdout
    _assert_identical(stored, clean)
    assert (tmp_path / "local" / "featstore").is_dir()  # memos and file checks stay local

    listed = json.loads(_featstore("ls", "--json", env=env).stdout)
    assert [(e["path"], e["state"], e["rows"]) for e in listed] == [(stored, "complete", 1797)]
    again = _run(None, env=env)
    assert again.returncode == 0 and again.stdout.startswith(f"{stored}: up to date"), again.stdout

    fit = subprocess.run(
        [sys.executable, "-m", "probe.cli", "fit", "--model", "resnet18", "--dataset", "digits", "--lr", "0.1", "--epochs", "2",
         "--out", str(tmp_path / "fit")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr
    assert stored in (tmp_path / "fit" / "results.csv").read_text()

    verified = _featstore("verify", stored, env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    collected = _featstore("gc", "--older-than", "0", env=env)  # by completion time: a URL keeps no use times
    assert collected.returncode == 0 and stored in collected.stdout, collected.stdout + collected.stderr
    assert objects(stored) == [] and "no stores in" in _featstore("ls", env=env).stdout


# ---------------------------------------------------------------- many nodes: torchrun, c10d rendezvous


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _nodes(url: str, job: str, mode: str = "none", param: str = "0") -> list[subprocess.Popen]:
    """Two "nodes" of one rank each: two torchrun agents meeting at a c10d rendezvous on 127.0.0.1."""
    port = _free_port()
    procs = []
    for node in (0, 1):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", job,
            "--rdzv-conf", f"is_host={'true' if node == 0 else 'false'}", "--max-restarts", "0",
            "-m", "tests.fault_runner", mode, param, "--", *ARGS, "--out", url,
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO, start_new_session=True)
        )
    return procs


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every process below it (torchrun starts its ranks in their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, stack = [], [pid]
    while stack:
        p = stack.pop()
        tree.append(p)
        stack.extend(children.get(p, []))
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _rows_written(outputs: list[str]) -> list[int]:
    return [int(o.split("wrote ")[1].split(" rows")[0].replace(",", "")) for o in outputs]


def test_two_nodes_write_one_store_equal_to_one_process(s3, clean):
    url = f"{s3}/nodes/digits.zarr"
    procs = _nodes(url, "nodes-1")
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outputs]
    written = _rows_written([o for o, _ in outputs])
    assert sum(written) == 1797 and min(written) > 0  # both nodes did part of the work
    _assert_identical(url, clean)
    assert FeatureStore.open(url).attrs["world_size"] == 2


def test_a_node_killed_mid_run_then_the_job_rerun_resumes(s3, clean):
    url = f"{s3}/node-dies/digits.zarr"
    procs = _nodes(url, "dies-1", "slow-units", "0.5")
    deadline = time.time() + 180
    while len(_markers(url)) < 4 and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.2)
    assert len(_markers(url)) >= 4, [p.communicate()[1][-2000:] for p in procs]
    _kill_tree(procs[1].pid)  # node 1 dies: its agent and its rank, mid-unit or between units
    time.sleep(1.0)
    _kill_tree(procs[0].pid)  # the scheduler ends the job (srun --kill-on-bad-exit)
    for p in procs:
        p.communicate(timeout=60)
    store, marked = FeatureStore.open(url), set(_markers(url))
    assert not store.complete and 4 <= len(marked) < 29
    covered = sum(u.rows for sp in store.splits for u in store.units(sp) if f"{PROGRESS}/{sp}/unit-{u.index:06d}.json" in marked)

    rerun = _nodes(url, "dies-2")  # the same command again, a new job id
    outputs = [p.communicate(timeout=600) for p in rerun]
    assert [p.returncode for p in rerun] == [0, 0], [e[-2000:] for _, e in outputs]
    assert sum(_rows_written([o for o, _ in outputs])) == 1797 - covered  # only the units no marker covered
    _assert_identical(url, clean)
