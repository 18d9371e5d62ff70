"""Issue 23 item 6: a results folder that cannot be written fails before training, naming the
path the user gave; a closed stdout (``| head``) ends both CLIs as a closed pipe ends ``cat``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

import probe.fitting
from tests.test_probe import assert_one_line_error, digits, one_thread, run_cli, store  # noqa: F401 (fixtures)


def test_out_inside_a_file_fails_before_training(store, tmp_path, monkeypatch):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file")

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking --out")

    monkeypatch.setattr(probe.fitting, "_fit_one", no_training)
    given = os.path.relpath(blocker / "results" / "run1")
    code, output = run_cli(["fit", "--store", str(store), "--lr", "0.05", "--epochs", "1", "--out", given])
    assert_one_line_error(code, output, 2, f"--out {given!r}", "is a file")
    assert blocker.read_text() == "a file" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_out_on_a_place_that_refuses_files_fails_before_training(store, monkeypatch):
    # /proc refuses new files even to root (os.access would say yes to root)
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs a /proc file system")
    monkeypatch.setattr(probe.fitting, "_fit_one", lambda *a, **k: pytest.fail("trained before checking --out"))
    code, output = run_cli(["fit", "--store", str(store), "--lr", "0.05", "--epochs", "1", "--out", "/proc/probe-results"])
    assert_one_line_error(code, output, 2, "--out '/proc/probe-results' is not writable")


def _closed_stdout(module: str, *args: str) -> subprocess.CompletedProcess:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write: every write to stdout fails with EPIPE
    try:
        return subprocess.run([sys.executable, "-m", module, *args], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)


@pytest.mark.slow
@pytest.mark.parametrize("module,args", [("probe.cli", ["--help"]), ("featstore.cli", ["--help"]), ("featstore.cli", ["models"])])
def test_closed_pipe_exits_like_cat_without_a_traceback(module, args):
    proc = _closed_stdout(module, *args)
    assert proc.stderr == ""  # no traceback, no "Exception ignored … BrokenPipeError", no error line
    assert proc.returncode == 128 + signal.SIGPIPE  # what a shell reports for `cat big | head -1` under pipefail


def test_method_given_twice_runs_both(store, tmp_path):
    """`--method linear --method knn` used to keep the last one only, silently."""
    import csv

    out = tmp_path / "o"
    code, output = run_cli(
        ["fit", "--store", str(store), "--lr", "0.05", "--epochs", "1", "--method", "linear", "--method", "knn", "--out", str(out)]
    )
    assert code == 0, output
    assert {r["method"] for r in csv.DictReader((out / "results.csv").open())} == {"linear", "knn"}
