"""Honest selection: which rows train, which select, which report, and which head is chosen.

The test split is never an input to :func:`select`; the holdout depends only on the labels and
the seed, so two stores of the same dataset hold out the same rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from featstore.errors import UsageError


@dataclass(frozen=True)
class SplitPlan:
    """Where each role's rows come from. Indices are into the named store split (all its rows)."""

    train_split: str
    train_rows: np.ndarray
    select_split: str  # a store split name, or "holdout" (a seeded part of the train split)
    select_source: str  # the store split the selection rows are read from
    select_rows: np.ndarray
    report_split: str  # "test", or the selection split when the store has no test split

    @property
    def has_test(self) -> bool:
        return self.report_split == "test"


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into (train, holdout), ``fraction`` of every class held out, seeded.

    A class with a single row stays in train; any class with 2+ rows gives at least one.
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(labels))
    held = []
    for cls in np.unique(labels):
        members = perm[labels[perm] == cls]
        if len(members) < 2:
            continue
        k = min(len(members) - 1, max(1, round(fraction * len(members))))
        held.append(members[:k])
    hold = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    mask = np.ones(len(labels), bool)
    mask[hold] = False
    return np.flatnonzero(mask), hold


def plan_splits(store_path: str, sizes: dict[str, int], train_labels_of, val_fraction: float, seed: int) -> SplitPlan:
    """Train on ``train`` (or a store's only split), select on ``val`` or a holdout, report on ``test``.

    ``sizes``: split name → rows; ``train_labels_of(split)`` gives a split's labels (read only
    when a holdout is needed).
    """
    splits = list(sizes)
    if "train" in splits:
        train_split = "train"
    elif len(splits) == 1:
        train_split = splits[0]
    else:
        raise UsageError(f"store {store_path!r} has no 'train' split (it has: {', '.join(splits)})", "a probe trains on the split named 'train'")
    if "val" in splits and train_split != "val":
        plan = dict(train_rows=np.arange(sizes[train_split]), select_split="val", select_source="val", select_rows=np.arange(sizes["val"]))
    else:
        train_rows, hold = stratified_holdout(train_labels_of(train_split), val_fraction, seed)
        if len(hold) == 0:
            raise UsageError(
                f"store {store_path!r}: no rows to hold out for validation from split {train_split!r}",
                "the split is too small; add a 'val' split or raise --val-fraction",
            )
        plan = dict(train_rows=train_rows, select_split="holdout", select_source=train_split, select_rows=hold)
    report = "test" if "test" in splits and train_split != "test" else plan["select_split"]
    return SplitPlan(train_split=train_split, report_split=report, **plan)


def select(val_top1: np.ndarray, lrs, wds, finite: np.ndarray) -> int:
    """Index of the head with the highest validation top-1; ties go to the smaller LR, then smaller wd."""
    candidates = [h for h in range(len(val_top1)) if finite[h] and not math.isnan(val_top1[h])]
    if not candidates:
        return -1
    return min(candidates, key=lambda h: (-val_top1[h], lrs[h], wds[h]))


def best_by(metric: np.ndarray, lrs, wds, finite: np.ndarray) -> int:
    """The best head by ``metric`` with the same tie rule (used for the clearly labelled best-of-sweep)."""
    return select(metric, lrs, wds, finite)
