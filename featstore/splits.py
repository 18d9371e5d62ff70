"""Seeded, stratified train/val/test splits of a dataset that has none (``--split train=0.7,val=0.1,test=0.2``).

Each image's place is decided by a hash of the seed and its path relative to the dataset root, so the
same files with the same seed give the same splits on any machine, in any listing order. Within each
class the images are ranked by that hash and cut at ``round(n * cumulative fraction)``: every class is
split in the asked proportions (to within one image), and adding or removing one image of a class
moves at most one of its other images across each cut, to the neighbouring split (m images: at most
m across each cut).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass

import numpy as np

from .errors import UsageError
from .manifest import Manifest, SplitManifest

SPLIT_NAMES = ("train", "val", "test")
RULE = "per class: rank by sha256(seed, relative path), cut at round(n x cumulative fraction)"


@dataclass(frozen=True)
class SplitSpec:
    """The fractions, in the order typed (train, val, test in any subset), and the seed."""

    fractions: tuple[tuple[str, float], ...]
    seed: int = 0

    def to_dict(self) -> dict:
        return {"fractions": dict(self.fractions), "seed": self.seed, "rule": RULE}

    def text(self) -> str:
        return ",".join(f"{name}={fraction:g}" for name, fraction in self.fractions)


def parse_split(text: str, seed: int = 0) -> SplitSpec:
    """``train=0.7,val=0.1,test=0.2`` → a SplitSpec; a bad spec is a one-line UsageError."""
    example = "e.g. --split train=0.7,val=0.1,test=0.2"
    fractions: list[tuple[str, float]] = []
    for part in text.split(","):
        name, eq, value = (s.strip() for s in part.partition("="))
        if not eq or not name:
            raise UsageError(f"--split {text!r}: {part.strip()!r} is not NAME=FRACTION", example)
        if name not in SPLIT_NAMES:
            raise UsageError(f"--split {text!r}: unknown split name {name!r}", f"use the names {', '.join(SPLIT_NAMES)}; {example}")
        if name in dict(fractions):
            raise UsageError(f"--split {text!r} names {name!r} twice", example)
        try:
            fraction = float(value)
        except ValueError:
            raise UsageError(f"--split {text!r}: {value!r} is not a number", example) from None
        if not (0 < fraction <= 1) or not math.isfinite(fraction):
            raise UsageError(f"--split {text!r}: the fraction of {name!r} must be in (0, 1], got {value}", example)
        fractions.append((name, fraction))
    if len(fractions) < 2:
        raise UsageError(f"--split {text!r} makes a single split", f"name at least two, {example}")
    total = sum(f for _, f in fractions)
    if abs(total - 1) > 1e-6:
        raise UsageError(f"--split {text!r}: the fractions sum to {total:g}, not 1", example)
    return SplitSpec(tuple(fractions), seed)


def split_key(seed: int, path: str) -> int:
    """The image's rank key: the first 8 bytes of sha256(seed, path), path relative and '/'-separated."""
    # a name that is not UTF-8 is held surrogate-escaped (manifest.stored_path): hashed as its raw bytes
    return int.from_bytes(hashlib.sha256(f"{seed}\0{path}".encode("utf-8", "surrogateescape")).digest()[:8], "big")


def cuts(n: int, spec: SplitSpec) -> list[int]:
    """Where the ranked images of a class of ``n`` are cut: ``round(n * cumulative fraction)``, nondecreasing in n."""
    out, cumulative = [0], 0.0
    for _, fraction in spec.fractions:
        cumulative += fraction
        out.append(min(n, math.floor(n * cumulative + 0.5)))
    out[-1] = n
    return out


def min_class_size(spec: SplitSpec) -> int:
    """The fewest images a class needs for one image in every split."""
    n = 1
    while min(np.diff(cuts(n, spec))) < 1:
        n += 1
    return n


def apply_split(manifest: Manifest, spec: SplitSpec) -> Manifest:
    """The manifest's single split re-cut into ``spec``'s splits, stratified per class."""
    if set(manifest.splits) != {"all"}:
        have = ", ".join(sorted(manifest.splits))
        raise UsageError(
            f"--split re-splits a dataset without splits, but {manifest.name!r} already has {have}",
            "leave out --split to use its own splits (or pass a folder of class folders / a CSV without a split column)",
        )
    whole = manifest.splits["all"]
    labels = whole.labels
    need = min_class_size(spec)
    assigned: dict[str, tuple[list[str], list[int]]] = {name: ([], []) for name, _ in spec.fractions}
    for label in range(len(manifest.class_names)):
        members = sorted((split_key(spec.seed, whole.paths[i]), whole.paths[i]) for i in np.flatnonzero(labels == label))
        if not members:
            continue
        if len(members) < need:
            raise UsageError(
                f"class {manifest.class_names[label]!r} has {len(members)} images; --split {spec.text()} needs at least "
                f"{need} per class to put one in every split",
                "add images to that class, or use fewer splits / larger fractions",
            )
        at = cuts(len(members), spec)
        for (name, _), start, stop in zip(spec.fractions, at[:-1], at[1:]):
            paths, split_labels = assigned[name]
            paths += sorted(p for _, p in members[start:stop])
            split_labels += [label] * (stop - start)
    splits = {name: SplitManifest(name, tuple(p), np.asarray(y, np.int32)) for name, (p, y) in assigned.items()}
    return dataclasses.replace(manifest, splits=splits, split=spec.to_dict())
