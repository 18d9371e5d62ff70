"""Benchmark (issue 26): reading images from WebDataset tar shards against the same images as files.

The same N JPEGs are written twice into one temporary folder (same filesystem): as an ImageFolder
tree and as shards of ``--per-shard`` samples (``<key>.jpg`` + ``<key>.cls``). Every file is read
once before timing (a warm page cache for both). Then, per round, interleaved (files, shards, files,
…; the best round and the median of each are reported: other jobs' load only ever slows a run down, and
on a shared machine it moves the best round too):

  manifest  building the dataset's manifest (folder walk / shard listing; the listing uncached, as a
            first run does; the cached listing is reported apart)
  checks    the file checks of every row (``verdicts.check_files``, uncached: a first run's cost)
  read      every row's bytes, one after another on this thread (files: ``open`` + ``read``;
            shards: ``members.read_member``, a positioned read from a descriptor kept open)
  torch     the torch loader over every row (``make_loader``, as extract builds it: decode, resize,
            crop, normalize, batches of 64, ``--workers`` worker processes), images/s
  dali      DALI's CPU pipeline the same way (``fn.readers.file`` / ``fn.readers.webdataset``)

after one untimed warm-up pass of each (imports, the first worker starts), and the ratio shards/files of each (the target is >= 1.0 for reading: shards no slower than files).
CPU seconds per 1,000 images (this process and its finished children) are reported beside the wall
rates: on a shared machine they move less with other jobs' load than wall time does.

    .venv/bin/python benchmarks/bench_wds.py --limit 2000 --rounds 3
    .venv/bin/python benchmarks/bench_wds.py --limit 256 --rounds 1 --loaders torch   # quick
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import IMAGENETTE, OUT_DIR, machine, table, write_json


def _cpu() -> float:
    self, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return self.ru_utime + self.ru_stime + children.ru_utime + children.ru_stime


def _images(limit: int) -> tuple[list[bytes], list[int], str]:
    """``limit`` JPEGs evenly spaced over Imagenette's sorted train listing (every class), else made from the shipped photos."""
    train = IMAGENETTE / "train"
    if train.is_dir():
        classes = sorted(p.name for p in train.iterdir() if p.is_dir())
        files = [(k, f) for k, c in enumerate(classes) for f in sorted((train / c).iterdir())]
        step = max(1, len(files) // limit)
        chosen = files[::step][:limit]
        return [f.read_bytes() for _, f in chosen], [k for k, _ in chosen], f"imagenette train ({len(chosen)} of {len(files)})"
    from tests.photos import photo_jpegs

    data = photo_jpegs(limit)
    return data, [i % 10 for i in range(limit)], f"crops of tests/data/photos ({limit}; imagenette absent)"


def _write(root: Path, data: list[bytes], labels: list[int], per_shard: int) -> tuple[Path, str]:
    folder = root / "folder"
    for i, (d, k) in enumerate(zip(data, labels)):
        (folder / f"c{k:02d}").mkdir(parents=True, exist_ok=True)
        (folder / f"c{k:02d}" / f"{i:06d}.jpg").write_bytes(d)
    shards = root / "shards"
    shards.mkdir()
    n = 0
    for s in range(0, len(data), per_shard):
        with tarfile.open(shards / f"train-{n:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s, min(s + per_shard, len(data))):
                for ext, payload in (("jpg", data[i]), ("cls", str(labels[i]).encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        n += 1
    return folder, f"wds:{shards}/train-{{000000..{n - 1:06d}}}.tar"


def _warm(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            p.read_bytes()


def _measure(kind: str, spec: str, loaders: list[str], workers: int, home: Path) -> dict:
    import numpy as np
    import torch

    from featstore.datasets import resolve_dataset
    from featstore.loaders import make_loader
    from featstore.loaders.members import check_member_chunk, read_member
    from featstore.loaders.verdicts import check_files
    from featstore.preprocess import Preprocess

    out: dict = {"kind": kind}
    shutil.rmtree(home / "shards", ignore_errors=True)  # the listing uncached, as on a first run
    t = time.perf_counter()
    manifest = resolve_dataset(spec)
    out["manifest_s"] = time.perf_counter() - t
    if kind == "shards":
        t = time.perf_counter()
        resolve_dataset(spec)
        out["manifest_cached_s"] = time.perf_counter() - t
    split = next(iter(manifest.splits))
    paths = manifest.sources(split)
    n = len(paths)
    chunk = check_member_chunk if kind == "shards" else None
    t = time.perf_counter()
    verdicts, _ = check_files(paths, range(n), None, max(workers, 1), chunk=chunk)
    out["checks_img_s"] = n / (time.perf_counter() - t)

    t, c = time.perf_counter(), _cpu()
    total = 0
    for p in paths:
        if kind == "shards":
            data, _ = read_member(p)
        else:
            with open(p, "rb") as f:
                data = f.read()
        total += len(data or b"")
    seconds = time.perf_counter() - t
    out.update(read_img_s=n / seconds, read_mb_s=total / seconds / 1e6, read_cpu_ms_per_kimg=(_cpu() - c) / n * 1e6)

    pre = Preprocess(image_size=224, resize=256, interpolation="bilinear")
    plan = [np.arange(s, min(s + 64, n), dtype=np.int64) for s in range(0, n, 64)]
    for name in loaders:
        loader = make_loader(name, pre, torch.device("cpu"), workers, shards=kind == "shards")
        t, c = time.perf_counter(), _cpu()
        rows = invalid = 0
        for batch in loader.batches(paths, plan, verdicts):
            rows += len(batch.rows)
            invalid += len(batch.errors)
        seconds = time.perf_counter() - t
        assert rows == n and invalid == 0, (name, rows, invalid)
        out[f"{name}_img_s"] = n / seconds
        out[f"{name}_cpu_ms_per_img"] = (_cpu() - c) / n * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=2000, help="images")
    parser.add_argument("--per-shard", type=int, default=500, help="samples per shard")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--loaders", default="torch,dali")
    parser.add_argument("--json", default=str(OUT_DIR / "bench_wds.json"))
    args = parser.parse_args()
    loaders = [x for x in args.loaders.split(",") if x]
    if "dali" in loaders:
        from featstore.loaders import dali_available

        if not dali_available():
            loaders.remove("dali")
            print("DALI not importable: torch only", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="bench-wds-") as tmp:
        root = Path(tmp)
        os.environ["FEATSTORE_HOME"] = str(root / "home")  # listing and check caches of this run only
        data, labels, source = _images(args.limit)
        folder, spec = _write(root, data, labels, args.per_shard)
        _warm(root)
        for kind, s in (("files", str(folder)), ("shards", spec)):  # warm-up, not reported: imports, first worker starts
            _measure(kind, s, loaders, args.workers, root / "home")
        rounds: list[dict] = []
        for r in range(args.rounds):
            for kind, s in (("files", str(folder)), ("shards", spec)) if r % 2 == 0 else (("shards", spec), ("files", str(folder))):
                m = _measure(kind, s, loaders, args.workers, root / "home")
                m["round"] = r
                rounds.append(m)
                print(f"round {r} {kind}: " + ", ".join(f"{k} {v:.3g}" for k, v in m.items() if isinstance(v, float)), file=sys.stderr)

    rate_keys = ["checks_img_s", "read_img_s", "read_mb_s"] + [f"{x}_img_s" for x in loaders]
    names = {
        "manifest_s": "manifest (s, uncached listing)",
        "checks_img_s": "file checks (img/s)",
        "read_img_s": "read bytes (img/s)",
        "read_mb_s": "read bytes (MB/s)",
        "read_cpu_ms_per_kimg": "read CPU (ms / 1k img)",
        **{f"{x}_img_s": f"{x} loader (img/s)" for x in loaders},
        **{f"{x}_cpu_ms_per_img": f"{x} loader CPU (ms / img)" for x in loaders},
    }
    best: dict[str, dict] = {}
    median: dict[str, dict] = {}
    for kind in ("files", "shards"):
        mine = [m for m in rounds if m["kind"] == kind]
        # the best round of each: a rate's highest, a time's or a cost's lowest
        best[kind] = {k: (max if k in rate_keys else min)(m[k] for m in mine) for k in names}
        median[kind] = {k: statistics.median(m[k] for m in mine) for k in names}
    rows = []
    for key, label in names.items():
        row = {"what": label}
        for stat, values in (("best", best), ("median", median)):
            f, s = values["files"][key], values["shards"][key]
            row[f"files_{stat}"], row[f"shards_{stat}"] = f, s
            row[f"ratio_{stat}"] = (s / f if key in rate_keys else f / s) if f and s else None  # > 1: shards better
        rows.append(row)
    print(f"\n{len(data)} images ({source}), {args.per_shard} per shard, {args.rounds} rounds (best and median), {args.workers} workers")
    columns = [("what", "measure", "")]
    for stat in ("best", "median"):
        columns += [
            (f"files_{stat}", f"files {stat}", ".4g"),
            (f"shards_{stat}", f"shards {stat}", ".4g"),
            (f"ratio_{stat}", "shards/files", ".2f"),
        ]
    print(table(rows, columns))
    cached = statistics.median(m["manifest_cached_s"] for m in rounds if m["kind"] == "shards")
    print(f"manifest of the shards with their listings cached: {cached:.3f} s (median)")
    path = write_json(
        args.json,
        {"machine": machine(), "images": len(data), "source": source, "args": vars(args), "rounds": rounds, "best": best, "median": median},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
