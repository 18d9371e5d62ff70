"""Load → encode → write of a store's pending units: the loader's batches (never spanning units)
through the encoder on this thread, whole units handed to a writer thread.

Decoding (loader workers / DALI threads), inference (this thread) and writing (the writer thread)
overlap. Batches never span units, so a unit's features depend only on the unit: a resumed run
writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import threading
from collections.abc import Callable

import numpy as np
import torch

from .augment_pipeline import augmented_buffers, batch_rows, encoder_input, split_views, view_plan
from .errors import FeatstoreError
from .inference import BatchEncoder
from .loaders import Batch, make_loader
from .loaders.members import check_member_chunk
from .loaders.verdicts import Verdicts, cache_path, check_files
from .manifest import Manifest
from .preprocess import Preprocess
from .progress import Progress, log_to_stderr
from .ranks import Ranks
from .store import FeatureStore, RowShape, Unit, row_shape


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
                    unit, features, valid, invalid, augmented = item
                    extra = {"augmented": augmented} if augmented is not None else {}  # a split without views: as before
                    self.store.write_unit(unit, features, valid, invalid, **extra)
                except BaseException as e:  # reported by the main thread
                    self.error = e

    def put(self, unit, features, valid, invalid, augmented=None):
        self._raise()
        self.queue.put((unit, features, valid, invalid, augmented))

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

    def __init__(self, views: dict[str, RowShape], dtype: str, writer: _UnitWriter, rel_paths, augment_views: int = 0):
        self.views = views
        self.augment_views = augment_views  # K: the split's rows have K augmented views each (0: none)
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
                "features": {v: np.empty((unit.rows, *row_shape(d)), self.dtype) for v, d in self.views.items()},
                "valid": np.ones(unit.rows, bool),
                "invalid": {},
                "filled": 0,
                "augmented": self._augmented_buffers(unit.rows),
            },
        )
        feats, broken_views = split_views(feats, len(batch.rows), self.augment_views, buf["augmented"], batch, unit.start, self.dtype)
        self.nonfinite.update(self.rel_paths[r] for r in batch.rows[broken_views].tolist())
        local = batch.rows - unit.start
        bad = np.fromiter((r in batch.errors for r in batch.rows.tolist()), bool, len(batch.rows))
        for v in self.views:
            with np.errstate(over="ignore"):  # float16 overflow is detected and reported below
                values = feats[v].astype(self.dtype)
            values[bad] = np.nan
            buf["features"][v][local] = values
            # NaN/Inf from a decodable image: float16 overflow or a broken model
            broken = ~(np.isfinite(values.reshape(len(values), -1)).all(axis=1) | bad)
            self.nonfinite.update(self.rel_paths[r] for r in batch.rows[broken].tolist())
        buf["valid"][local] = ~bad
        buf["invalid"].update(batch.errors)
        buf["filled"] += len(batch.rows)
        if buf["filled"] == unit.rows:
            self.writer.put(unit, buf["features"], buf["valid"], buf["invalid"], buf["augmented"])
            self.written += unit.rows
            self.invalid += len(buf["invalid"])
            del self.open[unit.index]

    def _augmented_buffers(self, rows: int) -> dict[str, np.ndarray] | None:
        return augmented_buffers(self.views, self.augment_views, rows, self.dtype) if self.augment_views else None


def run_units(
    store,
    manifest: Manifest,
    encoder,
    views,
    loader_name,
    device,
    config,
    progress: str,
    ranks: Ranks,
    log: Callable[[str], None] = log_to_stderr,
):
    """Encode and write every pending unit this rank owns; (rows written, invalid rows, paths with NaN/Inf features)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    shards = manifest.shards is not None  # a WebDataset: rows are tar members
    loader = make_loader(loader_name, store_preprocess(store), device, config.workers, config.max_decode_pixels, shards=shards)
    runner = BatchEncoder(encoder, views, device, config.batch_size, compile=config.compile, cuda_graphs=config.cuda_graphs, log=log)
    ordinal = {(u.split, u.index): g for g, u in enumerate(u for s in store.splits for u in store.units(s))}
    pending = [u for u in store.pending_units() if ranks.owns(ordinal[(u.split, u.index)])]
    label = f"extract {store.name}" + (f" (rank {ranks.rank})" if ranks.world > 1 else "")
    bar = Progress(sum(u.rows for u in pending), label, progress, log)
    writer = _UnitWriter(store)
    written, invalid, nonfinite = 0, 0, set()
    finished = False
    try:
        for split in store.splits:
            units = [u for u in pending if u.split == split]
            if not units:
                continue
            augment = view_plan(store, split, manifest)  # K augmented views of each row (the train split of --augment)
            planned = plan_batches(units, batch_rows(config.batch_size, augment))
            paths = manifest.sources(split)
            verdicts = check_split(paths, planned, manifest, config.workers, log)
            assembler = _UnitAssembler(views, config.dtype, writer, manifest.splits[split].paths, augment.views if augment else 0)
            given = {"augment": augment} if augment is not None else {}
            # closed as soon as the split is done: a loader may hold threads, pipelines, fd 2 (quiet.py)
            with contextlib.closing(loader.batches(paths, [r for _, r in planned], verdicts, **given)) as batches:
                for (unit, _), batch in zip(planned, batches):
                    if config.strict and batch.errors:
                        row, reason = next(iter(batch.errors.items()))
                        raise FeatstoreError(
                            f"cannot decode {manifest.absolute_paths(split)[row]}: {reason}",
                            "fix or remove the file, or drop --strict to record it as invalid",
                        )
                    runner.submit((unit, batch), encoder_input(batch))
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


def check_split(paths: list[str], planned: list[tuple[Unit, np.ndarray]], manifest: Manifest, workers: int, log) -> Verdicts:
    """The file checks of the rows about to be extracted, once per file (cached across runs), off the hot path;
    their count and rate are logged (a notice, not progress: it is logged with --no-progress too), one line per split."""
    rows = np.concatenate([r for _, r in planned])
    chunk = check_member_chunk if manifest.shards is not None else None
    verdicts, checked = check_files(paths, rows, cache_path(manifest.name, manifest.root), max(workers, os.cpu_count() or 1), log, chunk)
    log(checked.line())
    return verdicts


def store_preprocess(store: FeatureStore) -> Preprocess:
    """The preprocessing the store was created with (a resumed run uses exactly it)."""
    return Preprocess.from_dict(store.attrs["preprocessing"])
