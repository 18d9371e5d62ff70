"""Where the time of a GPU extraction goes: one ``featstore.extraction.extract()`` under torch.profiler.

    python3 benchmarks/gpu/profile_extract.py --loader nvjpeg,dali --model resnet50 --limit 4096 --out $OUT

For each loader: a warm-up extract (cudnn plans, DALI's pipeline, the decoders' buffers), then one
profiled extract over ``--limit`` images of the upscaled (500×375) set. Printed per loader: the wall
time; the GPU's busy time (the union of every kernel, copy and memset interval) as a share of the
wall time, and busy time per CUDA stream; the kernels that take the most GPU time; and the host
threads' time blocked in CUDA synchronization calls. The Chrome trace is written gzipped to
``--out`` (open it in https://ui.perfetto.dev). The question it answers: is the end-to-end rate
bound by the GPU (busy ≈ wall: decode kernels and the model share the SMs, and only a cheaper
decode helps) or by the host (the GPU idles while a thread waits)?
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_extract import bench_folder, select_images, upscaled_images, warm_checks

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
# calls that block the calling host thread until GPU work is done (cudaMalloc/cudaFree synchronize the device)
SYNC_CALLS = {
    "cudaEventSynchronize",
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaMemcpy",
    "cudaMemcpy2D",
    "cudaMalloc",
    "cudaFree",
    "cudaHostAlloc",
    "cudaFreeHost",
    "cuEventSynchronize",
    "cuStreamSynchronize",
    "cuCtxSynchronize",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
}


def extract_once(model: str, folder: Path, loader: str, store: Path, device: str, batch_size: int, workers: int) -> float:
    from featstore.extraction import ExtractConfig, extract

    config = ExtractConfig(
        model=model,
        dataset=str(folder),
        out=str(store),
        random_init=True,
        loader=loader,
        device=device,
        batch_size=batch_size,
        workers=workers,
        overwrite=True,
    )
    t0 = time.perf_counter()
    extract(config, log=lambda s: None, progress=False)
    return time.perf_counter() - t0


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def summarize(trace_path: Path, wall_s: float, top: int = 15) -> dict:
    """GPU busy (union and per stream), top kernels and host sync time, from the Chrome trace (µs)."""
    events = json.loads(trace_path.read_text())["traceEvents"]
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES]
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in gpu]
    window = (min(a for a, _ in spans), max(b for _, b in spans)) if spans else (0.0, 0.0)
    per_stream: dict[str, list] = defaultdict(list)
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in gpu:
        per_stream[str(e.get("tid"))].append((e["ts"], e["ts"] + e["dur"]))
        k = kernels[e["name"][:90]]
        k[0] += e["dur"]
        k[1] += 1
    sync: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver") and e["name"] in SYNC_CALLS:
            sync[f"{e['name']} (thread {e.get('tid')})"] += e["dur"]
    busy = union_length(spans)
    return {
        "wall_s": wall_s,
        "gpu_window_s": (window[1] - window[0]) / 1e6,
        "gpu_busy_s": busy / 1e6,
        "streams": {
            s: {"busy_s": union_length(v) / 1e6, "events": len(v)}
            for s, v in sorted(per_stream.items(), key=lambda kv: -union_length(kv[1]))
        },
        "kernels": [{"name": n, "s": t / 1e6, "calls": c} for n, (t, c) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]],
        "host_sync": {k: v / 1e6 for k, v in sorted(sync.items(), key=lambda kv: -kv[1])[:8]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loader", default="nvjpeg")
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--limit", type=int, default=4096)
    ap.add_argument("--images", default="../shared/data/imagenette")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(args.images)
    images = upscaled_images(select_images(root, args.limit), root, args.workers)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if args.device == "cuda" else [])
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = bench_folder(images, tmp / "images")
        warm = bench_folder(images[: 2 * args.batch_size], tmp / "warm")
        for f in (folder, warm):  # the file checks run once per file, before extracting: not profiled
            warm_checks(f)
        for loader in args.loader.split(","):
            # one loader failing (DALI on a new driver, say) must not cost the others' profiles: its
            # error is its entry, and the JSON is rewritten after every loader
            try:
                extract_once(args.model, warm, loader, tmp / "warm.zarr", args.device, args.batch_size, args.workers)
                with torch.profiler.profile(activities=activities) as prof:
                    wall = extract_once(args.model, folder, loader, tmp / "store.zarr", args.device, args.batch_size, args.workers)
            except Exception as e:
                report[loader] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
                print(f"\n== {args.model} / {loader}: FAILED: {report[loader]['error']}", flush=True)
                (out / f"profile-{args.model}.json").write_text(json.dumps(report, indent=1))
                continue
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
            trace = tmp / f"trace-{loader}.json"
            prof.export_chrome_trace(str(trace))
            summary = summarize(trace, wall)
            report[loader] = summary
            with open(trace, "rb") as src, gzip.open(out / f"trace-{args.model}-{loader}.json.gz", "wb", compresslevel=6) as dst:
                shutil.copyfileobj(src, dst)
            print(
                f"\n== {args.model} / {loader}: {len(images)} upscaled images in {wall:.2f} s under the profiler "
                f"({len(images) / wall:.0f} img/s)"
            )
            print(
                f"GPU busy {summary['gpu_busy_s']:.2f} s of {wall:.2f} s wall ({summary['gpu_busy_s'] / wall:.0%}); "
                f"first to last GPU event {summary['gpu_window_s']:.2f} s"
            )
            for stream, s in summary["streams"].items():
                print(f"  stream {stream}: busy {s['busy_s']:.3f} s over {s['events']} events")
            print("top GPU work (s, calls):")
            for k in summary["kernels"]:
                print(f"  {k['s']:8.3f} {k['calls']:6d}  {k['name']}")
            print("host time blocked in CUDA sync calls (s):")
            for k, v in summary["host_sync"].items():
                print(f"  {v:8.3f}  {k}")
            (out / f"profile-{args.model}.json").write_text(json.dumps(report, indent=1))
    (out / f"profile-{args.model}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
