"""``--dataset wds:...``: a WebDataset (tar shards) → a Manifest whose rows are the shards' samples.

Two forms:

- ``wds:PATTERN`` — the shards of one pattern (``data/train-{000000..000099}.tar``, globs, fsspec URLs:
  ``shards``) are one split, ``all`` (``--split train=0.8,val=0.2`` can draw splits from it);
- ``wds:FILE.yaml`` (or ``.yml``, ``.json``) — a file naming each split's shards, paths relative to the
  file's folder, one pattern or a list of them per split::

      train: train-{000000..000099}.tar
      val: [val-000000.tar, val-000001.tar]

A row's identity (the store's ``paths``) is ``<shard, relative to the common folder>/<sample key>``,
unique because keys are unique within a shard; rows are in shard order, then member order.
The label comes from ``--wds-label``: ``cls`` (the default: the sample's .cls component, an integer
or a class name) or a field of the sample's .json component. Integer labels follow ``--labels``
(dense 0..C-1, or sparse) as a CSV's do; names become classes in sorted order.

A sample without an image component, with a truncated image, or without a usable label is an invalid
row with its reason (label 0, never read as a class: ``valid`` is false); a damaged shard's later
samples are left out and said so in the log.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from .errors import UsageError
from .manifest import Manifest, ShardRows, SplitManifest
from .shards import expand_shards, is_url
from .tar_index import CLS, ShardListing, cache_holds, label_source, list_shard, read_cached

PREFIX = "wds:"
# image components, by exact extension (as DALI's reader matches them): the first one a sample has is its image
IMAGE_COMPONENTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "pbm", "pnm")
SPLITS_FILE = (".yaml", ".yml", ".json")
_SPLIT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
LISTING_THREADS = 8
PROCESS_POOL_FROM = 16  # shards to list before processes pay for their start (~0.5 s each)


def is_wds(spec: str) -> bool:
    return spec.startswith(PREFIX)


def split_patterns(spec: str) -> tuple[dict[str, list[str]], Path | None]:
    """``wds:...`` → {split: [shard, …]} (expanded, in row order) and the splits file (None for a pattern)."""
    body = spec[len(PREFIX) :]
    if not body:
        raise UsageError("--dataset 'wds:' names no shards", "e.g. --dataset 'wds:data/train-{000000..000099}.tar'")
    if body.lower().endswith(SPLITS_FILE) and not is_url(body):
        path = Path(body).expanduser().resolve()
        return {name: [s for p in patterns for s in expand_shards(p, path.parent)] for name, patterns in _read_splits(path).items()}, path
    return {"all": expand_shards(body)}, None


def _read_splits(path: Path) -> dict[str, list[str]]:
    example = "e.g. a YAML file with lines `train: train-{000000..000099}.tar` and `val: val-{000000..000004}.tar`"
    if not path.is_file():
        raise UsageError(f"splits file {str(path)!r} not found", example)
    try:
        text = path.read_text("utf-8")
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml  # type: ignore[import-untyped]  # PyYAML comes with timm; its stubs are not installed

            data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"cannot read the splits file {str(path)!r}: {str(e).splitlines()[0]}", example) from None
    except Exception as e:  # yaml.YAMLError
        raise UsageError(f"splits file {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}", example) from None
    if not isinstance(data, dict) or not data:
        raise UsageError(f"splits file {str(path)!r} is not a mapping of split names to shard patterns", example)
    out: dict[str, list[str]] = {}
    for name, value in data.items():
        if not isinstance(name, str) or not _SPLIT_NAME.match(name):
            raise UsageError(f"splits file {str(path)!r}: {name!r} is not a split name", "use names such as train, val, test")
        patterns = [value] if isinstance(value, str) else value
        if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise UsageError(f"splits file {str(path)!r}: split {name!r} must name a shard pattern or a list of them", example)
        out[name] = patterns
    return out


def wds_manifest(spec: str, label: str = CLS, labels: str = "dense") -> Manifest:
    """The manifest of ``--dataset wds:...`` (see the module docstring); shard listings come from the cache where unchanged."""
    by_split, splits_file = split_patterns(spec)
    every = [s for shards in by_split.values() for s in shards]
    for split, shards in by_split.items():
        if not shards:
            raise UsageError(f"split {split!r} names no shards", "give every split at least one shard")
    repeated = sorted(s for s, n in Counter(every).items() if n > 1)
    if repeated:
        raise UsageError(f"shard {repeated[0]!r} is in more than one split", "each shard belongs to one split")
    label_source(label)  # a bad --wds-label is refused before any shard is read
    root = _common_root(every)
    split_of = {s: split for split, shards in by_split.items() for s in shards}
    skipped: list[str] = []
    rows: dict[str, list[tuple[str, str | None, str]]] = {split: [] for split in by_split}  # (identity, label text, problem)
    where: dict[str, list[tuple[int, int, int]]] = {split: [] for split in by_split}  # (shard index, offset, size) by row
    problems: dict[str, str] = {}
    # shard by shard, in order: a listing is let go once its rows are taken (the listings of a large set do not fit at once)
    for number, (shard, listing) in enumerate(_listings(every, label)):
        if listing.damage:
            skipped.append(f"shard {shard}: {listing.damage}")
        out, at = rows[split_of[shard]], where[split_of[shard]]
        for identity, text, offset, size, problem in _rows(listing, _relative(shard, root)):
            out.append((identity, text, problem))
            at.append((number, offset, size))
            if problem:
                problems[identity] = problem
    identities = [i for r in rows.values() for i, _, _ in r]
    if len(set(identities)) != len(identities):
        dup = next(i for i, n in Counter(identities).items() if n > 1)
        raise UsageError(
            f"sample {dup!r} appears twice (its members are not consecutive in the shard)",
            "write each sample's members one after another, as WebDataset's writers do",
        )
    if not identities:
        raise UsageError(f"{spec!r} holds no samples", "pass WebDataset shards (tar files of <key>.<ext> members)")
    class_names, index, mode = _label_map([(i, t) for split in rows.values() for i, t, _ in split if t is not None], labels)
    splits = {
        split: SplitManifest(split, tuple(i for i, _, _ in r), np.asarray([index[t] if t is not None else 0 for _, t, _ in r], np.int32))
        for split, r in rows.items()
    }
    del identities
    table = ShardRows(
        shards=tuple(every),
        paths={split: m.paths for split, m in splits.items()},  # the very tuples of the manifest: no copy
        shard={split: np.asarray([w[0] for w in where[split]], np.int32) for split in splits},
        offset={split: np.asarray([w[1] for w in where[split]], np.int64) for split in splits},
        size={split: np.asarray([w[2] for w in where[split]], np.int64) for split in splits},
        problems=problems,
        label=label,
    )
    name = splits_file.stem if splits_file is not None else (Path(root).name or "wds")
    return Manifest(
        name,
        Path(root),
        class_names,
        splits,
        skipped=skipped,
        label_mapping="sparse" if mode == "sparse" else "",
        shards=table,
    )


def _listings(shards: list[str], label: str) -> Iterator[tuple[str, ShardListing]]:
    """Every shard's listing, in order: cached ones read as they come, the others made ahead on a pool. Listing
    parses every tar header in Python (~40 µs a sample), so many local shards are listed in processes, one
    per core; a few, or URLs (which wait on the network), on threads."""
    missing = [s for s in shards if not cache_holds(s, label)]
    workers = min(len(missing), os.cpu_count() or 1)
    if len(missing) >= PROCESS_POOL_FROM and workers > 1 and not any(is_url(s) for s in missing):
        # spawn: the caller may hold torch and DALI threads, which a fork would copy half-made
        pool: Executor = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
    else:
        pool = ThreadPoolExecutor(LISTING_THREADS)
    with pool:
        # the pool writes each listing to the cache, and hands back only what the cache could not keep
        made = dict(zip(missing, pool.map(partial(_list_quietly, label=label), missing)))
    for shard in shards:
        listing = made.get(shard) or read_cached(shard, label) or list_shard(shard, label)
        yield shard, listing


def _list_quietly(shard: str, label: str) -> ShardListing | None:
    """``list_shard`` for a pool: the listing stays in the cache (None comes back) unless the cache cannot hold it
    (a read-only home)."""
    listing = list_shard(shard, label)
    return None if cache_holds(shard, label) else listing


def _rows(listing: ShardListing, shard_name: str):
    """(identity, label text, offset, size, problem) per sample of a shard."""
    for sample in listing.samples:
        image = next((ext for ext in IMAGE_COMPONENTS if ext in sample.components), None)
        why = []
        if image is None:
            have = ", ".join(sorted(sample.components)) or "none"
            why.append(f"no image component (.{'/.'.join(IMAGE_COMPONENTS[:3])}/…; it has {have})")
        elif image in sample.truncated:
            why.append(f"its .{image} component is truncated (the shard ends inside it)")
        if sample.label is None:
            why.append(f"no label: {sample.label_problem}")
        offset, size = sample.components[image] if image is not None else (-1, -1)
        yield f"{shard_name}/{sample.key}", sample.label, offset, size, "; ".join(why)


def _common_root(shards: list[str]) -> str:
    if all(not is_url(s) for s in shards):
        return os.path.commonpath([os.path.dirname(s) for s in shards])
    # by characters, then cut back to the last "/": commonpath would fold the "//" of s3://
    prefix = os.path.commonprefix([s.rsplit("/", 1)[0] + "/" for s in shards])  # noqa: RUF071
    return prefix[: prefix.rfind("/")] if "/" in prefix else prefix


def _relative(shard: str, root: str) -> str:
    if is_url(shard):
        return shard[len(root) :].lstrip("/")
    return os.path.relpath(shard, root).replace(os.sep, "/")


def _label_map(labelled: list[tuple[str, str]], mode: str) -> tuple[tuple[str, ...], dict[str, int], str]:
    """Class names and each label text's class: integers dense (0..C-1, each used) or sparse, or names sorted."""
    if mode not in ("dense", "sparse"):
        raise UsageError(f"unknown --labels {mode!r}", "use one of dense, sparse")
    if not labelled:
        return ("0",), {}, "dense"
    numeric = [(i, t) for i, t in labelled if re.fullmatch(r"[+-]?\d+", t)]
    if numeric and len(numeric) != len(labelled):
        name = next((i, t) for i, t in labelled if not re.fullmatch(r"[+-]?\d+", t))
        raise UsageError(
            f"sample {numeric[0][0]!r} has the integer label {numeric[0][1]!r} but sample {name[0]!r} the name {name[1]!r}",
            "use integer labels 0..C-1 throughout, or class names throughout",
        )
    if not numeric:
        names = tuple(sorted({t for _, t in labelled}))
        return names, {c: i for i, c in enumerate(names)}, "names"
    values = {t: int(t) for _, t in labelled}
    negative = next(((i, t) for i, t in labelled if values[t] < 0), None)
    if negative:
        raise UsageError(f"sample {negative[0]!r} has the negative label {negative[1]}", "integer labels must be 0..C-1")
    distinct = sorted(set(values.values()))
    if mode == "sparse":
        position = {v: i for i, v in enumerate(distinct)}
        return tuple(str(v) for v in distinct), {t: position[v] for t, v in values.items()}, "sparse"
    if len(distinct) != distinct[-1] + 1:
        missing = next(i for i, v in enumerate(distinct) if i != v)
        raise UsageError(
            f"integer labels must be 0..C-1, each used, but they run to {distinct[-1]} with {len(distinct)} distinct values "
            f"({missing} is the first unused)",
            f"relabel them 0..{len(distinct) - 1}, or pass --labels sparse to make the distinct labels classes 0..K-1 in sorted order",
        )
    return tuple(str(v) for v in distinct), dict(values), "dense"


def shard_files(manifest: Manifest) -> list[str]:
    """The local shard files of a shard dataset (what the up-to-date memo stamps); URLs are not stamped."""
    if manifest.shards is None:
        return []
    return [s for s in manifest.shards.shards if not is_url(s)]
