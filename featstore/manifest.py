"""The frozen dataset manifest: per split, image paths (relative to a root) and labels."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class SplitManifest:
    """One split: ``paths[i]`` (relative to the dataset root, '/'-separated) has label ``labels[i]``."""

    name: str
    paths: tuple[str, ...]
    labels: np.ndarray = field(compare=False)

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class Manifest:
    name: str
    root: Path
    class_names: tuple[str, ...]
    splits: dict[str, SplitManifest]
    split: dict | None = field(default=None, compare=False)  # how --split drew the splits (splits.py), if it did
    # what the dataset walk left out (FIFOs, broken links, folders reached twice): one log line per reason
    skipped: list[str] = field(default_factory=list, compare=False)
    # "sparse": a CSV's integer labels mapped, sorted, to classes 0..K-1; class_names[i] is the label of class i
    label_mapping: str = ""
    # a dataset read from tar shards (WebDataset, ``wds_dataset``): where each row's image is; None for files
    shards: ShardRows | None = field(default=None, compare=False)

    @property
    def sha256(self) -> str:
        """A digest of everything that decides which rows exist and what their labels are."""
        h = hashlib.sha256()
        # file names are bytes on POSIX: one that is not UTF-8 is held as surrogate-escaped text and
        # digested as its raw bytes (plain .encode() refused it and aborted the run)
        h.update("\n".join(self.class_names).encode("utf-8", "surrogateescape"))
        for split_name in sorted(self.splits):
            split = self.splits[split_name]
            h.update(f"\n#split {split_name} {len(split)}\n".encode())
            for path, label in sorted(zip(split.paths, split.labels.tolist())):
                h.update(f"{path}\t{label}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def stored_paths(self, split: str) -> list[str]:
        """The split's paths as a store keeps them (UTF-8 text): a name with bytes that are not
        UTF-8 becomes its text with those bytes written ``\\xNN``; ``raw_paths`` keeps the bytes."""
        return [stored_path(p) for p in self.splits[split].paths]

    def raw_paths(self) -> dict[str, dict[str, str]]:
        """Per split, row → the raw bytes (hex) of each path that is not UTF-8: the lossless record
        of what ``stored_paths`` had to escape."""
        out: dict[str, dict[str, str]] = {}
        for name, split in self.splits.items():
            raw = {str(row): os.fsencode(p).hex() for row, p in enumerate(split.paths) if stored_path(p) != p}
            if raw:
                out[name] = raw
        return out

    def absolute_paths(self, split: str) -> list[str]:
        return [str(self.root / p) for p in self.splits[split].paths]

    def sources(self, split: str) -> list[str]:
        """What the loaders read for each row: a file's absolute path, or for shards a member reference (``member_ref``)."""
        if self.shards is None:
            return self.absolute_paths(split)
        return self.shards.sources(self.splits[split].paths)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "root": str(self.root),
            "class_names": list(self.class_names),
            "num_classes": len(self.class_names),
            "splits": {k: len(v) for k, v in self.splits.items()},
            "manifest_sha256": self.sha256,
            **({"split": self.split} if self.split else {}),
            **({"raw_paths": raw} if (raw := self.raw_paths()) else {}),
            **({"skipped": list(self.skipped)} if self.skipped else {}),
            **({"label_mapping": f"{self.label_mapping}: class i is the integer label class_names[i]"} if self.label_mapping else {}),
            **({"shards": self.shards.describe()} if self.shards is not None else {}),
        }


@dataclass(frozen=True)
class ShardRows:
    """Where each image of a dataset read from tar shards is: per split as the shards gave it, row by row,
    the shard and the image member's byte range. ``problems``: rows known invalid before any read (no image
    component, truncated, no label), by row identity (``<shard>/<key>``)."""

    shards: tuple[str, ...]  # absolute paths or URLs
    paths: dict[str, tuple[str, ...]]  # split → its rows' identities (the manifest's own tuples)
    shard: dict[str, np.ndarray]  # split → int32 index into shards, by row
    offset: dict[str, np.ndarray]  # split → int64 byte offset of each image member's data
    size: dict[str, np.ndarray]  # split → int64 its size
    problems: dict[str, str]
    label: str = "cls"  # where the labels came from (--wds-label)

    def sources(self, paths: tuple[str, ...] | list[str]) -> list[str]:
        """The member reference of each row identity in ``paths``: a split's rows as listed (the usual case,
        no lookup), or rows that ``--split`` drew anew (looked up by identity)."""
        where: Iterable[tuple[int, int, int]]
        found = next((s for s, own in self.paths.items() if paths is own or (len(paths) == len(own) and tuple(paths) == own)), None)
        if found is not None:
            where = zip(self.shard[found].tolist(), self.offset[found].tolist(), self.size[found].tolist())
        else:
            where = (self._by_identity[p] for p in paths)
        return [
            member_ref(self.shards[s], -1, -1, problem) if (problem := self.problems.get(p)) else member_ref(self.shards[s], o, n)
            for p, (s, o, n) in zip(paths, where)
        ]

    @cached_property
    def _by_identity(self) -> dict[str, tuple[int, int, int]]:
        """identity → (shard, offset, size): made only for a manifest re-split by ``--split``."""
        return {
            p: (s, o, n)
            for split, own in self.paths.items()
            for p, s, o, n in zip(own, self.shard[split].tolist(), self.offset[split].tolist(), self.size[split].tolist())
        }

    def describe(self) -> dict:
        return {"count": len(self.shards), "first": self.shards[0] if self.shards else None, "label": self.label}


def member_ref(shard: str, offset: int, size: int, problem: str = "") -> str:
    """A tar member as the loaders are handed it: ``SHARD#OFFSET:SIZE``, or ``SHARD#!REASON`` for a row known invalid."""
    return f"{shard}#!{problem}" if problem else f"{shard}#{offset}:{size}"


def parse_member_ref(ref: str) -> tuple[str, int, int, str]:
    """``member_ref``'s (shard, offset, size, problem)."""
    m = re.search(r"#(\d+):(\d+)$", ref)
    if m:
        return ref[: m.start()], int(m.group(1)), int(m.group(2)), ""
    at = ref.find("#!")  # a reason may hold '#': the first '#!' ends the shard's name
    return ref[:at], -1, -1, ref[at + 2 :]


def stored_path(path: str) -> str:
    """``path`` as UTF-8 text: unchanged when it is valid UTF-8, else its undecodable bytes as ``\\xNN``."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    return path


def unstored_paths(stored: Iterable[str], raw: object) -> tuple[str, ...]:
    """The manifest's own names of a split's ``stored`` paths: each row that ``raw`` (the split's
    ``raw_paths`` record, row → hex bytes) names is its raw bytes, surrogate-escaped as the walk
    held them, so the manifest digest is the one taken. A record that cannot be read is ignored
    (the digest then differs, which is what it is for)."""
    out = list(stored)
    if isinstance(raw, dict):
        for row, hexed in raw.items():
            try:
                r, name = int(row), os.fsdecode(bytes.fromhex(hexed))
            except (TypeError, ValueError):
                continue
            if 0 <= r < len(out) and stored_path(name) == out[r]:
                out[r] = name
    return tuple(out)
