"""Extraction: plan → load → encode → write, resumable and cached.

The plan is fixed when the store is created (manifest frozen, arrays presized, chunk-aligned units).
:mod:`featstore.job` decides which store a run writes (created, resumed or up to date) and
:mod:`featstore.pipeline` fills its pending units; this module runs one job from its config.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from .dense import dense_plan, record_patch_layers
from .dense_targets import resolve_with_targets, target_fields, write_dense_targets
from .device import resolve_device
from .image_changes import modified_images
from .job import (
    augmenting_loader,
    cache_fields,
    cache_key,
    cached_location,
    create_store,
    existing_store,
    refuse_unaugmentable,
    remember,
    remove_progress,
    repair_store,
    requested_augment,
    resume_command,
    store_of_job,
    validate,
)
from .loaders import choose_loader, shard_loader
from .models.encoders import build_encoder, feature_dims, resolve_encoder, select_views
from .pipeline import run_units
from .progress import log_to_stderr, resolve_mode
from .ranks import Ranks, wait_until
from .request import ExtractConfig, ExtractResult, recall_up_to_date, request_of, resolved_model
from .splits import apply_split, parse_split
from .store.lease import rank_lease, store_lock
from .store.patch import is_patch_shape
from .store.remote import location
from .wds_dataset import is_wds, wds_manifest

# re-exported: what a caller of the extraction reads about a job
__all__ = ["ExtractConfig", "ExtractResult", "cache_fields", "cache_key", "extract", "request_of", "resolved_model", "resume_command"]


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
    validate(config)
    if not recalled and (result := recall_up_to_date(config)) is not None:
        return result
    progress = resolve_mode(progress)
    ranks = Ranks.from_env()
    device = resolve_device(config.device)
    if ranks.world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ranks.local_rank)  # one GPU per rank
    loader_name = choose_loader(config.loader, device)
    augment = requested_augment(config)
    loader_name = augmenting_loader(config.loader, loader_name, augment)  # auto: one that crops views
    # targets: where a dense dataset's depth maps or masks are (None for classification)
    if is_wds(config.dataset):
        manifest, targets = wds_manifest(config.dataset, config.wds_label, config.labels), None
        loader_name = shard_loader(config.loader, loader_name, manifest)
        if augment is not None and config.loader == "auto":
            loader_name = "torch"  # views over shards: the torch loader crops them (DALI's shard reader does not)
    else:
        manifest, targets = resolve_with_targets(config.dataset, config.data_root, config.depth_scale, config.labels, config.nyu_classes)
    if config.split is not None:
        manifest = apply_split(manifest, parse_split(config.split, config.split_seed))
    if ranks.is_leader:
        for line in manifest.skipped:  # FIFOs, broken links, folders reached twice: left out, and said so
            log(line)
    spec = resolve_encoder(
        config.model,
        weights=config.weights,
        random_init=config.random_init,
        preprocess_overrides=dict(
            image_size=config.image_size, resize=config.resize, interpolation=config.interpolation, mean=config.mean, std=config.std
        ),
    )
    fields = cache_fields(spec, loader_name, config.views, config.dtype, manifest, device)
    if targets is not None:
        fields["targets"] = target_fields(manifest, targets)
    refuse_unaugmentable(augment, manifest, loader_name, [], targets is not None)
    if augment is not None:  # absent otherwise: the keys of stores without views stay as they were
        fields["augment"] = augment.to_dict()
    key = cache_key(fields)
    request = config  # as asked: what the up-to-date memo is keyed on
    if config.out is None:
        out = cached_location(manifest, config.model, key, fields)
        config = dataclasses.replace(config, out=str(out))  # from here on the cached path is the --out
    else:
        out = location(config.out)  # a Path, or an s3:// / gs:// URL (store/remote.py)
    rows = {s: len(m) for s, m in manifest.splits.items()}

    if ranks.is_leader:
        existing = existing_store(out, key, fields, config.overwrite, log)
    else:
        existing = store_of_job(out, key, fields, ranks)
    if config.repair:
        existing = repair_store(existing, out, manifest, ranks, log)  # its damaged units pending again
    modified: list[str] = []  # images changed since the store was created (image_changes.py): of its finished units
    if existing is not None and ranks.is_leader:
        finished = None  # a complete store: all of them
        if not existing.complete:
            pending = {(u.split, u.index) for u in existing.pending_units()}
            finished = {s: [(u.start, u.stop) for u in existing.units(s) if (s, u.index) not in pending] for s in existing.splits}
        modified = modified_images(manifest, existing.attrs.get("created"), log, finished)
    if existing is not None and existing.complete:
        if ranks.is_leader:
            remove_progress(out)  # a run killed right after completing left it
            if ranks.world > 1:
                existing.update_attrs({"job": ranks.job})  # tells the other ranks: nothing to do
            remember(request, manifest, spec, str(existing.attrs.get("cache_key") or key), out, targets)  # its own key (an older store's)
        invalid = len(existing.invalid_rows())
        return ExtractResult(str(out), "up to date", rows, 0, invalid, 0, time.perf_counter() - start, 0.0, modified_images=modified)

    encoder = (
        build_encoder(spec, log=log, trust=config.trust_checkpoint, ignore_keys=config.ignore_keys)
        .to(device)
        .to(memory_format=torch.channels_last)
    )
    views = select_views(feature_dims(encoder, spec.preprocess, device), config.views, spec.family)
    refuse_unaugmentable(augment, manifest, loader_name, [v for v, d in views.items() if is_patch_shape(d)], False)
    encoder.only(views)  # what is not stored is not computed
    if existing is None and ranks.is_leader:
        config = dense_plan(config, out, manifest, views, log)  # the size check and unit rows of patch views

    if request.out is None and ranks.is_leader:
        log(f"store {out}")
    if existing is None:
        store, status = create_store(out, manifest, spec, views, loader_name, key, fields, config), "created"
        record_patch_layers(store, encoder.patch_layers)
    else:
        store, status = existing, "repaired" if config.repair else "resumed"

    run_start = time.perf_counter()
    if not ranks.is_leader:
        lease = rank_lease(out, ranks.job)  # rank 0's at a URL: a rank writes no unit once its job lost it
        store.confirm_writer = lease.confirm if lease is not None else None
        written, invalid, nonfinite = run_units(store, manifest, encoder, views, loader_name, device, config, progress, ranks, log)
        label = f"{out} (rank {ranks.rank})"
    else:
        with store_lock(out, warn=log, job=ranks.job) as lock:
            store.confirm_writer = lock.confirm  # a lease can lapse (the process stopped): no unit written after
            store.clean_temp_files()
            if targets is not None and "targets" not in store.attrs:
                write_dense_targets(store, manifest, targets, spec.preprocess, fields["targets"], log)
            if ranks.world > 1:
                store.update_attrs({"job": ranks.job})  # the other ranks start writing now
            written, _, nonfinite = run_units(store, manifest, encoder, views, loader_name, device, config, progress, ranks, log)
            if ranks.world > 1:
                wait_until(lambda: not store.pending_units(), "the other ranks' units", timeout=float("inf"), poll=1.0)
            lock.check()  # a lease lost to another writer (ours expired unrenewed): leave the store to it
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
        remember(request, manifest, spec, str(store.attrs.get("cache_key") or key), out, targets)
    seconds = time.perf_counter() - start
    return ExtractResult(
        label, status, rows, written, invalid, len(nonfinite), seconds, written / seconds if seconds > 0 else 0.0, nonfinite[:5], modified
    )
