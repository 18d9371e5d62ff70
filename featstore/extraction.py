"""Extraction: plan → load → encode → write, resumable and cached.

The plan is fixed when the store is created (manifest frozen, arrays presized, chunk-aligned units).
Batches never span units, so a unit's features depend only on the unit: a resumed run writes the
same bytes as an uninterrupted one. Decoding (loader workers / DALI threads), inference (this
thread) and writing (a writer thread, whole units) overlap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import queue
import shlex
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from .cache import find_by_key
from .datasets import BUILTIN_DATASETS, resolve_dataset
from .device import compute_dtype, resolve_device
from .errors import FeatstoreError, UsageError
from .home import default_store_path
from .inference import BatchEncoder
from .loaders import Batch, choose_loader, make_loader
from .manifest import Manifest
from .models.encoders import EncoderSpec, build_encoder, feature_dims, resolve_encoder, select_views
from .progress import Progress, log_to_stderr, resolve_mode
from .ranks import Ranks, wait_until
from .request import (
    ExtractConfig,
    ExtractResult,
    dataset_dirs,
    recall_up_to_date,
    refuse_url_out,
    remember_request,
    request_of,
    resolved_model,
    resolved_path,
)
from .store import FEATURE_DTYPES, PROGRESS, FeatureStore, Unit, is_store
from .store.lock import StoreLock


def cache_fields(spec: EncoderSpec, loader: str, views: list[str] | None, dtype: str, manifest: Manifest, device: torch.device) -> dict:
    """Everything that changes the stored numbers; two runs with equal fields give the same store."""
    return {
        # bf16 autocast on CUDA, fp32 on CPU: a store is never half one and half the other
        "compute": f"{device.type}-{'bf16' if compute_dtype(device) == torch.bfloat16 else 'fp32'}",
        "encoder": spec.name,
        "arch": spec.arch,
        "weights_sha256": spec.weights_sha256,
        "preprocessing": spec.preprocess.to_dict(),
        "loader": loader,
        "views": sorted(views) if views else "all",
        "dtype": dtype,
        "manifest_sha256": manifest.sha256,
    }


def cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _validate(config: ExtractConfig) -> None:
    refuse_url_out(config.out)
    if config.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {config.batch_size}", "e.g. --batch-size 64")
    if config.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {config.workers}", "e.g. --workers 2")
    if config.dtype not in FEATURE_DTYPES:
        raise UsageError(f"unknown --dtype {config.dtype!r}", f"use one of {', '.join(FEATURE_DTYPES)}")
    if config.chunk_rows < 1:
        raise UsageError(f"--chunk-rows must be >= 1, got {config.chunk_rows}", "e.g. --chunk-rows 8192")


def resume_command(config: ExtractConfig, loader_name: str) -> str:
    """The `featstore extract` command that resumes (or reruns) this extraction, from any folder.

    Paths are made absolute; the loader is the one chosen (``auto`` could choose another elsewhere,
    which would be another store); ``--overwrite`` is left out, since it would start over.
    """
    defaults = ExtractConfig(model="", dataset="", out="")
    dataset = config.dataset if config.dataset in BUILTIN_DATASETS else resolved_path(config.dataset)
    args = [
        "featstore",
        "extract",
        "--model",
        resolved_model(config.model),
        "--dataset",
        dataset,
        "--out",
        str(Path(cast(str, config.out)).resolve()),
        "--loader",
        loader_name,
    ]
    options: list[tuple[str, str, Callable[[Any], str]]] = [
        ("data_root", "--data-root", resolved_path),
        ("weights", "--weights", resolved_path),
        ("views", "--views", ",".join),
        ("device", "--device", str),
        ("batch_size", "--batch-size", str),
        ("workers", "--workers", str),
        ("dtype", "--dtype", str),
        ("chunk_rows", "--chunk-rows", str),
        ("image_size", "--image-size", str),
        ("resize", "--resize", str),
        ("interpolation", "--interpolation", str),
        ("mean", "--mean", lambda v: ",".join(map(str, v))),
        ("std", "--std", lambda v: ",".join(map(str, v))),
    ]
    for name, flag, text in options:
        value = getattr(config, name)
        if value is not None and value != getattr(defaults, name):
            args += [flag, text(value)]
    for name, flag in (
        ("random_init", "--random-init"),
        ("trust_checkpoint", "--trust-checkpoint"),
        ("strict", "--strict"),
        ("compile", "--compile"),
    ):
        if getattr(config, name):
            args.append(flag)
    return shlex.join(args)


def extract(
    config: ExtractConfig, log: Callable[[str], None] = log_to_stderr, progress: bool | str = True, *, recalled: bool = False
) -> ExtractResult:
    """Run (or resume, or skip as up to date) one extraction. Raises FeatstoreError on user mistakes.

    ``progress``: True/"auto" shows a bar when stderr is a terminal and otherwise logs a line every
    FEATSTORE_PROGRESS_SECONDS (30); "bar", "lines" or False/"off" force one.
    ``recalled``: the caller already asked :func:`recall_up_to_date` and got None (the CLI asks it
    before importing torch), so the memo is not read a second time.
    """
    start = time.perf_counter()
    _validate(config)
    if not recalled and (result := recall_up_to_date(config)) is not None:
        return result
    progress = resolve_mode(progress)
    ranks = Ranks.from_env()
    device = resolve_device(config.device)
    if ranks.world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ranks.local_rank)  # one GPU per rank
    loader_name = choose_loader(config.loader, device)
    manifest = resolve_dataset(config.dataset, config.data_root)
    spec = resolve_encoder(
        config.model,
        weights=config.weights,
        random_init=config.random_init,
        preprocess_overrides=dict(
            image_size=config.image_size, resize=config.resize, interpolation=config.interpolation, mean=config.mean, std=config.std
        ),
    )
    fields = cache_fields(spec, loader_name, config.views, config.dtype, manifest, device)
    key = cache_key(fields)
    request = config  # as asked: what the up-to-date memo is keyed on
    if config.out is None:
        out = _cached_location(manifest, config.model, key)
        config = dataclasses.replace(config, out=str(out))  # from here on the cached path is the --out
    else:
        out = Path(config.out)
    rows = {s: len(m) for s, m in manifest.splits.items()}

    if ranks.is_leader:
        existing = _existing_store(out, key, fields, config.overwrite)
    else:
        existing = _store_of_job(out, key, ranks)
    if existing is not None and existing.complete:
        if ranks.is_leader:
            shutil.rmtree(out / PROGRESS, ignore_errors=True)  # a run killed right after completing left it
            if ranks.world > 1:
                existing.update_attrs({"job": ranks.job})  # tells the other ranks: nothing to do
            _remember(request, manifest, spec, key, out)
        return ExtractResult(str(out), "up to date", rows, 0, len(existing.invalid_rows()), 0, time.perf_counter() - start, 0.0)

    encoder = (
        build_encoder(spec, log=log, trust=config.trust_checkpoint, ignore_keys=config.ignore_keys)
        .to(device)
        .to(memory_format=torch.channels_last)
    )
    views = select_views(feature_dims(encoder, spec.preprocess, device), config.views)

    if request.out is None and ranks.is_leader:
        log(f"store {out}")
    if existing is None:
        store, status = _create(out, manifest, spec, views, loader_name, key, fields, config), "created"
    else:
        store, status = existing, "resumed"

    run_start = time.perf_counter()
    if not ranks.is_leader:
        written, invalid, nonfinite = _run(store, manifest, encoder, views, loader_name, device, config, progress, ranks, log)
        label = f"{out} (rank {ranks.rank})"
    else:
        with StoreLock(out / PROGRESS / "lock.json", warn=log, job=ranks.job):
            store.clean_temp_files()
            if ranks.world > 1:
                store.update_attrs({"job": ranks.job})  # the other ranks start writing now
            written, _, nonfinite = _run(store, manifest, encoder, views, loader_name, device, config, progress, ranks, log)
            if ranks.world > 1:
                wait_until(lambda: not store.pending_units(), "the other ranks' units", timeout=float("inf"), poll=1.0)
            run_seconds = time.perf_counter() - run_start
            store.finalize(
                {
                    "device": str(device),
                    "batch_size": config.batch_size,
                    "world_size": ranks.world,
                    "run_seconds": round(run_seconds, 3),  # of this (last) run: a resumed run counts its rows only
                    "images_per_second": round(written / run_seconds, 2) if run_seconds > 0 else None,
                }
            )
        invalid, label = len(store.invalid_rows()), str(out)  # all of the store's, resumed units included
        _remember(request, manifest, spec, key, out)
    seconds = time.perf_counter() - start
    return ExtractResult(
        label, status, rows, written, invalid, len(nonfinite), seconds, written / seconds if seconds > 0 else 0.0, nonfinite[:5]
    )


def _cached_location(manifest: Manifest, model: str, key: str) -> Path:
    """Without --out: the cached store with this key wherever it is (two spellings of one model and
    data meet there), else its default place in the cache."""
    found = find_by_key(key)
    return found[0] if found else default_store_path(manifest.name, model, key)


def _remember(config: ExtractConfig, manifest: Manifest, spec: EncoderSpec, key: str, out: Path) -> None:
    """Let the same request answer "up to date" next time without importing torch (request.py)."""
    if Path(config.dataset).suffix.lower() == ".csv":
        inputs = [str(Path(config.dataset).expanduser().resolve())]
    else:
        inputs = dataset_dirs(manifest.root)
    remember_request(request_of(config), key, str(out.resolve()), spec.weights_path, inputs)


def _create(
    out: Path, manifest: Manifest, spec: EncoderSpec, views: dict[str, int], loader_name: str, key: str, fields: dict, config: ExtractConfig
) -> FeatureStore:
    """A new store at ``out`` with the full provenance (replacing the old one under --overwrite)."""
    if out.exists() and config.overwrite:
        _refuse_if_locked(out)
        shutil.rmtree(out)
    try:
        return FeatureStore.create(
            out,
            splits={s: (list(m.paths), m.labels) for s, m in manifest.splits.items()},
            views=views,
            dtype=config.dtype,
            chunk_rows=config.chunk_rows,
            attrs={
                "encoder": spec.to_dict(),
                "preprocessing": spec.preprocess.to_dict(),
                "dataset": {**manifest.to_dict(), "spec": config.dataset},
                "loader": loader_name,
                "cache_key": key,
                "cache_fields": fields,
                "command": resume_command(config, loader_name),  # what `featstore info` offers to resume it
            },
        )
    except OSError as e:
        raise FeatstoreError(
            f"cannot create the store at {str(out)!r}: {e.strerror or e}",
            "check that the parent folder exists, is writable and has space",
        ) from e


def _store_of_job(out: Path, key: str, ranks: Ranks) -> FeatureStore:
    """A non-leader rank: the store rank 0 created or resumed for this job (same cache key)."""

    def ready():
        if not is_store(out):
            return None
        store = FeatureStore.open(out, mode="r+")
        return store if store.attrs.get("job") == ranks.job else None

    store = wait_until(ready, f"rank 0 to prepare {str(out)!r}", timeout=float(os.environ.get("FEATSTORE_RANK_WAIT", "1800")))
    if store.attrs.get("cache_key") != key:
        raise FeatstoreError(f"rank {ranks.rank} computed another cache key than rank 0", "every rank must run the same command")
    return store


def _existing_store(out: Path, key: str, fields: dict, overwrite: bool) -> FeatureStore | None:
    """The store to resume (same key), None to create one, or an error naming why not."""
    if not out.exists():
        return None
    if not is_store(out):
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
            return None
        raise UsageError(
            f"--out {str(out)!r} exists and is not a featstore store", "choose a new --out path; featstore never deletes other data"
        )
    store = FeatureStore.open(out, mode="r+")
    if overwrite:
        return None
    if store.attrs.get("cache_key") == key:
        return store
    old = store.attrs.get("cache_fields", {})
    differing = [k for k in fields if old.get(k) != fields[k]]
    raise UsageError(
        f"--out {str(out)!r} holds another store (different {', '.join(differing) or 'schema'})",
        "pass --overwrite to replace it, or choose another --out",
    )


def _refuse_if_locked(out: Path) -> None:
    lock = StoreLock(out / PROGRESS / "lock.json")
    lock.acquire()  # raises when a live writer holds it
    lock.release()


def plan_batches(units: list[Unit], batch_size: int) -> list[tuple[Unit, np.ndarray]]:
    """Every pending unit cut into batches of ``batch_size`` rows; batches never span units."""
    return [
        (unit, np.arange(s, min(s + batch_size, unit.stop), dtype=np.int64))
        for unit in units
        for s in range(unit.start, unit.stop, batch_size)
    ]


class _UnitWriter:
    """A thread that writes finished units while the main thread encodes the next ones."""

    def __init__(self, store: FeatureStore, depth: int = 2):
        self.store = store
        self.queue: queue.Queue = queue.Queue(maxsize=depth)  # bounds memory: at most depth units in flight
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="featstore-writer", daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.store.write_unit(*item)
                except BaseException as e:  # reported by the main thread
                    self.error = e

    def put(self, unit, features, valid, invalid):
        self._raise()
        self.queue.put((unit, features, valid, invalid))

    def close(self, raise_error: bool = True):
        """Write what is queued (finished units are kept even when the run is failing), then stop."""
        self.queue.put(None)
        self.thread.join()
        if raise_error:
            self._raise()

    def _raise(self):
        if self.error is not None:
            e = self.error
            if isinstance(e, OSError):
                reason = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
                raise FeatstoreError(
                    f"cannot write to the store: {reason} ({getattr(e, 'filename', '') or self.store.path})",
                    "fix the cause and rerun the same command to resume",
                ) from e
            raise e


class _UnitAssembler:
    """Collects batch results into whole units and hands each finished unit to the writer."""

    def __init__(self, views: dict[str, int], dtype: str, writer: _UnitWriter, rel_paths):
        self.views = views
        self.dtype = np.dtype(dtype)
        self.writer = writer
        self.rel_paths = rel_paths
        self.open: dict[int, dict] = {}
        self.written = 0
        self.invalid = 0
        self.nonfinite: set[str] = set()

    def add(self, unit: Unit, batch: Batch, feats: dict[str, np.ndarray]) -> None:
        buf = self.open.setdefault(
            unit.index,
            {
                "features": {v: np.empty((unit.rows, d), self.dtype) for v, d in self.views.items()},
                "valid": np.ones(unit.rows, bool),
                "invalid": {},
                "filled": 0,
            },
        )
        local = batch.rows - unit.start
        bad = np.fromiter((r in batch.errors for r in batch.rows.tolist()), bool, len(batch.rows))
        for v in self.views:
            with np.errstate(over="ignore"):  # float16 overflow is detected and reported below
                values = feats[v].astype(self.dtype)
            values[bad] = np.nan
            buf["features"][v][local] = values
            # NaN/Inf from a decodable image: float16 overflow or a broken model
            broken = ~(np.isfinite(values).all(axis=1) | bad)
            self.nonfinite.update(self.rel_paths[r] for r in batch.rows[broken].tolist())
        buf["valid"][local] = ~bad
        buf["invalid"].update(batch.errors)
        buf["filled"] += len(batch.rows)
        if buf["filled"] == unit.rows:
            self.writer.put(unit, buf["features"], buf["valid"], buf["invalid"])
            self.written += unit.rows
            self.invalid += len(buf["invalid"])
            del self.open[unit.index]


def _run(store, manifest, encoder, views, loader_name, device, config, progress: str, ranks: Ranks, log=log_to_stderr):
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    loader = make_loader(loader_name, store_preprocess(store), device, config.workers)
    runner = BatchEncoder(encoder, views, device, config.batch_size, compile=config.compile)
    ordinal = {(u.split, u.index): g for g, u in enumerate(u for s in store.splits for u in store.units(s))}
    pending = [u for u in store.pending_units() if ranks.owns(ordinal[(u.split, u.index)])]
    label = f"extract {store.path.name}" + (f" (rank {ranks.rank})" if ranks.world > 1 else "")
    bar = Progress(sum(u.rows for u in pending), label, progress, log)
    writer = _UnitWriter(store)
    written, invalid, nonfinite = 0, 0, set()
    finished = False
    try:
        for split in store.splits:
            units = [u for u in pending if u.split == split]
            if not units:
                continue
            planned = plan_batches(units, config.batch_size)
            paths = manifest.absolute_paths(split)
            assembler = _UnitAssembler(views, config.dtype, writer, manifest.splits[split].paths)
            # closed as soon as the split is done: a loader may hold threads, pipelines, fd 2 (quiet.py)
            with contextlib.closing(loader.batches(paths, [r for _, r in planned])) as batches:
                for (unit, _), batch in zip(planned, batches):
                    if config.strict and batch.errors:
                        row, reason = next(iter(batch.errors.items()))
                        raise FeatstoreError(
                            f"cannot decode {paths[row]}: {reason}", "fix or remove the file, or drop --strict to record it as invalid"
                        )
                    runner.submit((unit, batch), batch.images)
                    for (u, b), feats in runner.ready():
                        assembler.add(u, b, feats)
                        bar.update(len(b.rows), len(b.errors))
                for (u, b), feats in runner.ready(drain=True):
                    assembler.add(u, b, feats)
                    bar.update(len(b.rows), len(b.errors))
            written += assembler.written
            invalid += assembler.invalid
            nonfinite |= assembler.nonfinite
        finished = True
    finally:
        bar.close()
        writer.close(raise_error=finished)
    return written, invalid, sorted(nonfinite)


def store_preprocess(store: FeatureStore):
    from .preprocess import Preprocess

    return Preprocess.from_dict(store.attrs["preprocessing"])
