"""Small helpers only the tests use (kept out of the package)."""

from __future__ import annotations

from pathlib import Path


def digit_index_from_path(path: str) -> int:
    """The row of ``sklearn.datasets.load_digits()`` a digits image was written from (its file name)."""
    return int(Path(path).stem)


def read_checkpoint(path: str | Path, trust: bool = False) -> dict:
    """The backbone tensors of a checkpoint file, loaded safely, with wrappers, copies and prefixes removed."""
    from featstore.models.checkpoints import load_checkpoint

    return load_checkpoint(path, trust).tensors
