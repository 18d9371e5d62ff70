"""The frozen dataset manifest: per split, image paths (relative to a root) and labels."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
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

    @property
    def sha256(self) -> str:
        """A digest of everything that decides which rows exist and what their labels are."""
        h = hashlib.sha256()
        h.update("\n".join(self.class_names).encode())
        for split_name in sorted(self.splits):
            split = self.splits[split_name]
            h.update(f"\n#split {split_name} {len(split)}\n".encode())
            for path, label in sorted(zip(split.paths, split.labels.tolist())):
                h.update(f"{path}\t{label}\n".encode())
        return h.hexdigest()

    def absolute_paths(self, split: str) -> list[str]:
        return [str(self.root / p) for p in self.splits[split].paths]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "root": str(self.root),
            "class_names": list(self.class_names),
            "num_classes": len(self.class_names),
            "splits": {k: len(v) for k, v in self.splits.items()},
            "manifest_sha256": self.sha256,
            **({"split": self.split} if self.split else {}),
        }
