"""Killed extractions resume to a store identical to an uninterrupted run: no row lost or doubled."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from featstore.store import PROGRESS, FeatureStore

pytestmark = pytest.mark.slow  # every test here runs featstore extractions in subprocesses (kill, resume, ranks)

REPO = Path(__file__).resolve().parent.parent
ARGS = [
    "extract",
    "--model",
    "resnet18",
    "--random-init",
    "--dataset",
    "digits",
    "--image-size",
    "16",
    "--resize",
    "16",
    "--loader",
    "torch",
    "--workers",
    "0",
    "--batch-size",
    "32",
    "--chunk-rows",
    "64",
    "--no-progress",
]


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))  # same threads → same bits
    return env


def _cmd(out: Path, mode="none", param="0"):
    return [sys.executable, "-m", "tests.fault_runner", mode, param, "--", *ARGS, "--out", str(out)]


def _run(out: Path, mode="none", param="0") -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(out, mode, param), capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)


def _snapshot(out: Path) -> dict:
    store = FeatureStore.open(out)
    assert store.complete
    snap = {}
    for split in store.splits:
        snap[f"{split}/pool"] = store.features(split, "pool")[:]  # read now: the store changes later
        snap[f"{split}/labels"] = store.labels(split)
        snap[f"{split}/valid"] = store.valid(split)
        snap[f"{split}/paths"] = store.paths(split)
    return snap


def _assert_identical(out: Path, clean: dict):
    snap = _snapshot(out)
    assert snap.keys() == clean.keys()
    for k in clean:
        assert snap[k].shape == clean[k].shape, k
        if snap[k].dtype.kind == "f":
            assert snap[k].tobytes() == clean[k].tobytes(), k  # bitwise
        else:
            np.testing.assert_array_equal(snap[k], clean[k], err_msg=k)
    assert sum(len(v) for k, v in snap.items() if k.endswith("/labels")) == 1797
    assert not (out / PROGRESS).exists()
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".partial"))]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "clean.zarr"
    t0 = time.perf_counter()
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr
    return _snapshot(out), time.perf_counter() - t0


@pytest.mark.slow
def test_kill_at_random_points_then_resume(clean, tmp_path):
    snapshot, duration = clean
    rng = random.Random(20261128)
    kills, attempt = 0, 0
    while kills < 10:  # at least 10 kills, 2–3 per extraction, each extraction then finished and compared
        attempt += 1
        out = tmp_path / f"run{attempt}.zarr"
        proc = subprocess.Popen(_cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=REPO)
        # kill anywhere from start-up to the very end, several times per run
        for _ in range(rng.randint(2, 3)):
            try:
                proc.wait(timeout=rng.uniform(0.2, duration * 0.9))
                break  # finished before this kill point
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                proc = subprocess.Popen(_cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=REPO)
        proc.wait()
        if proc.returncode != 0:  # the last kill may have hit; finish the job
            assert _run(out).returncode == 0
        _assert_identical(out, snapshot)
    assert kills >= 10


@pytest.mark.parametrize(
    "mode,param",
    [
        ("kill-in-unit", "0"),
        ("kill-in-unit", "20"),
        ("kill-in-finalize", "before-complete"),
        ("kill-in-finalize", "after-complete"),
    ],
)
def test_kill_inside_unit_write_and_finalize(clean, tmp_path, mode, param):
    snapshot, _ = clean
    out = tmp_path / "s.zarr"
    proc = _run(out, mode, param)
    assert proc.returncode == -signal.SIGKILL
    store = FeatureStore.open(out)
    if param == "after-complete":
        assert store.complete  # complete was set; the rerun is a cache hit
    else:
        assert not store.complete
    resumed = _run(out)
    assert resumed.returncode == 0, resumed.stderr
    assert ("up to date" in resumed.stdout) == (param == "after-complete")
    _assert_identical(out, snapshot)


def test_repair_of_an_interrupted_store_resumes_it(clean, tmp_path):
    """--repair on a store killed mid-run (intact, incomplete) goes on from its progress: it deleted the
    progress as if the store were complete, then failed, and every later run failed the same way."""
    snapshot, _ = clean
    out = tmp_path / "s.zarr"
    assert _run(out, "kill-in-unit", "20").returncode == -signal.SIGKILL
    assert not FeatureStore.open(out).complete
    repaired = subprocess.run(_cmd(out) + ["--repair"], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
    assert repaired.returncode == 0 and "verified intact" in repaired.stderr + repaired.stdout, repaired.stderr
    _assert_identical(out, snapshot)


def test_ctrl_c_is_one_line_and_resumable(clean, tmp_path):
    snapshot, duration = clean
    out = tmp_path / "int.zarr"
    # a shell without job control starts background jobs with SIGINT ignored (as CI may): restore it
    proc = subprocess.Popen(
        _cmd(out, "slow-units", "0.3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=REPO,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while not list((out / PROGRESS).glob("*/unit-*.json")) and time.time() < deadline:  # mid-extraction
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "error: interrupted (rerun the same command to resume)"
    assert "Traceback" not in err
    info = FeatureStore.open(out).info()
    assert not info["complete"] and info["pending_units"] > 0
    from featstore.cli import format_info

    assert f"INCOMPLETE, {info['pending_units']} units pending" in format_info(info)
    assert _run(out).returncode == 0
    _assert_identical(out, snapshot)


def _run_ranks(out: Path, job: str, port: str = "29500", extra: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Two ranks as torchrun starts them: one launch's run id and rendezvous port (each launch its own port)."""
    procs = []
    for rank in (1, 0):  # the follower starts first and must wait for rank 0
        env = _env()
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), TORCHELASTIC_RUN_ID=job, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(
            subprocess.Popen(_cmd(out) + list(extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        )
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    return outputs


def test_two_ranks_write_one_store_identical_to_one_process(clean, tmp_path):
    """torchrun-style ranks (RANK/WORLD_SIZE env) share the units; the store equals a single run's."""
    snapshot, _ = clean
    out = tmp_path / "ranks.zarr"
    outputs = _run_ranks(out, "test-job-1")
    follower_out, leader_out = outputs[0][0], outputs[1][0]
    assert "(rank 1)" in follower_out and "created" in leader_out
    written = [int(o.split("wrote ")[1].split(" rows")[0].replace(",", "")) for o in (follower_out, leader_out)]
    assert sum(written) == 1797 and min(written) > 0  # both ranks did part of the work
    _assert_identical(out, snapshot)
    assert FeatureStore.open(out).attrs["world_size"] == 2
    again = _run_ranks(out, "test-job-2", port="29501")  # a new job on the finished store: nothing to do on any rank
    assert all("up to date" in o for o, _ in again)
    _assert_identical(out, snapshot)
    # the same command again with --overwrite and the same run id (a fixed --rdzv-id): a new launch, not
    # the last one (rank 1 found the old store marked with its job, said "up to date", and rank 0 waited forever)
    rerun = _run_ranks(out, "test-job-2", port="29502", extra=("--overwrite",))
    assert "(rank 1)" in rerun[0][0] and "wrote 0 rows" not in rerun[0][0] and "created" in rerun[1][0], rerun
    _assert_identical(out, snapshot)
