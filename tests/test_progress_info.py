"""Issue 10, items 5 and 6: progress in logs, `featstore info` on the last run and on resuming,
help on every option, and a command line that starts without importing torch, zarr, timm or DALI."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from featstore.errors import UsageError
from featstore.progress import PROGRESS_SECONDS_ENV, Progress, format_duration, progress_interval
from featstore.store import FeatureStore

REPO = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^extract (\S+): ([\d,]+)/([\d,]+) rows \(([\d.]+)%\), ([\d.]+) img/s, (ETA \S+|done in \S+), (\d+) invalid$")


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_lines_every_interval_with_rate_eta_and_invalid():
    clock, lines = _Clock(), []
    p = Progress(1000, "extract x.zarr", "lines", lines.append, interval=30, clock=clock)
    clock.now += 10
    p.update(100)
    assert lines == []  # not yet 30 s
    clock.now += 20
    p.update(200, invalid=2)  # 300 rows in 30 s: 10 img/s, 700 left: 70 s
    assert lines == ["extract x.zarr: 300/1,000 rows (30.0%), 10.0 img/s, ETA 1m10s, 2 invalid"]
    clock.now += 5
    p.update(100, invalid=1)
    assert len(lines) == 1
    clock.now += 65
    p.update(600)  # 1000 rows in 100 s
    assert lines[-1] == "extract x.zarr: 1,000/1,000 rows (100.0%), 10.0 img/s, done in 1m40s, 3 invalid"
    p.close()
    assert len(lines) == 2  # the end was already reported
    assert all(LINE.match(line) for line in lines)


def test_progress_short_run_stays_silent_and_off_prints_nothing():
    clock, lines = _Clock(), []
    p = Progress(10, "extract y", "lines", lines.append, interval=30, clock=clock)
    clock.now += 1
    p.update(10)
    p.close()
    off = Progress(10, "extract y", "off", lines.append, interval=0, clock=clock)
    off.update(10)
    off.close()
    assert lines == []
    assert format_duration(3725) == "1h02m" and format_duration(59.6) == "1m00s" and format_duration(7) == "7s"


def test_progress_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(PROGRESS_SECONDS_ENV, raising=False)
    assert progress_interval() == 30.0
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "2.5")
    assert progress_interval() == 2.5
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "soon")
    with pytest.raises(UsageError, match=PROGRESS_SECONDS_ENV):
        progress_interval()


def _featstore(*args: str, cwd: Path = REPO, env: dict | None = None, runner=("-m", "featstore.cli")) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, *runner, *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def folder_with_bad_file(small_folder, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("progress") / "data"
    shutil.copytree(small_folder, root)
    (root / "train" / "cat" / "x.JPEG").write_bytes(b"hello world!\n")
    return root


ARGS = ["--model", "resnet18", "--random-init", "--image-size", "32", "--resize", "32", "--batch-size", "4", "--workers", "1"]


@pytest.mark.slow
def test_logs_get_progress_lines_and_info_shows_the_run(folder_with_bad_file, tmp_path):
    """stderr is a pipe here, as under SLURM or nohup: lines, not a bar; through the default loader
    (DALI where it imports, whose stderr is filtered) and with the bad file counted as it is met."""
    out = tmp_path / "p.zarr"
    run = _featstore("extract", *ARGS, "--dataset", str(folder_with_bad_file), "--out", str(out), env={PROGRESS_SECONDS_ENV: "0"})
    assert run.returncode == 0, run.stderr
    checks = [line for line in run.stderr.splitlines() if line.startswith("file checks: ")]
    counts = [re.search(r"checked (\d+) of (\d+) files in [\d.]+ s \([\d,]+ files/s", line) for line in checks]  # one per split
    assert checks and all(counts) and sum(int(m.group(2)) for m in counts if m) == 25, run.stderr
    lines = [LINE.match(line) for line in run.stderr.splitlines() if not line.startswith("file checks: ")]
    assert lines and all(lines), run.stderr
    done = [int(m.group(2).replace(",", "")) for m in lines]
    assert done == sorted(done) and done[-1] == 25 and {m.group(3) for m in lines} == {"25"}
    assert lines[-1].group(6).startswith("done in") and lines[-1].group(7) == "1"
    assert "\r" not in run.stderr and "it/s" not in run.stderr  # no tqdm bar in a log
    quiet = _featstore(
        "extract",
        *ARGS,
        "--dataset",
        str(folder_with_bad_file),
        "--out",
        str(tmp_path / "q.zarr"),
        "--no-progress",
        env={PROGRESS_SECONDS_ENV: "0"},
    )
    # no progress lines; the file checks' one-line summary per split is a notice and stays
    assert quiet.returncode == 0 and all(line.startswith("file checks: ") for line in quiet.stderr.splitlines()), quiet.stderr

    store = FeatureStore.open(out)
    assert store.attrs["device"] == "cpu" and store.attrs["images_per_second"] > 0
    info = _featstore("info", str(out))
    assert info.returncode == 0
    run_line = next(line for line in info.stdout.splitlines() if line.startswith("run "))
    assert f"on cpu, {store.attrs['images_per_second']:,.1f} img/s, completed {store.attrs['completed']}" in run_line
    assert "resume" not in info.stdout


@pytest.mark.slow
def test_info_of_an_incomplete_store_shows_the_command_that_resumes_it(folder_with_bad_file, tmp_path):
    out = tmp_path / "r.zarr"
    killed = _featstore(
        "extract",
        *ARGS,
        "--loader",
        "torch",
        "--chunk-rows",
        "8",
        "--dataset",
        str(folder_with_bad_file),
        "--out",
        str(out),
        "--no-progress",
        runner=("-m", "tests.fault_runner", "kill-in-unit", "1", "--"),
    )
    assert killed.returncode == -9
    info = _featstore("info", str(out))
    assert "INCOMPLETE" in info.stdout
    command = next(line for line in info.stdout.splitlines() if line.startswith("resume "))[len("resume") :].strip()
    args = shlex.split(command)
    assert args[:2] == ["featstore", "extract"] and "--overwrite" not in args
    assert args[args.index("--out") + 1] == str(out.resolve()) and args[args.index("--loader") + 1] == "torch"
    # run as printed, from another folder (paths are absolute)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    resumed = _featstore(*args[1:], cwd=elsewhere)
    assert resumed.returncode == 0 and "resumed" in resumed.stdout, resumed.stderr
    store = FeatureStore.open(out)
    assert store.complete and [r["path"] for r in store.invalid_rows("train")] == ["train/cat/x.JPEG"]
    assert "resume " not in _featstore("info", str(out)).stdout


def test_every_option_of_extract_and_info_has_help():
    from featstore.cli import cli

    for name, command in cli.commands.items():  # every command's help as printed: no '%%' (click does no %-formatting)
        assert "%%" not in command.get_help(click.Context(command, info_name=name)), name
    for name in ("extract", "info"):
        command = cli.commands[name]
        missing = [p.name for p in command.params if isinstance(p, click.Option) and not (p.help or "").strip()]
        assert not missing, (name, missing)
        assert command.help
    text = cli.commands["extract"].get_help(click.Context(cli.commands["extract"], info_name="extract"))
    for needle in ("--loader", "nvjpeg (torchvision on CUDA)", "--batch-size", "Images per forward pass", "FEATSTORE_PROGRESS_SECONDS"):
        assert needle in text


@pytest.mark.slow
def test_the_command_line_starts_without_heavy_imports():
    """`featstore --help`, `extract --help` and `info` import neither torch nor zarr nor timm nor DALI
    (the measured start-up time is in benchmarks/RESULTS.md)."""
    code = (
        "import sys\n"
        "from featstore.cli import cli\n"
        "from featstore.console import run_cli\n"
        "for args in (['--help'], ['extract', '--help'], ['info', '--help']):\n"
        "    assert run_cli(cli, 'featstore', args) == 0\n"
        "heavy = ('torch', 'zarr', 'timm', 'nvidia.dali', 'torchvision', 'PIL')\n"
        "print(sorted(m for m in heavy if m in sys.modules), file=sys.stderr)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip().splitlines()[-1] == "[]"


def test_resume_command_round_trips_through_the_cli_parser(tmp_path, monkeypatch):
    """Every option that shapes the store survives shlex + click; --overwrite never appears."""
    from featstore.cli import cli
    from featstore.extraction import ExtractConfig, resume_command

    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()  # a folder named like the built-in dataset must not shadow it
    config = ExtractConfig(
        model="resnet18",
        dataset="digits",
        out="out dir/x.zarr",
        random_init=True,
        overwrite=True,
        views=["pool"],
        batch_size=8,
        dtype="float32",
        image_size=32,
        resize=40,
        interpolation="bilinear",
        mean=(0.5, 0.5, 0.5),
        strict=True,
    )
    args = shlex.split(resume_command(config, "torch"))
    assert args[:2] == ["featstore", "extract"] and "--overwrite" not in args
    ctx = cli.commands["extract"].make_context("extract", args[2:])
    p = ctx.params
    assert p["dataset"] == "digits" and p["out"] == str(tmp_path / "out dir" / "x.zarr") and p["loader"] == "torch"
    assert (p["views"], p["batch_size"], p["dtype"], p["image_size"], p["resize"], p["interpolation"], p["mean"]) == (
        "pool",
        8,
        "float32",
        32,
        40,
        "bilinear",
        (0.5, 0.5, 0.5),
    )
    assert p["random_init"] and p["strict"] and not p["overwrite"] and p["workers"] == 2


def test_a_builder_file_is_made_absolute_alike_by_the_resume_command_and_the_request_memo(tmp_path, monkeypatch):
    """``file.py:build`` split at its last colon, as the encoder loader splits it (a folder name may hold one)."""
    from featstore.cli import cli
    from featstore.extraction import ExtractConfig, request_of, resolved_model, resume_command

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my:models").mkdir()
    (tmp_path / "my:models" / "enc.py").write_text("def build():\n    raise NotImplementedError\n")
    config = ExtractConfig(model="my:models/enc.py:build", dataset="digits", out="x.zarr")
    expected = f"{tmp_path.resolve() / 'my:models' / 'enc.py'}:build"
    assert request_of(config)["model"] == expected
    args = shlex.split(resume_command(config, "torch"))
    assert cli.commands["extract"].make_context("extract", args[2:]).params["model"] == expected
    for name in ("resnet18", "tv:resnet50", "timm:vit_small_patch14_dinov2.lvd142m", "pkg.module:build", "missing.py:build"):
        assert resolved_model(name) == name  # not a builder file here: as typed
