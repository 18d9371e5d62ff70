"""Benchmark: the feature cache's everyday commands, each beside its baseline, in one run.

  ls             `featstore ls` (a fresh process) over N cached stores; baseline: `python -c pass`
  lookup         featstore.cache.lookup (how `probe fit --model M --dataset D` finds its store) of
                 one of those N stores, in a fresh process; baseline: `import featstore.cache` alone
  up to date     `featstore extract` of a store already in the cache (a fresh process);
                 baseline: `python -c "import torch"` (targets: ls < 1 s, up to date < 2x baseline)
  export .h5     featstore.store.export.export (what `featstore export STORE --to x.h5` runs) of a
                 ROWS x 768 float16 store, MB/s of feature bytes until the file is fsync'ed;
                 baseline: np.ndarray.tofile of the same bytes (+ fsync), i.e. this disk's write
                 speed (target >= 200 MB/s)

Wall and CPU seconds (user + system, all threads) are both reported: on a shared machine the
wall time includes waiting for a core.

Every command runs in a subprocess with its own $FEATSTORE_HOME under a temp dir; each time is the
median of --repeats runs. --baseline CHECKOUT times `ls` and lookup with another checkout's
featstore too (e.g. before a change), right after this one's, in the same run.

    .venv/bin/python benchmarks/bench_cache.py
    .venv/bin/python benchmarks/bench_cache.py --stores 20 --rows 16384 --repeats 1   # quick
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import MB, OUT_DIR, REPO, machine, table, write_json

DIM = 768


def timed(fn: Callable[[], object], repeats: int) -> dict:
    """Median wall seconds and median CPU seconds (user + system, this process and the processes it
    waited for) of ``fn()``. On a shared machine the CPU time is the steadier number: wall time
    includes waiting for a core."""
    walls, cpus = [], []
    for _ in range(repeats):
        c, t = _cpu_seconds(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(_cpu_seconds() - c)
    return {"seconds": statistics.median(walls), "cpu_seconds": statistics.median(cpus)}


def _cpu_seconds() -> float:
    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def in_fresh_process(cmd: list[str], env: dict) -> Callable[[], object]:
    return lambda: subprocess.run(cmd, env=env, check=True, capture_output=True)


def store_key(i: int) -> str:
    """The cache key of the i-th store make_stores writes."""
    return f"{i:012x}" + "0" * 52


def make_stores(n: int) -> None:
    """n complete cached stores (digits-sized: 1,797 rows x 512 float16, 3 splits), as extract leaves
    them, where extract puts them (the cache of this process's $FEATSTORE_HOME)."""
    from featstore.home import default_store_path
    from featstore.store import FeatureStore

    rng = np.random.default_rng(0)
    sizes = {"train": 1078, "val": 359, "test": 360}
    x = rng.standard_normal((max(sizes.values()), 512)).astype(np.float16)
    for i in range(n):
        key = store_key(i)
        fs = FeatureStore.create(
            default_store_path("digits", f"model{i}", key),
            splits={s: ([f"{s}/{j}.png" for j in range(m)], np.arange(m) % 10) for s, m in sizes.items()},
            views={"pool": 512},
            dtype="float16",
            attrs={
                "encoder": {"name": f"model{i}", "arch": "tv:resnet18", "weights_path": None, "weights_sha256": "random-init"},
                "dataset": {"name": "digits", "spec": "digits", "manifest_sha256": "m"},
                "cache_key": key,
            },
        )
        for s in sizes:
            for u in fs.units(s):
                fs.write_unit(u, {"pool": x[: u.rows]}, np.ones(u.rows, bool))
        fs.finalize()


def make_big_store(path: Path, rows: int) -> int:
    from featstore.store import FeatureStore

    fs = FeatureStore.create(
        path,
        splits={"train": ([f"{i}.jpg" for i in range(rows)], np.zeros(rows, np.int32))},
        views={"cls": DIM},
        dtype="float16",
        attrs={"encoder": {"name": "synthetic"}},
    )
    block = np.random.default_rng(0).standard_normal((fs.chunk_rows, DIM)).astype(np.float16)
    for u in fs.units("train"):
        fs.write_unit(u, {"cls": block[: u.rows]}, np.ones(u.rows, bool))
    fs.finalize()
    return rows * DIM * 2


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stores", type=int, default=100, help="cached stores `ls` lists")
    ap.add_argument("--rows", type=int, default=262_144, help="rows of the exported store (x 768 float16)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--baseline", type=Path, help="another checkout of featstore (e.g. before the change): ls and lookup are timed with it too"
    )
    ap.add_argument("--out", default=str(OUT_DIR / "bench_cache.json"))
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    py = sys.executable
    featstore = [py, "-m", "featstore.cli"]
    os.environ["FEATSTORE_HOME"] = str(work / "home")  # make_stores fills it; every command reads it
    # PYTHONSAFEPATH: `python -c`/`-m` would put the working directory first on sys.path, and run
    # the featstore of whatever checkout the benchmark was started in instead of PYTHONPATH's
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONSAFEPATH="1", OMP_NUM_THREADS="1")
    checkouts = [("", env)] + ([(", baseline checkout", dict(env, PYTHONPATH=str(args.baseline.resolve())))] if args.baseline else [])
    for _, run_env in checkouts:  # each command runs the checkout it is labelled with
        where = subprocess.run(
            [py, "-c", "import featstore; print(featstore.__file__)"], env=run_env, check=True, capture_output=True, text=True
        )
        assert Path(where.stdout.strip()).is_relative_to(run_env["PYTHONPATH"]), (where.stdout, run_env["PYTHONPATH"])
    results = []
    try:
        # ls over N stores
        make_stores(args.stores)
        out = subprocess.run(featstore + ["ls"], env=env, check=True, capture_output=True, text=True).stdout
        assert len(out.strip().splitlines()) == args.stores + 1, out[:500]
        results.append({"case": "python -c pass (baseline)", **timed(in_fresh_process([py, "-c", "pass"], env), args.repeats)})
        for name, run_env in checkouts:
            results.append(
                {
                    "case": f"featstore ls, {args.stores} stores{name}",
                    **timed(in_fresh_process(featstore + ["ls"], run_env), args.repeats),
                    "target": "< 1 s",
                }
            )

        # lookup of one of them by model and dataset
        from featstore.home import default_store_path

        model = f"model{args.stores // 2}"
        lookup = [py, "-c", f"from featstore.cache import lookup; print(lookup({model!r}, 'digits'))"]
        for _, run_env in checkouts:
            found = subprocess.run(lookup, env=run_env, check=True, capture_output=True, text=True).stdout.strip()
            assert found == str(default_store_path("digits", model, store_key(args.stores // 2))), found
        results.append(
            {
                "case": "python -c 'import featstore.cache' (baseline)",
                **timed(in_fresh_process([py, "-c", "import featstore.cache"], env), args.repeats),
            }
        )
        for name, run_env in checkouts:
            results.append(
                {"case": f"featstore.cache.lookup, {args.stores} stores{name}", **timed(in_fresh_process(lookup, run_env), args.repeats)}
            )

        # up-to-date extract
        cmd = featstore + [
            "extract",
            "--model",
            "resnet18",
            "--random-init",
            "--dataset",
            "digits",
            "--image-size",
            "32",
            "--resize",
            "32",
            "--loader",
            "torch",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--no-progress",
        ]
        subprocess.run(cmd, env=env, check=True, capture_output=True)  # fills the cache (digits, the store, the memo)
        check = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        assert "up to date" in check.stdout, check.stdout + check.stderr
        torch_s = timed(in_fresh_process([py, "-c", "import torch"], env), args.repeats)
        results.append({"case": "python -c 'import torch' (baseline)", **torch_s})
        up = timed(in_fresh_process(cmd, env), args.repeats)
        results.append(
            {
                "case": "featstore extract, up to date",
                **up,
                "ratio": up["seconds"] / torch_s["seconds"],
                "cpu_ratio": up["cpu_seconds"] / torch_s["cpu_seconds"],
                "target": "< 2x import torch",
            }
        )

        # export to HDF5
        nbytes = make_big_store(work / "big.zarr", args.rows)
        x = np.random.default_rng(1).standard_normal((args.rows, DIM), dtype=np.float32).astype(np.float16)  # no float64 temporary
        from featstore.store.export import export

        def write_raw():
            with open(work / "raw.bin", "wb") as f:
                x.tofile(f)
                f.flush()
                os.fsync(f.fileno())

        def write_h5():
            (work / "x.h5").unlink(missing_ok=True)
            export(str(work / "big.zarr"), str(work / "x.h5"))
            with open(work / "x.h5", "rb+") as f:
                os.fsync(f.fileno())

        for case, fn, target in (
            (f"ndarray.tofile + fsync, {nbytes / MB:.0f} MB (baseline)", write_raw, None),
            (f"featstore export --to x.h5, {nbytes / MB:.0f} MB", write_h5, ">= 200 MB/s"),
        ):
            t = timed(fn, args.repeats)
            results.append({"case": case, **t, "mb_per_s": nbytes / MB / t["seconds"], "target": target})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(table(results, [("case", "case", ""), ("seconds", "wall s", ".3f"), ("cpu_seconds", "CPU s", ".3f"),
                          ("ratio", "wall x base", ".2f"), ("cpu_ratio", "CPU x base", ".2f"), ("mb_per_s", "MB/s", ".0f"),
                          ("target", "target", "")]))  # fmt: skip
    print(f"load average at the end: {os.getloadavg()}")
    write_json(args.out, {"machine": machine(), "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
