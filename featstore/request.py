"""What an extraction is asked to do (:class:`ExtractConfig`), what it reports
(:class:`ExtractResult`), and the fast answer for a request already done.

Torch-free on purpose: ``featstore extract`` asks :func:`recall_up_to_date` before importing torch,
timm or DALI. A full run records what its request resolved to (the cache key and the store) with
stamps of everything the resolution read (weights file, dataset folders, installed versions, GPUs);
while no stamp changed, the same request has the same cache key, and a complete store with that
key means there is nothing to do.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

from .home import index_dir, weights_dir, write_memo
from .image_changes import any_file_modified_after, created_ns
from .models.hub_cache import hub_cache_dir
from .store import DEFAULT_CHUNK_ROWS
from .store.locations import PROGRESS, is_url, refuse_credentials, store_attrs
from .store.remote import refuse_unwritable


@dataclass
class ExtractConfig:
    """What one extraction is asked to do: ``featstore extract``'s options, one field each.

    Parameters
    ----------
    model : str
        A preset (``featstore models``), a timm name, ``tv:<torchvision name>``, ``file.py:build`` or
        ``hf:ORG/NAME[@REVISION]`` (a model in the local Hugging Face hub cache).
    dataset : str
        ``digits``, ``imagenet``, an ImageFolder folder, a CSV file list, or WebDataset shards
        (``wds:DIR/train-{000000..000099}.tar`` or ``wds:SPLITS.yaml``; docs/scale.md).
    out : str, optional
        The store to write (a folder, or an ``s3://``/``gs://`` URL: docs/scale.md); None: the cache,
        ``$FEATSTORE_HOME/stores/<dataset>/<model>-<key>.zarr``.
    data_root, weights, random_init, trust_checkpoint, ignore_keys
        Where ``imagenet`` lives; the checkpoint (or a transformers model folder); run untrained; allow pickled
        code; checkpoint key globs to drop.
    views : list of str, optional
        Views to store (default: all the model gives).
    loader, device, batch_size, workers, dtype, chunk_rows, compile, cuda_graphs
        ``auto|dali|nvjpeg|torch``; ``auto|cpu|cuda[:N]``; 64; 2; ``float16|float32``; 8192; False; True.
    overwrite, strict
        Replace another store at ``out``; stop at the first undecodable image.
    repair
        Verify the store at ``out`` and re-extract just its damaged units (``featstore verify``).
    split, split_seed
        ``train=0.7,val=0.1,test=0.2``: seeded, stratified splits of a dataset without any (splits.py); the seed.
    image_size, resize, interpolation, mean, std
        Overrides of the model's preprocessing.
    max_decode_pixels
        Pixels the loader may decode and resize at once: batches are decoded in groups under it, an
        image over it alone is an invalid row (default: a sixth of the memory, see ``decode_budget``).
    wds_label
        WebDataset shards: ``cls`` (the .cls component) or a field of the .json component.
    augment, augment_views, augment_seed
        ``rrc-flip``: also store K (default 10) seeded random-resized-crop + flip views of every
        train image (``featstore.augment``); the seed of their crops (default 0).
    labels
        A CSV file list's integer labels: ``dense`` (0..C-1, each used) or ``sparse`` (the distinct
        labels, sorted, become classes 0..K-1; the class names record the mapping).
    """

    model: str
    dataset: str
    out: str | None = None  # None: the cache, $FEATSTORE_HOME/stores/<dataset>/<model>-<key>.zarr
    data_root: str | None = None
    weights: str | None = None
    random_init: bool = False
    trust_checkpoint: bool = False
    ignore_keys: tuple[str, ...] = ()  # globs of checkpoint keys to drop (heads of other names)
    views: list[str] | None = None
    loader: str = "auto"
    device: str = "auto"
    batch_size: int = 64
    workers: int = 2
    dtype: str = "float16"
    overwrite: bool = False
    strict: bool = False
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    compile: bool = False
    cuda_graphs: bool = True  # the forward replayed from a CUDA graph (featstore.inference); same features
    image_size: int | None = None
    resize: int | None = None
    interpolation: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    repair: bool = False
    split: str | None = None
    split_seed: int = 0
    max_decode_pixels: int | None = None  # pixels one decode may hold (None: from the machine's memory)
    labels: str = "dense"  # a CSV's integer labels: dense 0..C-1, or sparse (mapped, sorted, to 0..K-1)
    depth_scale: float | None = None  # metres per unit of a 16-bit depth PNG (dense datasets; default 0.001)
    nyu_classes: int = 40  # nyu-depth-v2's masks: 40 classes (classMapping40.mat) or 13 (class13Mapping.mat too)
    wds_label: str = "cls"  # WebDataset shards: the .cls component, or a field of the .json component
    augment: str | None = None  # "rrc-flip": K augmented views of every train image (featstore.augment)
    augment_views: int | None = None  # K (default 10 with --augment)
    augment_seed: int | None = None  # the seed the views' crops are drawn from (default 0)


@dataclass
class ExtractResult:
    """What :func:`featstore.extract` returns.

    Attributes
    ----------
    store : str
        The store's path.
    status : {"created", "resumed", "up to date"}
    rows : dict of str to int
        Rows per split.
    rows_written, invalid, nonfinite : int
        Rows written by this run; undecodable rows; rows with NaN/Inf features.
    seconds, images_per_second : float
    nonfinite_paths : list of str
        The first few paths with NaN/Inf features.
    modified_images : list of str
        An existing store ("up to date", "resumed", "repaired"): the images modified after it was
        created, of its finished units when it was not complete (their features may be of the old
        bytes; ``overwrite=True`` extracts again). Files, or a shard dataset's shards.
    """

    store: str
    status: str  # "up to date", "created", "resumed", "repaired"
    rows: dict[str, int]
    rows_written: int
    invalid: int
    nonfinite: int
    seconds: float
    images_per_second: float
    nonfinite_paths: list[str] = field(default_factory=list)
    modified_images: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.status == "up to date":
            return f"{self.store}: up to date ({sum(self.rows.values()):,} rows, nothing to do)"
        splits = ", ".join(f"{s} {n:,}" for s, n in self.rows.items())
        text = (
            f"{self.store}: {self.status}, wrote {self.rows_written:,} rows ({splits}) in {self.seconds:.1f} s "
            f"({self.images_per_second:.1f} img/s), {self.invalid} invalid"
        )
        if self.nonfinite:
            text += f", {self.nonfinite} rows with NaN/Inf features (first: {self.nonfinite_paths[0]}; try --dtype float32)"
        return text


def refuse_url_out(out: str | None) -> None:
    """An ``--out`` URL featstore cannot write to, or one carrying credentials: one line naming the fix."""
    if out is not None and is_url(out):
        refuse_credentials(out)
        refuse_unwritable(out)


@overload
def resolved_path(path: str) -> str: ...
@overload
def resolved_path(path: None) -> None: ...
def resolved_path(path: str | None) -> str | None:
    """``path`` made absolute when it names something that exists (else as typed, e.g. a builtin name)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


def resolved_model(model: str) -> str:
    """``model`` with a builder file's path made absolute (``file.py:build``, split as the encoder
    loader splits it: at the last colon); any other model name as typed."""
    target, _, attr = model.rpartition(":")
    return f"{resolved_path(target)}:{attr}" if target.endswith(".py") else model


def request_of(config: ExtractConfig) -> dict:
    """The request as typed, with relative paths made absolute: the memo's key."""
    model = resolved_model(config.model)
    data_root = config.data_root
    if config.dataset == "imagenet" and data_root is None:
        data_root = os.environ.get("FEATSTORE_DATA")
    return {
        "model": model,
        "dataset": resolved_dataset(config.dataset),
        "data_root": resolved_path(data_root),
        "weights": resolved_path(config.weights),
        "random_init": config.random_init,
        "ignore_keys": sorted(config.ignore_keys),
        "views": sorted(config.views) if config.views else None,
        "loader": config.loader,
        "device": config.device,
        "dtype": config.dtype,
        "preprocess": [
            config.image_size,
            config.resize,
            config.interpolation,
            config.mean and list(config.mean),
            config.std and list(config.std),
        ],
        "out": (config.out if is_url(config.out) else os.path.abspath(os.path.expanduser(config.out))) if config.out else None,
        **({"split": [config.split, config.split_seed]} if config.split else {}),  # absent: old memos stay valid
        "ranks": os.environ.get("WORLD_SIZE"),
        **({"labels": config.labels} if config.labels != "dense" else {}),
        **({"depth_scale": config.depth_scale} if config.depth_scale is not None else {}),
        **({"nyu_classes": config.nyu_classes} if config.nyu_classes != 40 else {}),
        **({"wds_label": config.wds_label} if config.wds_label != "cls" else {}),
        **({"augment": [config.augment, config.augment_views, config.augment_seed]} if config.augment else {}),
    }


def resolved_dataset(spec: str) -> str:
    """``--dataset`` with paths made absolute: a folder or CSV (``resolved_path``), or the pattern of ``wds:`` shards."""
    if spec.startswith("wds:"):
        body = spec[4:]
        return spec if "://" in body or not body else "wds:" + os.path.abspath(os.path.expanduser(body))
    return resolved_path(spec)


def recall_up_to_date(config: ExtractConfig) -> ExtractResult | None:
    """An "up to date" result when this exact request was resolved before, nothing it read has
    changed, and its store is complete; None whenever the full path has to decide."""
    import time

    start = time.perf_counter()
    refuse_url_out(config.out)
    if config.overwrite or config.repair or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    recalled = recall_request(request_of(config))
    if recalled is None:
        return None
    key, store, image_dirs = recalled
    attrs = store_attrs(store)
    if not attrs or attrs.get("cache_key") != key or not attrs.get("complete") or (Path(store) / PROGRESS).exists():
        return None
    since = created_ns(attrs.get("created"))
    if since is not None and any_file_modified_after(image_dirs, since):
        return None  # an image may have been rewritten in place: the full path names it (image_changes.py)
    from .home import mark_used

    mark_used(store, key)
    rows = {s: int(n) for s, n in attrs.get("splits", {}).items()}
    invalid = sum(len(v) for v in attrs.get("invalid", {}).values())
    shown = store if config.out is None else str(Path(config.out))  # as the full path shows it: --out as given
    return ExtractResult(shown, "up to date", rows, 0, invalid, 0, time.perf_counter() - start, 0.0)


# ---------------------------------------------------------------- the memo of resolved requests


def _stat_stamp(path: str) -> list:
    try:
        st = os.stat(path)
    except OSError:
        return [path, None]
    return [path, st.st_size, st.st_mtime_ns]


def dataset_dirs(root: str | os.PathLike) -> list[str]:
    """Every folder under a dataset root: adding, removing or renaming an image changes one of their
    mtimes, and the manifest (paths + labels) is decided by nothing else. Each folder once, however
    many links reach it (a link to its own parent would otherwise be walked without end, as the
    dataset walk does not)."""
    out, stack, seen = [], [str(root)], set()
    while stack:
        d = stack.pop()
        try:
            st = os.stat(d)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        out.append(d)
        try:
            with os.scandir(d) as entries:
                stack.extend(e.path for e in entries if e.is_dir(follow_symlinks=True) and not e.name.startswith("."))
        except OSError:
            pass
    return sorted(out)


def environment_stamp() -> dict:
    """What an 'auto' loader and device and a timm preset resolve from, read without importing them."""
    import importlib.metadata
    import importlib.util

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    try:
        dali = importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        dali = False
    from .preprocess import SIZE_RULE
    from .version import __version__

    return {
        "featstore": __version__,
        # a memo made before a loader changed its output (same version, editable install) is not trusted
        "size_rule": SIZE_RULE,
        "timm": version("timm"),
        "torchvision": version("torchvision"),
        "torch": version("torch"),
        "dali": dali,
        "gpus": sorted(p.name for p in Path("/dev").glob("nvidia[0-9]*")),
        "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        # where a preset's weights file and a hub model are looked for: another folder may hold another checkpoint
        "weights_dir": str(weights_dir().resolve()),
        "hub_cache": str(hub_cache_dir().resolve()),
    }


def request_memo_path(request: dict) -> Path:
    return index_dir() / "requests" / (hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest() + ".json")


def remember_request(
    request: dict, key: str, store: str, weights_path: str | None, dataset_inputs: list[str], image_dirs: list[str] | None = None
) -> None:
    """After a full resolution: what this request resolved to, and the stamps that keep it true.
    ``image_dirs``: the folders holding the images, scanned for files modified after the store was
    created (a rewrite in place changes no folder's stamp)."""
    memo = {
        "cache_key": key,
        "store": store,
        "environment": environment_stamp(),
        "files": [_stat_stamp(p) for p in ([weights_path] if weights_path else []) + dataset_inputs],
        "image_dirs": image_dirs or [],
    }
    write_memo(request_memo_path(request), json.dumps(memo))


def recall_request(request: dict) -> tuple[str, str, list[str]] | None:
    """(cache key, store path, image folders) of a request resolved before, if no stamp changed
    since; else None."""
    try:
        memo = json.loads(request_memo_path(request).read_text())
    except (OSError, ValueError):
        return None
    if memo.get("environment") != environment_stamp():
        return None
    if any(_stat_stamp(f[0]) != f for f in memo.get("files", [])):
        return None
    return memo["cache_key"], memo["store"], list(memo.get("image_dirs", []))
