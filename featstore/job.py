"""The store an extraction job writes: its cache key, whether it is created, resumed or already up
to date, what is remembered for the torch-free up-to-date check, and the command that resumes it."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

from .atomic import remove_folder
from .augment import AUGMENTED_SPLIT, Augment
from .cache import find_by_key, stores_with_key
from .datasets import BUILTIN_DATASETS
from .dense_layouts import NYU, TargetSpec, nyu_sources
from .device import compute_dtype
from .errors import FeatstoreError, UsageError
from .home import default_store_path
from .image_changes import image_folders
from .manifest import Manifest
from .models.encoders import EncoderSpec, pos_embed_rule
from .models.presets import find_preset
from .preprocess import SIZE_RULE
from .ranks import Ranks, wait_until
from .request import (
    ExtractConfig,
    dataset_dirs,
    refuse_url_out,
    remember_request,
    request_of,
    resolved_dataset,
    resolved_model,
    resolved_path,
)
from .splits import parse_split
from .store import FEATURE_DTYPES, PROGRESS, FeatureStore, RowShape, is_store, is_url
from .store.lease import store_lock
from .store.remote import Remote
from .store.repair import reopen_damaged
from .wds_dataset import SPLITS_FILE, is_wds, shard_files

ROOT_FIELD = "dataset_root"


def dataset_location(manifest: Manifest) -> str:
    """Where the dataset's images are, as the cache key names it: the root with symlinks resolved (a
    relative or linked spelling is the same data), or the common prefix of shards at URLs."""
    if manifest.shards is not None and any(is_url(s) for s in manifest.shards.shards):
        return str(manifest.root)
    return os.path.realpath(manifest.root)


def cache_fields(spec: EncoderSpec, loader: str, views: list[str] | None, dtype: str, manifest: Manifest, device: torch.device) -> dict:
    """Everything that changes the stored numbers; two runs with equal fields give the same store."""
    fields = {
        # the manifest digests names and labels, not bytes: two folders of the same names (ImageNet-C's
        # severities, two preprocessed copies) are other images, so where they are is part of the key
        ROOT_FIELD: dataset_location(manifest),
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
        # a transformers folder's layout, config digest and preprocessing source (not where the hub cache keeps it)
        **({"encoder_details": {k: v for k, v in spec.details.items() if k != "hub"}} if spec.details else {}),
    }
    if manifest.split:  # the manifest digest has the drawn splits; the seed and fractions are named too
        fields["split"] = manifest.split
    if loader == "dali":
        # DALI stores made before DALI sized and cropped as torchvision does hold other pixels (the torch
        # and nvJPEG loaders always did: their keys stay); old DALI stores lack this field, so are not reused
        fields["size_rule"] = SIZE_RULE
    if pos_embed_rule(spec.arch, find_preset(spec.name)) == "dinov2-reg":
        # stores of the register models made before they had their own resampling hold other features
        fields["pos_embed"] = "dinov2-reg"
    return fields


def cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def is_store_of(attrs: dict, key: str, fields: dict) -> bool:
    """Whether a store with ``attrs`` is the one ``key`` (of ``fields``) names: that key, or a store
    made before the dataset's location entered the key, with every other field equal and made from
    the images at this very location (its recorded root)."""
    if attrs.get("cache_key") == key:
        return True
    old_fields, root = attrs.get("cache_fields") or {}, (attrs.get("dataset") or {}).get("root")
    if ROOT_FIELD in old_fields or not isinstance(root, str) or ROOT_FIELD not in fields:
        return False
    here = fields[ROOT_FIELD]
    same_place = root == here or (not is_url(here) and os.path.realpath(root) == here)
    return same_place and attrs.get("cache_key") == key_without_root(fields)


def key_without_root(fields: dict) -> str:
    """The key the same fields had before the dataset's location entered the key."""
    return cache_key({k: v for k, v in fields.items() if k != ROOT_FIELD})


def validate(config: ExtractConfig) -> None:
    refuse_url_out(config.out)
    if config.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {config.batch_size}", "e.g. --batch-size 64")
    if config.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {config.workers}", "e.g. --workers 2")
    if config.dtype not in FEATURE_DTYPES:
        raise UsageError(f"unknown --dtype {config.dtype!r}", f"use one of {', '.join(FEATURE_DTYPES)}")
    if config.max_decode_pixels is not None and config.max_decode_pixels < 1:
        raise UsageError(f"--max-decode-pixels must be >= 1, got {config.max_decode_pixels}", "e.g. --max-decode-pixels 200000000")
    if config.chunk_rows < 1:
        raise UsageError(f"--chunk-rows must be >= 1, got {config.chunk_rows}", "e.g. --chunk-rows 8192")
    if config.repair and config.overwrite:
        raise UsageError("--repair and --overwrite contradict each other", "--repair keeps the store's intact units; pass one")
    if config.wds_label != "cls" and not is_wds(config.dataset):
        raise UsageError(f"--wds-label {config.wds_label!r} applies to WebDataset shards only", "drop it, or pass --dataset 'wds:...'")
    augment = requested_augment(config)
    if augment is not None and config.batch_size < augment.views + 1:
        raise UsageError(
            f"--batch-size {config.batch_size} cannot hold one image and its {augment.views} augmented views",
            f"pass --batch-size {augment.views + 1} or more (a forward pass holds batch-size // (K + 1) rows)",
        )
    if config.split is not None:
        parse_split(config.split, config.split_seed)
    elif config.split_seed:
        raise UsageError("--split-seed is the seed of --split, which is not given", "add e.g. --split train=0.7,val=0.1,test=0.2")


def requested_augment(config: ExtractConfig) -> Augment | None:
    """The augmented views asked for (None: none); --augment-views/--augment-seed without --augment is an error."""
    if config.augment is None:
        for value, flag in ((config.augment_views, "--augment-views"), (config.augment_seed, "--augment-seed")):
            if value is not None:
                raise UsageError(f"{flag} is an option of --augment, which is not given", "add --augment rrc-flip, or drop " + flag)
        return None
    return Augment(config.augment, 10 if config.augment_views is None else config.augment_views, config.augment_seed or 0)


def refuse_unaugmentable(augment: Augment | None, manifest: Manifest, loader: str, patch_views: list[str], dense: bool) -> None:
    """--augment where it cannot be done: a one-line refusal naming the fix."""
    if augment is None:
        return
    if loader not in AUGMENTING_LOADERS:
        raise UsageError(f"--loader {loader} cannot crop augmented views", "use --loader torch or --loader dali with --augment")
    if manifest.shards is not None and loader != "torch":
        raise UsageError(f"--loader {loader} cannot crop augmented views of WebDataset shards", "use --loader torch with --augment")
    if AUGMENTED_SPLIT not in manifest.splits:
        raise UsageError(
            f"--augment stores views of the {AUGMENTED_SPLIT!r} split, and the dataset has splits {', '.join(manifest.splits)}",
            "give the dataset a train split (a train/ folder, a CSV split column, or --split train=0.8,val=0.2)",
        )
    if patch_views:
        raise UsageError(
            f"--augment stores global views only; {', '.join(patch_views)} is a patch view",
            "pass --views with global views (e.g. cls,avgpool)",
        )
    if dense:
        raise UsageError(
            "--augment is for classification datasets: a crop would need the depth maps and masks cropped too", "drop --augment"
        )


AUGMENTING_LOADERS = ("torch", "dali")  # the loaders that crop augmented views


def augmenting_loader(asked: str, chosen: str, augment: Augment | None) -> str:
    """``--loader auto`` with --augment: the chosen loader if it crops views, else DALI where it imports,
    else torch (an explicitly named loader that cannot is refused by ``refuse_unaugmentable``)."""
    if augment is None or asked != "auto" or chosen in AUGMENTING_LOADERS:
        return chosen
    from .loaders import dali_available

    return "dali" if dali_available() else "torch"


def resume_command(config: ExtractConfig, loader_name: str) -> str:
    """The `featstore extract` command that resumes (or reruns) this extraction, from any folder.

    Paths are made absolute; the loader is the one chosen (``auto`` could choose another elsewhere,
    which would be another store); ``--overwrite`` is left out, since it would start over.
    """
    defaults = ExtractConfig(model="", dataset="", out="")
    dataset = config.dataset if config.dataset in (*BUILTIN_DATASETS, NYU) else resolved_dataset(config.dataset)
    args = [
        "featstore",
        "extract",
        "--model",
        resolved_model(config.model),
        "--dataset",
        dataset,
        "--out",
        cast(str, config.out) if is_url(cast(str, config.out)) else str(Path(cast(str, config.out)).resolve()),
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
        ("split", "--split", str),
        ("split_seed", "--split-seed", str),
        ("labels", "--labels", str),
        ("max_decode_pixels", "--max-decode-pixels", str),
        ("depth_scale", "--depth-scale", str),
        ("nyu_classes", "--nyu-classes", str),
        ("wds_label", "--wds-label", str),
        ("augment", "--augment", str),
        ("augment_views", "--augment-views", str),
        ("augment_seed", "--augment-seed", str),
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
    if not config.cuda_graphs:
        args.append("--no-cuda-graphs")
    return shlex.join(args)


def cached_location(manifest: Manifest, model: str, key: str, fields: dict) -> Path | str:
    """Without --out: the cached store with this key wherever it is (two spellings of one model and
    data meet there; or the same store keyed before the dataset's location entered the key), else
    its default place in the cache."""
    found = find_by_key(key)
    if not found:
        older = stores_with_key(key_without_root(fields))
        found = [p for p, attrs in older if is_store_of(attrs, key, fields)]
    return found[0] if found else default_store_path(manifest.name, model, key)


def remember(
    config: ExtractConfig, manifest: Manifest, spec: EncoderSpec, key: str, out: Path | str, targets: TargetSpec | None = None
) -> None:
    """Let the same request answer "up to date" next time without importing torch (request.py).
    ``targets``: a dense dataset's; their files are stamped too (they are in the cache key, and a
    mask or depth map rewritten in place changes no folder's mtime)."""
    if isinstance(out, str):
        return  # a store at a URL: its completion is read there each time (the memo stamps local files)
    if manifest.shards is not None:
        if len(shard_files(manifest)) < len(manifest.shards.shards):
            return  # shards at URLs: no stamp tells when they change, so no memo
        inputs = shard_files(manifest) + ([resolved_dataset(config.dataset)[4:]] if config.dataset.lower().endswith(SPLITS_FILE) else [])
        # and the folders a glob or brace range matched in: a shard added, removed or renamed there
        # changes one of their mtimes, while the stamps of the shards found say nothing of it
        inputs += sorted({os.path.dirname(f) for f in shard_files(manifest)} | {str(manifest.root)})
    elif Path(config.dataset).suffix.lower() == ".csv":
        inputs = [str(Path(config.dataset).expanduser().resolve())]
    elif config.dataset == NYU:  # made from the .mat and its mappings: a change there (or a mapping added) is a new folder
        inputs = [*map(str, nyu_sources(cast(str, config.data_root), config.nyu_classes)), *dataset_dirs(manifest.root)]
    else:
        inputs = dataset_dirs(manifest.root)
    if targets is not None:  # and the split lists and class names, which a rewrite in place would not show either
        files = (f for split in manifest.splits.values() for image in split.paths for f in targets.files(manifest.root, image).values())
        inputs += [str(f) for f in files if f is not None] + [str(f) for f in targets.listings(manifest.root)]
    remember_request(request_of(config), key, str(out.resolve()), spec.weights_path, [*spec.inputs, *inputs], image_folders(manifest))


def create_store(
    out: Path | str,
    manifest: Manifest,
    spec: EncoderSpec,
    views: dict[str, RowShape],
    loader_name: str,
    key: str,
    fields: dict,
    config: ExtractConfig,
) -> FeatureStore:
    """A new store at ``out`` with the full provenance (replacing the old one under --overwrite)."""
    if isinstance(out, str):  # at a URL creating is no rename: under the lease, objects written create-only
        with store_lock(out):
            if config.overwrite:
                Remote.of(out).remove_store()
            return _create(out, manifest, spec, views, loader_name, key, fields, config)
    if out.exists() and config.overwrite:
        if out.is_symlink():
            raise UsageError(
                f"--out {str(out)!r} is a symbolic link (to {os.path.realpath(out)!r})", "pass the store's own path to --overwrite it"
            )
        _refuse_if_locked(out)
        remove_folder(out)  # renamed away first: a killed run never leaves a half-deleted store at --out
    return _create(out, manifest, spec, views, loader_name, key, fields, config)


def _create(
    out: Path | str,
    manifest: Manifest,
    spec: EncoderSpec,
    views: dict[str, RowShape],
    loader_name: str,
    key: str,
    fields: dict,
    config: ExtractConfig,
) -> FeatureStore:
    try:
        return FeatureStore.create(
            out,
            splits={s: (manifest.stored_paths(s), m.labels) for s, m in manifest.splits.items()},
            views=views,
            dtype=config.dtype,
            chunk_rows=config.chunk_rows,
            augment=fields.get("augment"),
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


def store_of_job(out: Path | str, key: str, fields: dict, ranks: Ranks) -> FeatureStore:
    """A non-leader rank: the store rank 0 created or resumed for this job (same cache key)."""

    def ready():
        if (Remote.of(out).attrs() is None) if isinstance(out, str) else not is_store(out):
            return None
        store = FeatureStore.open(out, mode="r+")
        return store if store.attrs.get("job") == ranks.job else None

    store = wait_until(ready, f"rank 0 to prepare {str(out)!r}", timeout=float(os.environ.get("FEATSTORE_RANK_WAIT", "1800")))
    if store.attrs.get("cache_key") != key and not is_store_of(dict(store.attrs), key, fields):
        raise FeatstoreError(f"rank {ranks.rank} computed another cache key than rank 0", "every rank must run the same command")
    return store


def existing_store(
    out: Path | str, key: str, fields: dict, overwrite: bool, log: Callable[[str], None] = lambda s: None
) -> FeatureStore | None:
    """The store to resume (same key), None to create one, or an error naming why not."""
    if isinstance(out, str):
        if not _remote_store(out, log):
            return None
    elif not out.exists():
        return None
    elif not is_store(out):
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
            return None
        raise UsageError(
            f"--out {str(out)!r} exists and is not a featstore store", "choose a new --out path; featstore never deletes other data"
        )
    store = FeatureStore.open(out, mode="r+")
    if overwrite:
        return None
    if is_store_of(dict(store.attrs), key, fields):
        return store
    old = store.attrs.get("cache_fields", {})
    differing = [k for k in sorted(set(fields) | set(old)) if old.get(k) != fields.get(k)]
    raise UsageError(
        f"--out {str(out)!r} holds another store (different {', '.join(differing) or 'schema'})",
        "pass --overwrite to replace it, or choose another --out",
    )


def _remote_store(url: str, log: Callable[[str], None]) -> bool:
    """Whether a store is at ``url``; a creation that died before its zarr.json is cleared
    (under the lease: a live creator holds it), anything else there is refused."""
    remote = Remote.of(url)
    if remote.attrs() is not None:
        return True
    remote.require_bucket()
    if remote.half_created():
        with store_lock(url, warn=log):
            if remote.half_created():
                log(f"removing the half-created store at {url} (its creation was killed)")
                remote.remove_store()
        return False
    if not remote.is_empty():
        raise UsageError(
            f"--out {url!r} holds objects and is not a featstore store", "choose a new --out URL; featstore never deletes other data"
        )
    return False


def remove_progress(out: Path | str) -> None:
    """Drop the progress files of a store that is complete (a run killed right after completing left them)."""
    if isinstance(out, str):
        Remote.of(out).remove(PROGRESS)
    else:
        shutil.rmtree(out / PROGRESS, ignore_errors=True)


def _refuse_if_locked(out: Path) -> None:
    lock = store_lock(out)
    lock.acquire()  # raises when a live writer holds it
    lock.release()


def repair_store(
    existing: FeatureStore | None, out: Path | str, manifest: Manifest, ranks: Ranks, log: Callable[[str], None]
) -> FeatureStore:
    """``--repair``: the store at ``out`` verified, its damaged units made pending again (so the
    ordinary resume re-extracts just them); an intact store is returned complete."""
    if isinstance(out, str):
        raise UsageError(
            f"--repair works on local stores, not {out!r}", "copy it down (aws s3 sync URL DIR), repair it there, and upload it back"
        )
    if ranks.world > 1:
        raise UsageError("--repair runs in one process", "run it without torchrun; the repair re-extracts only the damaged units")
    if existing is None:
        raise UsageError(f"no store to repair at {str(out)!r}", "run the same command without --repair to extract it")
    with store_lock(out, warn=log):
        plan = {s: (list(m.paths), m.labels) for s, m in manifest.splits.items()}
        units = reopen_damaged(existing, plan, log)
    if units:
        log(f"repair: re-extracting {units} damaged units of {out}")
    else:
        log(f"repair: every unit of {out} verified intact")
        if existing.complete:  # the progress of an interrupted store is what its resume goes on from
            shutil.rmtree(out / PROGRESS, ignore_errors=True)
    return existing
