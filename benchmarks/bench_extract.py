"""Benchmark: feature extraction from a folder of JPEGs, every stage and the baseline in one run.

For each model × image set × loader:

  decode     the featstore loader alone over the images (decode, resize, crop, normalize, onto the
             device): images/s with no model
  inference  the featstore encoder alone on pre-made batches already on the device (two batches
             the loader just made, reused; channels_last; fp32 on CPU, bf16 autocast on CUDA, exactly
             as extract does: featstore.inference.BatchEncoder, or extract._encode in older
             trees), as many images as the set: images/s
  e2e        featstore.extraction.extract() into a fresh temp store: images/s over the whole call
             (model build, worker start, decode, inference, store writes, finalize)
  e2e/min    e2e / min(decode, inference): 1.0 means the stages overlap perfectly
  baseline   the textbook loop on the same images, workers and device: torchvision ImageFolder +
             PIL transforms + DataLoader, the fp32 NCHW model under no_grad, features appended to a
             list and saved with np.save (timed from model build to the saved file, like e2e)
  write      the store alone: the features of the e2e run written again through FeatureStore
             create + write_unit + finalize (ms per image, part of the stage breakdown)

With ``--rounds N`` all of a set's measurements are repeated N times, interleaved, and the best
round of each is reported (other processes' load only ever slows a run down); JSON keeps them all.

Image sets: ``224`` = the 224×224 Imagenette JPEGs as they are; ``upscaled`` = the same images
resized (non-uniformly, bicubic) to 500×375 and saved at JPEG quality 90 — ImageNet-sized files for
the decoder — built once into ~/.cache/featstore/bench/. ``--limit`` images are taken evenly spaced
from the sorted train/ listing (every class), cycling when more rows than images are asked for.
Every file is read once before timing, so all measurements see a warm page cache.

``--rss-rows 13394,133940`` adds a memory check: ``featstore extract`` (resnet18, 32-px crop) in a
subprocess per size over a CSV listing the Imagenette images repeated to that many rows, reporting
the main process's peak RSS (ru_maxrss) and the peak PSS of its whole process tree (workers included).

    .venv/bin/python benchmarks/bench_extract.py --model resnet18 --set 224,upscaled --limit 512
    .venv/bin/python benchmarks/bench_extract.py --model resnet18 --limit 64 --rss-rows 2000   # quick
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import IMAGENETTE, OUT_DIR, fail, machine, matmul_rate, sync, table, write_json

SETS = ("224", "upscaled")
UPSCALED = (500, 375)  # width × height of a typical ImageNet landscape photo
JPEG_QUALITY = 90
JPEG_SUFFIXES = {".jpg", ".jpeg"}


# ---------------------------------------------------------------- images


def jpegs_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in JPEG_SUFFIXES)


def select_images(root: Path, limit: int) -> list[Path]:
    """``limit`` images evenly spaced over the sorted listing (all classes), cycling past its end."""
    files = jpegs_under(root / "train" if (root / "train").is_dir() else root)
    if not files:
        fail(f"no JPEG files under {root}")
    if limit <= len(files):
        return [files[i] for i in (np.arange(limit) * len(files)) // limit]
    return [files[i % len(files)] for i in range(limit)]


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "featstore" / "bench"


def _upscale(job: tuple[Path, Path]) -> None:
    from PIL import Image

    src, dst = job
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    with Image.open(src) as im:
        im.convert("RGB").resize(UPSCALED, Image.BICUBIC).save(tmp, format="JPEG", quality=JPEG_QUALITY)
    os.replace(tmp, dst)  # a killed build never leaves a truncated file in the cache


def upscaled_images(images: list[Path], root: Path, workers: int) -> list[Path]:
    """The upscaled copy of each image (same relative path under the cache), built where missing."""
    cache = cache_root() / f"{root.resolve().name}-{UPSCALED[0]}x{UPSCALED[1]}-q{JPEG_QUALITY}"
    out = [cache / p.relative_to(root) for p in images]
    todo = sorted({(s, d) for s, d in zip(images, out) if not d.is_file()})
    if todo:
        print(f"building {len(todo)} upscaled JPEGs in {cache} ...", flush=True)
        with Pool(max(1, workers)) as pool:
            for _ in pool.imap_unordered(_upscale, todo, chunksize=16):
                pass
    return out


def bench_folder(images: list[Path], dest: Path) -> Path:
    """An ImageFolder tree of symlinks (class = the source's folder): the dataset every method reads."""
    for i, src in enumerate(images):
        link = dest / src.parent.name / f"{i:06d}_{src.name}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(src.resolve())
    for src in set(images):
        src.read_bytes()  # warm the page cache for every method alike
    return dest


# ---------------------------------------------------------------- measurements


def plan(n: int, batch_size: int) -> list[np.ndarray]:
    return [np.arange(s, min(s + batch_size, n), dtype=np.int64) for s in range(0, n, batch_size)]


def file_verdicts(paths: list[str]):
    """The file checks' verdicts (featstore versions since issue 22 check each file once, before
    extracting: decode-only is then measured without them, as extract runs it); None before."""
    try:
        from featstore.loaders.verdicts import check_files
    except ImportError:
        return None
    verdicts, _ = check_files(paths, range(len(paths)), None, os.cpu_count() or 1)
    return verdicts


def warm_checks(folder: Path) -> float | None:
    """Check a bench folder's files into the cache extract reads (so that every timed extract finds
    them checked, as a rerun does); the check's rate in files/s, None before issue 22."""
    try:
        from featstore.datasets import resolve_dataset
        from featstore.loaders.verdicts import cache_path, check_files
    except ImportError:
        return None
    manifest = resolve_dataset(str(folder))
    paths = [p for s in manifest.splits for p in manifest.absolute_paths(s)]
    _, report = check_files(paths, range(len(paths)), cache_path(manifest.name, manifest.root), os.cpu_count() or 1)
    return report.rate


def measure_decode(loader, paths: list[str], batch_size: int, device: torch.device) -> tuple[float, list[torch.Tensor]]:
    """images/s of the loader alone, steady: timed from its first batch on, so that what every call
    pays once (DALI builds its pipeline, workers start) is left out as the steady e2e rate leaves it
    out; also returns two decoded batches to feed inference."""
    verdicts = file_verdicts(paths)
    extra = () if verdicts is None else (verdicts,)
    for _ in loader.batches(paths, plan(min(len(paths), 2 * batch_size), batch_size), *extra):
        pass  # warm-up: worker start, first decodes
    kept: list[torch.Tensor] = []
    t0, timed = 0.0, 0
    for i, batch in enumerate(loader.batches(paths, plan(len(paths), batch_size), *extra)):
        if len(kept) < 2 and len(batch.rows) == batch_size:
            kept.append(batch.images.clone())
        if i == 0:
            sync(device)
            t0 = time.perf_counter()
        else:
            timed += len(batch.rows)
    sync(device)
    if not timed:  # one batch in all: nothing after the start-up to time
        raise RuntimeError(f"decode-only needs more than one batch ({len(paths)} images, batch {batch_size}): raise --limit")
    return timed / (time.perf_counter() - t0), kept


def tune_dali(args, model: str, images: list[Path], device: torch.device) -> list[dict]:
    """Decode-only images/s of the DALI loader over hardware-decoder shares × CPU threads (CUDA only),
    then the best of those without fancy upsampling (what matching the CPU decoders costs)."""
    from featstore.loaders.dali import DaliLoader
    from featstore.models.encoders import resolve_encoder

    pre = resolve_encoder(model, random_init=True).preprocess
    paths = [str(p) for p in images]
    cpus = os.cpu_count() or 1
    rows = []
    for threads in sorted({max(1, cpus // 4), max(1, cpus // 2), cpus}):
        for load in (0.0, 0.5, 0.65, 0.8, 1.0):
            loader = DaliLoader(pre, device, threads)
            loader.hw_decoder_load = load
            rate, _ = measure_decode(loader, paths, args.batch_size, device)
            rows.append(dict(threads=threads, hw_decoder_load=load, fancy_upsampling=True, decode=rate))
            print(f"dali tune: {threads} threads, hw_decoder_load {load}: {rate:.1f} img/s", flush=True)
    best = max(rows, key=lambda r: r["decode"])
    loader = DaliLoader(pre, device, best["threads"])
    loader.hw_decoder_load, loader.jpeg_fancy_upsampling = best["hw_decoder_load"], False
    rate, _ = measure_decode(loader, paths, args.batch_size, device)
    rows.append(dict(best, fancy_upsampling=False, decode=rate))
    print(f"dali tune: best setting without fancy upsampling: {rate:.1f} img/s", flush=True)
    return rows


def encoder_runner(encoder, views: dict[str, int], device: torch.device, batch_size: int):
    """What extract runs per batch: a BatchEncoder (on CUDA it captures its graph on the first batch),
    or None in trees before featstore.inference."""
    try:
        from featstore.inference import BatchEncoder
    except ImportError:
        return None
    return BatchEncoder(encoder, views, device, batch_size)


def run_encoder(runner, encoder, views: dict[str, int], device: torch.device, batches: list[torch.Tensor], steps: int) -> None:
    """``steps`` batches through ``runner`` (:func:`encoder_runner`), features ending on the host."""
    if runner is None:  # featstore before featstore.inference: extract called extract._encode per batch
        from featstore.extract import _encode  # the module's name in those versions

        for i in range(steps):
            _encode(encoder, batches[i % len(batches)], views, device)
        return
    for i in range(steps):
        runner.submit(i, batches[i % len(batches)])
        for _ in runner.ready():
            pass
    for _ in runner.ready(drain=True):
        pass


def measure_inference(encoder, spec, batches: list[torch.Tensor], n: int, device: torch.device) -> float:
    from featstore.models.encoders import feature_dims

    views = feature_dims(encoder, spec.preprocess, device)  # every view, as extract computes by default
    # one runner for the warm-up and the timing: a second would capture its CUDA graph again inside the window
    runner = encoder_runner(encoder, views, device, len(batches[0]))
    run_encoder(runner, encoder, views, device, batches, 3)  # warm-up (graph capture, cudnn autotuning, allocator, pinned buffers)
    sync(device)
    steps = -(-n // len(batches[0]))
    t0 = time.perf_counter()
    run_encoder(runner, encoder, views, device, batches, steps)
    sync(device)
    return steps * len(batches[0]) / (time.perf_counter() - t0)


def model_flops(encoder, spec, device: torch.device) -> float:
    """FLOPs of one image's forward pass (every view: extract computes them all in one pass)."""
    from torch.utils.flop_counter import FlopCounterMode

    size = spec.preprocess.image_size
    x = torch.zeros(1, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        encoder(x)
    return float(counter.get_total_flops())


def measure_e2e(args, model: str, folder: Path, loader: str, store: Path, notes: list[str]) -> float:
    """Seconds of one extract() call into a new store; its log lines are appended to ``notes`` (a
    CUDA graph given up for the eager forward says so there)."""
    from featstore.extraction import ExtractConfig, extract

    config = ExtractConfig(
        model=model,
        dataset=str(folder),
        out=str(store),
        random_init=True,
        loader=loader,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        overwrite=True,
    )
    t0 = time.perf_counter()
    result = extract(config, log=notes.append, progress=False)
    seconds = time.perf_counter() - t0
    if result.invalid:
        raise RuntimeError(f"{result.invalid} images could not be decoded in {folder}")
    return seconds


def measure_store_write(store_path: Path, scratch: Path) -> float:
    """Seconds to write the e2e store's features again, through the same store API extract uses."""
    from featstore.store import FeatureStore

    src = FeatureStore.open(store_path)
    splits = {s: (list(src.paths(s)), src.labels(s)) for s in src.splits}
    feats = {s: {v: src.features(s, v) for v in src.views} for s in src.splits}
    t0 = time.perf_counter()
    dst = FeatureStore.create(scratch, splits=splits, views=src.views, dtype=src.attrs["dtype"], chunk_rows=src.chunk_rows)
    for s in dst.splits:
        for unit in dst.units(s):
            dst.write_unit(unit, {v: f[unit.start : unit.stop] for v, f in feats[s].items()}, np.ones(unit.rows, bool))
    dst.finalize()
    seconds = time.perf_counter() - t0
    shutil.rmtree(scratch)
    return seconds


def measure_textbook(spec, folder: Path, args, device: torch.device, out: Path) -> float:
    """The loop most people write first (fp32, NCHW, no pinning, no overlap of the save)."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from featstore.models.encoders import build_encoder

    pre = spec.preprocess
    transform = transforms.Compose(
        [
            transforms.Resize(pre.resize, interpolation=getattr(transforms.InterpolationMode, pre.interpolation.upper())),
            transforms.CenterCrop(pre.image_size),
            transforms.ToTensor(),
            transforms.Normalize(pre.mean, pre.std),
        ]
    )
    t0 = time.perf_counter()
    model = build_encoder(spec).backbone.to(device).eval()  # the same network, without featstore's wrapper
    loader = DataLoader(datasets.ImageFolder(str(folder), transform=transform), batch_size=args.batch_size, num_workers=args.workers)
    features = []
    tuned, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False  # extract turned it on; the textbook loop does not
    try:
        with torch.no_grad():
            for images, _ in loader:
                features.append(model(images.to(device)).cpu().numpy())
        np.save(out, np.concatenate(features))
    finally:
        torch.backends.cudnn.benchmark = tuned
    return len(loader.dataset) / (time.perf_counter() - t0)


# ---------------------------------------------------------------- one model


def measure_loader(
    args, model: str, spec, encoder, images: list[Path], folder: Path, one_batch: Path, loader_name: str, device: torch.device, tmp: Path
) -> dict:
    """One round of decode, inference, e2e and store-write for one loader; rates in images/s.

    e2e over one batch is measured just before the full e2e: their difference is the steady rate,
    ``(n - batch) / (t_n - t_batch)``, i.e. e2e without the one-off start-up (model build, workers,
    store create and finalize), which is what a long run sees.
    """
    from featstore.loaders import make_loader

    label = f"{folder.name} / {loader_name}"
    print(f"{label}: decode, inference, end to end ...", flush=True)
    loader = make_loader(loader_name, spec.preprocess, device, args.workers)
    decode, batches = measure_decode(loader, [str(p) for p in images], args.batch_size, device)
    # next to its e2e, on this loader's own batches (dtype and layout as extract sees them)
    inference = measure_inference(encoder, spec, batches, len(images), device)
    store = tmp / f"{folder.name}-{loader_name}.zarr"
    notes: list[str] = []
    one_s = measure_e2e(args, model, one_batch, loader_name, tmp / "one-batch.zarr", [])
    e2e_s = measure_e2e(args, model, folder, loader_name, store, notes)
    eager = [n for n in notes if "CUDA graph" in n]  # a capture that failed or disagreed: the e2e ran eagerly
    e2e = len(images) / e2e_s
    # undefined with a single batch (--limit <= --batch-size) or when noise makes t_n <= t_batch
    more = len(images) - args.batch_size
    steady = more / (e2e_s - one_s) if more > 0 and e2e_s > one_s else None
    write_s = measure_store_write(store, tmp / "rewrite.zarr")
    shutil.rmtree(store)
    print(
        f"{label}: decode {decode:.1f}, inference {inference:.1f}, e2e {e2e:.1f} img/s (1 batch {one_s:.1f} s, "
        f"steady {f'{steady:.1f} img/s' if steady else 'n/a'}), write {write_s:.2f} s",
        flush=True,
    )
    if eager:
        print(f"{label}: {eager[0]}", flush=True)
    return dict(decode=decode, inference=inference, e2e=e2e, steady=steady, one_batch_s=one_s, write_s=write_s, graph_notes=eager)


def run_model(
    args, model: str, sets: dict[str, list[Path]], loaders: list[str], device: torch.device, tmp: Path, emit=lambda rows: None
) -> None:
    """Rounds interleave every method, so that load from other processes hits them alike; each
    number reported is the best round (interference only ever slows a run down). ``emit`` gets the
    rows of each set (one per loader) as soon as they are measured."""
    from featstore.models.encoders import build_encoder, resolve_encoder

    spec = resolve_encoder(model, random_init=True)
    encoder = build_encoder(spec).to(device).to(memory_format=torch.channels_last)
    flops = model_flops(encoder, spec, device)
    print(f"{model}: {flops / 1e9:.2f} GFLOP per image at {spec.preprocess.image_size} px", flush=True)
    for set_name, images in sets.items():
        folder = bench_folder(images, tmp / f"{model}-{set_name}")
        # one batch end to end: what every run pays once (model build, workers, store create/finalize)
        one_batch = bench_folder(images[: args.batch_size], tmp / f"{model}-{set_name}-1batch")
        checks_per_s = warm_checks(folder)
        warm_checks(one_batch)
        if checks_per_s:
            print(f"{model} / {set_name}: file checks {checks_per_s:.0f} files/s (once per file; every extract below finds them cached)")
        rounds: dict[str, list[dict]] = {name: [] for name in loaders}
        errors: dict[str, str] = {}
        baselines = []
        for r in range(args.rounds):
            for name in loaders:
                if name in errors:
                    continue
                try:  # one loader failing (DALI on CUDA, say) must not cost the other loaders' rows
                    rounds[name].append(measure_loader(args, model, spec, encoder, images, folder, one_batch, name, device, tmp))
                except Exception as e:
                    errors[name] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                    print(f"{model} / {set_name} / {name}: FAILED: {errors[name]}", flush=True)
            print(f"{model} / {set_name}: textbook baseline (round {r + 1}/{args.rounds}) ...", flush=True)
            baselines.append(measure_textbook(spec, folder, args, device, tmp / "baseline.npy"))
            print(f"{model} / {set_name}: textbook {baselines[-1]:.1f} img/s", flush=True)
        baseline = max(baselines)
        rows = []
        for name in loaders:
            if not rounds[name]:
                rows.append(dict(model=model, set=set_name, loader=name, images=len(images), baseline=baseline, error=errors[name]))
                continue
            best = {k: max(m[k] for m in rounds[name]) for k in ("decode", "inference", "e2e")}
            steady = max((m["steady"] for m in rounds[name] if m["steady"]), default=None)
            write_s = min(m["write_s"] for m in rounds[name])
            slower_stage = min(best["decode"], best["inference"])
            rows.append(
                dict(
                    model=model,
                    set=set_name,
                    loader=name,
                    images=len(images),
                    **best,
                    e2e_over_min=best["e2e"] / slower_stage,
                    steady=steady,
                    steady_over_min=steady / slower_stage if steady else None,
                    steady_over_inference=steady / best["inference"] if steady else None,
                    baseline=baseline,
                    e2e_over_baseline=best["e2e"] / baseline,
                    checks_per_s=checks_per_s,
                    one_batch_s=min(m["one_batch_s"] for m in rounds[name]),
                    ms_decode=1e3 / best["decode"],
                    ms_inference=1e3 / best["inference"],
                    ms_write=1e3 * write_s / len(images),
                    ms_e2e=1e3 / best["e2e"],
                    rounds=rounds[name],
                    baseline_rounds=baselines,
                    gflop_per_image=flops / 1e9,
                    infer_tflops=flops * best["inference"] / 1e12,
                    infer_of_matmul=flops * best["inference"] / args.matmul_flops,
                    e2e_of_matmul=flops * best["e2e"] / args.matmul_flops,
                )
            )
        emit(rows)
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- memory


def _tree_pss_kb(root_pid: int) -> int:
    """PSS of a process and all its descendants (PSS, not RSS: forked workers share pages)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        kids = [c for c, p in parents.items() if p == pid and c not in tree]
        tree.update(kids)
        frontier.extend(kids)
    total = 0
    for pid in tree:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def measure_rss(rows: int, sources: list[Path], args, tmp: Path) -> dict:
    import subprocess

    listing = tmp / f"rss-{rows}.csv"
    with open(listing, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for i in range(rows):
            src = sources[i % len(sources)]
            w.writerow([str(src.resolve()), src.parent.name])
    cmd = [
        sys.executable,
        "-m",
        "featstore.cli",
        "extract",
        "--model",
        "resnet18",
        "--random-init",
        "--dataset",
        str(listing),
        "--out",
        str(tmp / f"rss-{rows}.zarr"),
        "--image-size",
        "32",
        "--resize",
        "32",
        "--loader",
        args.rss_loader,
        "--device",
        "cpu",
        "--workers",
        str(args.workers),
        "--batch-size",
        "256",
        "--no-progress",
    ]
    print(f"rss {rows:,} rows: {' '.join(cmd[1:])}", flush=True)
    peak_pss, done = [0], threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def sample():
        while not done.wait(0.5):
            peak_pss[0] = max(peak_pss[0], _tree_pss_kb(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not the sum of every child
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    if os.waitstatus_to_exitcode(status) != 0:
        fail(f"featstore extract failed for {rows} rows: {proc.stderr.read().strip()[-500:]}")
    shutil.rmtree(tmp / f"rss-{rows}.zarr")
    return dict(
        rows=rows,
        seconds=seconds,
        images_per_s=rows / seconds,
        main_peak_rss_mb=usage.ru_maxrss / 1024,
        tree_peak_pss_mb=peak_pss[0] / 1024,
    )


# ---------------------------------------------------------------- main


RESULT_COLUMNS = [
    ("model", "model", "s"),
    ("set", "set", "s"),
    ("loader", "loader", "s"),
    ("images", "images", "d"),
    ("decode", "decode/s", ".1f"),
    ("inference", "infer/s", ".1f"),
    ("e2e", "e2e/s", ".1f"),
    ("e2e_over_min", "e2e/min", ".2f"),
    ("steady", "steady/s", ".1f"),
    ("steady_over_min", "steady/min", ".2f"),
    ("steady_over_inference", "steady/infer", ".2f"),
    ("baseline", "textbook/s", ".1f"),
    ("e2e_over_baseline", "e2e/textbook", ".2f"),
    ("ms_decode", "ms decode", ".2f"),
    ("ms_inference", "ms infer", ".2f"),
    ("ms_write", "ms write", ".3f"),
    ("ms_e2e", "ms e2e", ".2f"),
    ("one_batch_s", "1-batch e2e s", ".1f"),
    ("gflop_per_image", "GFLOP/img", ".2f"),
    ("infer_tflops", "infer TFLOP/s", ".3f"),
    ("infer_of_matmul", "infer/matmul", ".0%"),
    ("e2e_of_matmul", "e2e/matmul", ".0%"),
]
TUNE_COLUMNS = [
    ("threads", "threads", "d"),
    ("hw_decoder_load", "hw_decoder_load", ".2f"),
    ("fancy_upsampling", "fancy upsampling", ""),
    ("decode", "decode/s", ".1f"),
]
RSS_COLUMNS = [
    ("rows", "rows", ","),
    ("seconds", "seconds", ".0f"),
    ("images_per_s", "img/s", ".0f"),
    ("main_peak_rss_mb", "main peak RSS MB", ".0f"),
    ("tree_peak_pss_mb", "tree peak PSS MB", ".0f"),
]


def print_tables(results: list[dict], rss: list[dict]) -> None:
    for rows, columns in ((results, RESULT_COLUMNS), (rss, RSS_COLUMNS)):
        if rows:
            print()
            print(table(rows, columns))


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    ap.add_argument(
        "--model",
        default="resnet18",
        help="comma-separated: resnet18, resnet50, dino, or any featstore model name; empty: none (memory check only)",
    )
    ap.add_argument("--images", default=str(IMAGENETTE), help="folder of JPEGs (its train/ is used when present)")
    ap.add_argument("--limit", type=int, default=512, help="images per set (evenly spaced over the folder; cycles past its end)")
    ap.add_argument("--set", default="224", help="comma-separated image sets: 224, upscaled")
    ap.add_argument("--loader", default="torch", help="comma-separated featstore loaders (see featstore.loaders.LOADERS)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode workers for featstore and the baseline alike")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved repetitions of every measurement; the best is reported")
    ap.add_argument("--rss-rows", default="", help="comma-separated row counts for the memory check (e.g. 13394,133940); empty: skip")
    ap.add_argument("--rss-loader", default="torch")
    ap.add_argument(
        "--dali-tune", action="store_true", help="CUDA + DALI: also measure DALI decode over hw_decoder_load × threads on the first set"
    )
    ap.add_argument("--out", default=str(OUT_DIR / "extract.json"))
    args = ap.parse_args(argv)
    args.models = [m.strip() for m in args.model.split(",") if m.strip()]
    args.sets = [s.strip() for s in args.set.split(",") if s.strip()]
    args.loaders = [s.strip() for s in args.loader.split(",") if s.strip()]
    args.rss = [int(r) for r in args.rss_rows.split(",") if r.strip()]
    if any(s not in SETS for s in args.sets):
        ap.error(f"--set takes {', '.join(SETS)}")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.batch_size < 1 or args.workers < 0 or args.limit < args.batch_size:
        ap.error("--batch-size must be >= 1, --limit >= --batch-size (inference runs on full batches), --workers >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from featstore.device import resolve_device
    from featstore.errors import FeatstoreError
    from featstore.loaders import choose_loader

    root = Path(args.images).expanduser()
    if not root.is_dir():
        fail(
            f"image folder {root} not found; benchmarks read Imagenette from ../shared/data/imagenette "
            "(next to the repository), or pass --images FOLDER"
        )
    try:
        device = resolve_device(args.device)
        loaders = [choose_loader(name, device) for name in args.loaders]
    except FeatstoreError as e:
        fail(e.one_line())
    info = machine()
    print(
        f"{info['date']}; {info['host_cpu']}, {info['cpus']} CPUs, load {info['load_average']}; device {device}"
        f"{' (' + info['gpu'] + ')' if 'gpu' in info else ''}; batch {args.batch_size}, workers {args.workers}",
        flush=True,
    )

    if args.models:
        # the yardstick for the FLOP columns: a dense GEMM in the dtype extract computes in
        from featstore.device import compute_dtype

        args.matmul_flops = matmul_rate(device, compute_dtype(device))
        info["matmul_flops"] = args.matmul_flops
        print(f"4096³ matmul in {compute_dtype(device)}: {args.matmul_flops / 1e12:.3f} TFLOP/s", flush=True)

    originals = select_images(root, args.limit)
    # in the order asked for (run_gpu.sh measures the upscaled set, where the targets are, first)
    sets = {name: originals if name == "224" else upscaled_images(originals, root, args.workers) for name in args.sets}

    results, rss, tuning = [], [], []

    def save(partial: bool) -> Path:
        # rewritten after every set, so a run cut short (a device call's time limit) keeps what it measured
        return write_json(
            args.out,
            {
                "benchmark": "extract",
                "machine": info,
                "command": " ".join(sys.argv),
                "device": str(device),
                "batch_size": args.batch_size,
                "workers": args.workers,
                "images_root": str(root),
                "partial": partial,
                "results": results,
                "rss": rss,
                "dali_tuning": tuning,
            },
        )

    def emit(rows: list[dict]) -> None:
        results.extend(rows)
        print(table(rows, RESULT_COLUMNS), flush=True)
        save(partial=True)

    with tempfile.TemporaryDirectory(prefix="featstore-bench-extract-") as tmp:
        if args.dali_tune:
            if device.type != "cuda" or "dali" not in loaders or not args.models:
                print("dali tune: skipped (needs --device cuda, --loader with dali, and a model)", flush=True)
            else:
                tuning += tune_dali(args, args.models[0], next(iter(sets.values())), device)
                print(table(tuning, TUNE_COLUMNS), flush=True)
                save(partial=True)
        for model in args.models:
            run_model(args, model, sets, loaders, device, Path(tmp), emit)
        for rows in args.rss:
            rss.append(measure_rss(rows, jpegs_under(root), args, Path(tmp)))  # train and val: 13,394 files

    print_tables(results, rss)
    info["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"load average before {info['load_average']}, after {info['load_average_after']}")
    print(f"wrote {save(partial=False)}")


if __name__ == "__main__":
    main()
