"""Every bad input: one `error:` line naming the problem and the fix, a non-zero exit, no traceback,
and nothing written at --out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from featstore.cli import cli
from featstore.console import run_cli

FAST = ["--image-size", "32", "--resize", "32", "--loader", "torch", "--workers", "0", "--no-progress"]


def run(capsys, *args) -> tuple[int, str]:
    code = run_cli(cli, "featstore", [str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(err: str, *needles: str):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out.zarr"


def test_unknown_model_suggests_close_names(capsys, out):
    code, err = run(capsys, "extract", "--model", "resnet19", "--random-init", "--out", out, *FAST)
    assert code == 2
    assert_one_line_error(err, "unknown model 'resnet19'", "did you mean", "resnet18")
    assert not out.exists()


def test_unknown_torchvision_model(capsys, out):
    code, err = run(capsys, "extract", "--model", "tv:resnet5", "--random-init", "--out", out, *FAST)
    assert code == 2
    assert_one_line_error(err, "unknown torchvision model", "tv:resnet50")
    assert not out.exists()


def test_dataset_missing(capsys, out, tmp_path):
    code, err = run(capsys, "extract", "--model", "resnet18", "--random-init", "--dataset", tmp_path / "nope", "--out", out, *FAST)
    assert code == 2
    assert_one_line_error(err, "not found", "folder")
    assert not out.exists()


def test_dataset_empty_folder(capsys, out, tmp_path):
    (tmp_path / "empty").mkdir()
    code, err = run(capsys, "extract", "--model", "resnet18", "--random-init", "--dataset", tmp_path / "empty", "--out", out, *FAST)
    assert code == 2
    assert_one_line_error(err, "no class folders")
    assert not out.exists()


def test_no_images_found(capsys, out, tmp_path):
    (tmp_path / "data" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "cat" / "readme.txt").write_text("x")
    code, err = run(capsys, "extract", "--model", "resnet18", "--random-init", "--dataset", tmp_path / "data", "--out", out, *FAST)
    assert code == 2
    assert_one_line_error(err, "no images found")
    assert not out.exists()


def test_out_holds_another_store(capsys, small_folder, tmp_path):
    out = tmp_path / "s.zarr"
    assert run(capsys, "extract", "--model", "resnet18", "--random-init", "--dataset", small_folder, "--out", out, *FAST)[0] == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code, err = run(
        capsys,
        "extract",
        "--model",
        "resnet18",
        "--random-init",
        "--dataset",
        small_folder,
        "--out",
        out,
        *FAST[:-1],
        "--dtype",
        "float32",
        "--no-progress",
    )
    assert code == 2
    assert_one_line_error(err, "holds another store", "dtype", "--overwrite")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    code, err = run(
        capsys,
        "extract",
        "--model",
        "resnet18",
        "--random-init",
        "--dataset",
        small_folder,
        "--out",
        out,
        *FAST[:-1],
        "--dtype",
        "float32",
        "--no-progress",
        "--overwrite",
    )
    assert code == 0
    from featstore.store import FeatureStore

    assert FeatureStore.open(out).attrs["dtype"] == "float32"


def test_out_is_not_a_store(capsys, small_folder, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    for extra in ([], ["--overwrite"]):
        code, err = run(capsys, "extract", "--model", "resnet18", "--random-init", "--dataset", small_folder, "--out", out, *FAST, *extra)
        assert code == 2
        assert_one_line_error(err, "is not a featstore store")
    assert (out / "thesis.tex").read_text() == "do not delete"


def test_no_weights_says_where_to_put_them(capsys, out):
    code, err = run(capsys, "extract", "--model", "dino", "--out", out, *FAST)
    assert code == 1
    assert_one_line_error(err, "no weights for 'dino'", "dinov2_vits14_pretrain.pth", "--random-init")
    assert not out.exists()


def test_weights_file_missing(capsys, out, tmp_path):
    code, err = run(capsys, "extract", "--model", "resnet18", "--weights", tmp_path / "none.pth", "--out", out, *FAST)
    assert code == 2
    assert_one_line_error(err, "weights file", "not found")
    assert not out.exists()


def test_weights_not_a_checkpoint(capsys, out, tmp_path, small_folder):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(4096))
    code, err = run(capsys, "extract", "--model", "resnet18", "--weights", junk, "--dataset", small_folder, "--out", out, *FAST)
    assert code == 1
    assert_one_line_error(err, "not a PyTorch checkpoint")
    assert not out.exists()


def test_weights_do_not_fit(capsys, out, tmp_path, small_folder):
    import torchvision

    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    code, err = run(capsys, "extract", "--model", "resnet18", "--weights", path, "--dataset", small_folder, "--out", out, *FAST)
    assert code == 1
    assert_one_line_error(err, "do not fit")
    path2 = tmp_path / "vit.pth"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, path2)
    code, err = run(capsys, "extract", "--model", "resnet18", "--weights", path2, "--dataset", small_folder, "--out", out, *FAST)
    assert code == 1
    assert_one_line_error(err, "do not fit", "no parameter names match")
    assert not out.exists()


def test_unknown_view(capsys, out, small_folder):
    code, err = run(
        capsys, "extract", "--model", "resnet18", "--random-init", "--dataset", small_folder, "--views", "cls", "--out", out, *FAST
    )
    assert code == 2
    assert_one_line_error(err, "unknown view 'cls'", "pool")
    assert not out.exists()


@pytest.mark.parametrize(
    "flag,value,needle",
    [
        ("--batch-size", "0", "--batch-size must be >= 1"),
        ("--workers", "-1", "--workers must be >= 0"),
        ("--mean", "0.5,0.5", "needs 3 values"),
        ("--std", "a,b,c", "not three comma-separated numbers"),
        ("--resize", "16", "smaller than --image-size"),
        ("--device", "tpu", "unknown device"),
        ("--loader", "opencv", "Invalid value for '--loader'"),
        ("--dtype", "int8", "Invalid value for '--dtype'"),
    ],
)
def test_bad_flag_values(capsys, out, small_folder, flag, value, needle):
    args = [
        "extract",
        "--model",
        "resnet18",
        "--random-init",
        "--dataset",
        small_folder,
        "--out",
        out,
        "--image-size",
        "32",
        "--no-progress",
        flag,
        value,
    ]
    code, err = run(capsys, *args)
    assert code == 2
    assert_one_line_error(err, needle)
    assert not out.exists()


def test_usage_errors_are_one_line(capsys):
    code, err = run(capsys, "extract", "--model")
    assert code == 2
    assert_one_line_error(err, "--model", "featstore extract --help")
    code, err = run(capsys, "extract", "--bogus")
    assert code == 2
    assert_one_line_error(err, "No such option")
    code, err = run(capsys, "frobnicate")
    assert code == 2
    assert_one_line_error(err, "No such command")


def test_an_option_of_one_value_given_twice_is_refused(capsys, out):
    """click keeps the last of a repeated single-value option without a word: `--model a --model b`
    extracted b alone. Every command of both tools refuses it before doing anything; repeatable
    options (probe's --store, --model, --method) are not affected."""
    code, err = run(capsys, "extract", "--model", "resnet18", "--model", "resnet50", "--random-init", "--dataset", "digits", "--out", out)
    assert code == 2 and not out.exists()
    assert_one_line_error(err, "--model given 2 times; it takes one value (pass it once)", "featstore extract --help")
    assert run(capsys, "extract", "-h", "--help")[0] == 0  # --help acts as it is read: twice is harmless
    code, err = run(capsys, "ls", "--json", "--json", "--json")
    assert code == 2
    assert_one_line_error(err, "--json given 3 times")
    code, err = run(capsys, "extract", "--model", "resnet18", "--views", "pool", "--views", "pool", "--dataset", "digits", "--out", out)
    assert code == 2 and not out.exists()
    assert_one_line_error(err, "--views given 2 times; it takes one value (pass its values once, as one comma-separated list)")
    from probe.cli import main as probe_main

    code = run_cli(probe_main, "probe", ["fit", "--store", "a.zarr", "--refit", "--no-refit"])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "--refit/--no-refit given 2 times", "probe fit --help")
    code = run_cli(probe_main, "probe", ["fit", "--store", "a.zarr", "--seeds", "0,1", "--seeds", "2"])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "--seeds given 2 times", "as one comma-separated list")
    code = run_cli(probe_main, "probe", ["fit", "--store", "a.zarr", "--store", "b.zarr", "--method", "linear", "--method", "knn"])
    assert code == 2  # past the option check: the stores are missing
    assert_one_line_error(capsys.readouterr().err, "store 'a.zarr' not found")


def test_info_on_missing_store(capsys, tmp_path):
    code, err = run(capsys, "info", tmp_path / "nope.zarr")
    assert code == 2
    assert_one_line_error(err, "not found", "featstore extract")


@pytest.mark.slow
def test_console_script_exit_code_and_debug(tmp_path):
    """The installed entry point: one line by default, the traceback with --debug."""
    exe = Path(sys.executable).parent / "featstore"
    cmd = [str(exe), "extract", "--model", "resnet19", "--random-init", "--out", str(tmp_path / "o.zarr")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown model") and "Traceback" not in proc.stderr
    proc = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_out_in_a_place_that_cannot_hold_it(capsys, small_folder, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    code, err = run(
        capsys, "extract", "--model", "resnet18", "--random-init", "--dataset", small_folder, "--out", blocker / "s.zarr", *FAST
    )
    assert code == 1
    assert_one_line_error(err, "cannot create the store", "writable")
    assert blocker.read_text() == "a file, not a folder"


@pytest.mark.parametrize("allocate", ["torch", "python"])
def test_an_allocation_that_fails_is_one_line_naming_the_memory(capsys, allocate):
    """torch's CPU allocator refusing (e.g. --image-size 100000: 120 GB for one batch) and Python's
    MemoryError read as out of memory with the command's fix, not "unexpected RuntimeError"."""
    import click

    from probe.cli import main as probe_main

    for group_class, fix in ((type(cli), "lower --batch-size (or --image-size)"), (type(probe_main), "lower --batch-size or --max-memory")):

        @click.group(cls=group_class)
        def group():
            pass

        @group.command()
        def grow():
            torch.empty(1 << 62, dtype=torch.uint8) if allocate == "torch" else bytearray(1 << 62)

        assert run_cli(group, "prog", ["grow"]) == 1
        assert_one_line_error(capsys.readouterr().err, "error: out of memory (", fix)
