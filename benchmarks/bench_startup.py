"""Command-line start-up: wall time of `featstore --help`, `extract --help`, `info` and an up-to-date
`extract`, this checkout against a baseline checkout, interleaved round by round. Also what the
loaders' container checks cost per file next to decoding it.

    .venv/bin/python benchmarks/bench_startup.py --baseline /path/to/other/checkout --rounds 5
    .venv/bin/python benchmarks/bench_startup.py --rounds 0          # only the per-photo check costs

Each command runs as its own process (as a user runs it); the best and the median round are
reported (other processes only ever slow a run down). Start-up is dominated by imports, so the
machine's load shows in every number: compare the two columns of one run, not runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import IMAGENETTE, OUT_DIR, REPO, fail, machine, table, write_json

MAIN = "from featstore.cli import main; main()"  # what the `featstore` console script runs


def _time(checkout: Path, args: list[str], cwd: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS="1")
    start = time.perf_counter()
    # cwd outside both checkouts: `python -c` puts the cwd first on sys.path, before PYTHONPATH
    run = subprocess.run([sys.executable, "-c", MAIN, *args], env=env, capture_output=True, text=True, cwd=cwd)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        fail(f"{' '.join(args)} failed in {checkout}: {run.stderr.strip()[-500:]}")
    return seconds


def startup(baseline: Path, rounds: int, work: Path) -> list[dict]:
    store = work / "digits.zarr"
    extract = [
        "extract",
        "--model",
        "resnet18",
        "--random-init",
        "--dataset",
        "digits",
        "--out",
        str(store),
        "--image-size",
        "16",
        "--resize",
        "16",
        "--loader",
        "torch",
        "--no-progress",
    ]
    _time(REPO, extract, work)  # the store both checkouts then find up to date (same cache key)
    commands = {
        "featstore --help": ["--help"],
        "featstore extract --help": ["extract", "--help"],
        "featstore info STORE": ["info", str(store)],
        "featstore extract … (up to date)": extract,
    }
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for name, args in commands.items():
            for label, checkout in (("baseline", baseline), ("this checkout", REPO)):
                times.setdefault((name, label), []).append(_time(checkout, args, work))
    rows = []
    for name in commands:
        base, ours = times[(name, "baseline")], times[(name, "this checkout")]
        rows.append(
            {
                "command": name,
                "baseline_best": min(base),
                "baseline_median": statistics.median(base),
                "ours_best": min(ours),
                "ours_median": statistics.median(ours),
                "speedup": statistics.median(base) / statistics.median(ours),
            }
        )
    return rows


def checks(limit: int) -> dict:
    """Microseconds per real photo: reading + container check, nvImageCodec's header parse, PIL's full decode."""
    os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")
    sys.path.insert(0, str(REPO))
    from featstore.loaders.containers import container_problem
    from featstore.loaders.dali import _nvimgcodec_parses
    from featstore.loaders.decode import decode_rgb

    if not IMAGENETTE.is_dir():
        fail(f"{IMAGENETTE} not found")
    blobs = [p.read_bytes() for p in sorted(IMAGENETTE.rglob("*.JPEG"))[:limit]]

    def per_file(fn) -> float:
        start = time.perf_counter()
        for b in blobs:
            fn(b)
        return (time.perf_counter() - start) / len(blobs) * 1e6

    return {
        "files": len(blobs),
        "mean_kb": sum(map(len, blobs)) / len(blobs) / 1e3,
        "container_check_us": per_file(container_problem),
        "nvimgcodec_parse_us": per_file(_nvimgcodec_parses),
        "pil_decode_us": per_file(decode_rgb),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, default=REPO, help="another checkout of featstore (e.g. before the change)")
    parser.add_argument("--rounds", type=int, default=5, help="0: only the per-photo check costs")
    parser.add_argument("--check-files", type=int, default=2000, help="photos for the container-check costs (0: skip)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    info = machine()
    rows = []
    if args.rounds:
        with tempfile.TemporaryDirectory() as work:
            os.environ["FEATSTORE_HOME"] = str(
                Path(work) / "cache"
            )  # never the developer's own home (FEATSTORE_HOME wins over FEATSTORE_CACHE)
            rows = startup(args.baseline.resolve(), args.rounds, Path(work))
    print(f"{info['date']}  {info['host_cpu']}  load {info['load_average']}  git {info['git']}")
    if rows:
        print(
            table(
                rows,
                [
                    ("command", "command", "s"),
                    ("baseline_best", "baseline best s", ".2f"),
                    ("baseline_median", "median", ".2f"),
                    ("ours_best", "ours best s", ".2f"),
                    ("ours_median", "median", ".2f"),
                    ("speedup", "median speedup", ".1f"),
                ],
            )
        )
    result = {"machine": info, "baseline": str(args.baseline), "rounds": args.rounds, "startup": rows}
    if args.check_files:
        result["checks"] = c = checks(args.check_files)
        print(
            f"\nper photo ({c['files']} Imagenette JPEGs, {c['mean_kb']:.1f} KB mean): container check "
            f"{c['container_check_us']:.0f} µs, nvImageCodec header parse {c['nvimgcodec_parse_us']:.1f} µs, "
            f"PIL full decode {c['pil_decode_us']:.0f} µs"
        )
    out = args.out or OUT_DIR / f"bench_startup-{time.strftime('%Y%m%d-%H%M%S')}.json"
    print(f"wrote {write_json(out, result)}")


if __name__ == "__main__":
    main()
