"""Honest selection: which rows train, which select, which report, and which head is chosen.

The reported split is never an input to :func:`choose` (unless the user asks for
``select_on="report"``, which every output then labels "max over the reported split"); the
holdout depends only on the labels and the seed, so two stores of the same dataset hold out the
same rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from featstore.errors import UsageError


@dataclass(frozen=True)
class SplitPlan:
    """Where each role's rows come from. Indices are into the named store split (all its rows)."""

    train_split: str
    train_rows: np.ndarray
    select_split: str  # a store split name, or "holdout" (a seeded part of the train split)
    select_source: str  # the store split the selection rows are read from
    select_rows: np.ndarray
    report_split: str | None  # the split reported once; None when the store has nothing left to report on
    report_source: str | None
    report_rows: np.ndarray | None
    select_on: str  # the protocol's rule: auto | holdout | report
    val_fraction: float
    test_fraction: float | None = None  # set when the reported rows were drawn from the store's only split

    @property
    def selects_on_report(self) -> bool:
        """True only when the user opted in to choosing the LR on the reported split itself."""
        return self.report_split is not None and self.report_split == self.select_split

    @property
    def reported_role(self) -> str | None:
        """Whose rows the reported numbers come from: ``"report"`` (a split apart from the selection
        rows), ``"select"`` (--select-on report: the selection rows, evaluated once, are the
        reported ones) or None (nothing is reported)."""
        if self.report_split is None:
            return None
        return "select" if self.selects_on_report else "report"

    @property
    def selection_label(self) -> str:
        if self.select_split != "holdout":
            return self.select_split
        what = "train" if self.train_split == "train" else repr(self.train_split)
        rest = " (of the rows left after the test draw)" if self.test_fraction is not None else ""
        return f"a {self.val_fraction * 100:g}% {what} holdout{rest}"

    @property
    def reported_as(self) -> str:
        """What the reported number is, in words: the label every output carries."""
        if self.report_split is None:
            return f"nothing reported (the store's only split is {self.train_split!r}; selection on {self.selection_label})"
        if self.test_fraction is not None:
            drawn = f"a seeded, stratified {self.test_fraction * 100:g}% of {self.train_split!r} drawn before selection"
            if self.selects_on_report:
                return f"{self.report_split} ({drawn}; max over the reported split)"
            return f"{self.report_split} ({drawn}; reported; selection on {self.selection_label})"
        if self.selects_on_report:
            where = f", {self.selection_label}" if self.select_split == "holdout" else ""
            return f"{self.report_split} (max over the reported split{where})"
        return f"{self.report_split} (reported; selection on {self.selection_label})"


def described(plan: SplitPlan, fixed: str | None, refit: bool = False) -> str:
    """``plan.reported_as``, or with a protocol that selects nothing (``fixed``: its one setting,
    e.g. ``lr 0.01``) the same without selection words: ``test (reported; fixed lr 0.01, nothing
    selected)``. What becomes of a train holdout then is said: with ``refit`` (the protocol's) the
    reported model is trained again on train + holdout, without it the holdout is left out, unused."""
    if fixed is None:
        return plan.reported_as
    unused = ""
    if plan.select_split == "holdout":
        if refit and plan.report_split is not None:
            unused = f"; trained on train + {plan.selection_label} (refit)"
        else:
            unused = f"; {plan.selection_label} kept out of training, unused"
    what = f"fixed {fixed}, nothing selected{unused}"
    if plan.report_split is None:
        return f"nothing reported (the store's only split is {plan.train_split!r}; {what})"
    if plan.test_fraction is not None:
        return f"{plan.report_split} (a seeded, stratified {plan.test_fraction * 100:g}% of {plan.train_split!r}; reported; {what})"
    return f"{plan.report_split} (reported; {what})"


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


DRAWN_TEST = "drawn-test"  # the report split --test-fraction draws from a store's only split


def plan_splits(
    store_path: str,
    sizes: dict[str, int],
    train_labels_of,
    val_fraction: float,
    seed: int,
    select_on: str = "auto",
    *,
    test_fraction: float | None = None,
    test_seed: int = 0,
) -> SplitPlan:
    """Train on ``train`` (or a store's only split), report once on ``test`` (else ``val``), and
    select on a split that is never the reported one unless ``select_on == "report"``.

    ``select_on``: ``auto`` selects on ``val`` when ``test`` is the reported split and on a seeded
    ``val_fraction`` holdout of train otherwise (ImageNet's train + val: select on the holdout,
    report val); ``holdout`` always uses the holdout; ``report`` selects on the reported split.
    ``sizes``: split name → rows; ``train_labels_of(split)`` gives a split's labels (read only
    when a holdout is needed). ``test_fraction`` (a store with one split only): that share of
    every class is drawn as the report split :data:`DRAWN_TEST` with ``test_seed`` (the same rows
    for every run seed and every store of the dataset), before anything else is held out.
    """
    if test_fraction is not None:
        return _plan_drawn_test(store_path, sizes, train_labels_of, val_fraction, seed, select_on, test_fraction, test_seed)
    splits = list(sizes)
    if "train" in splits:
        train_split = "train"
    elif len(splits) == 1:
        train_split = splits[0]
    else:
        raise UsageError(
            f"store {store_path!r} has no 'train' split (it has: {', '.join(splits)})", "a probe trains on the split named 'train'"
        )
    report = next((s for s in ("test", "val") if s in splits and s != train_split), None)
    everything = np.arange(sizes[train_split])
    common: dict[str, Any] = dict(train_split=train_split, select_on=select_on, val_fraction=val_fraction)
    if select_on == "report" and report is not None:
        rows = np.arange(sizes[report])
        return SplitPlan(train_rows=everything, select_split=report, select_source=report, select_rows=rows,
                         report_split=report, report_source=report, report_rows=rows, **common)  # fmt: skip
    if select_on == "auto" and report == "test" and "val" in splits and train_split != "val":
        return SplitPlan(train_rows=everything, select_split="val", select_source="val", select_rows=np.arange(sizes["val"]),
                         report_split="test", report_source="test", report_rows=np.arange(sizes["test"]), **common)  # fmt: skip
    train_rows, hold = stratified_holdout(train_labels_of(train_split), val_fraction, seed)
    if len(hold) == 0:
        raise UsageError(
            f"store {store_path!r}: no rows to hold out for selection from split {train_split!r}",
            "the split is too small; raise --val-fraction or add a 'val' split",
        )
    held: dict[str, Any] = dict(train_rows=train_rows, select_split="holdout", select_source=train_split, select_rows=hold)
    if report is None:
        # a single split: the holdout is all there is; reported only on explicit request, labelled
        if select_on == "report":
            return SplitPlan(**held, report_split="holdout", report_source=train_split, report_rows=hold, **common)
        return SplitPlan(**held, report_split=None, report_source=None, report_rows=None, **common)
    return SplitPlan(**held, report_split=report, report_source=report, report_rows=np.arange(sizes[report]), **common)


def single_split_advice(store_path: str) -> str:
    """What to run when a store's only split leaves nothing to report on: the exact command."""
    import shlex

    return (
        f"to report a number, rerun with a drawn test split: `probe fit --store {shlex.quote(store_path)} --test-fraction 0.2` "
        "(with your other options; 20% of every class, seeded, drawn before selection), or extract the dataset with its own "
        "splits: `featstore extract ... --split train=0.7,val=0.1,test=0.2`"
    )


def _plan_drawn_test(
    store_path: str, sizes: dict[str, int], labels_of, val_fraction: float, seed: int, select_on: str, test_fraction: float, test_seed: int
) -> SplitPlan:
    """--test-fraction: the report rows drawn first (seeded, stratified), then the selection
    holdout from the rest, so the reported rows never train or select (unless --select-on report)."""
    splits = list(sizes)
    if len(splits) != 1:
        raise UsageError(
            f"--test-fraction draws a test split from a store's only split, but store {store_path!r} has {', '.join(splits)}",
            "drop --test-fraction: the store's own test (else val) split is reported",
        )
    (only,) = splits
    labels = labels_of(only)
    rest, test = stratified_holdout(labels, test_fraction, test_seed)
    if len(test) == 0:
        raise UsageError(f"store {store_path!r}: no rows to draw a test split from {only!r}", "the split is too small")
    common: dict[str, Any] = dict(train_split=only, select_on=select_on, val_fraction=val_fraction, test_fraction=test_fraction)
    drawn: dict[str, Any] = dict(report_split=DRAWN_TEST, report_source=only, report_rows=test)
    if select_on == "report":
        return SplitPlan(train_rows=rest, select_split=DRAWN_TEST, select_source=only, select_rows=test, **drawn, **common)
    keep, hold = stratified_holdout(labels[rest], val_fraction, seed)
    if len(hold) == 0:
        raise UsageError(
            f"store {store_path!r}: no rows left to hold out for selection after the test draw",
            "raise --val-fraction or lower --test-fraction",
        )
    return SplitPlan(train_rows=rest[keep], select_split="holdout", select_source=only, select_rows=rest[hold], **drawn, **common)


def choose(
    scores: Sequence[float] | NDArray[np.floating[Any]],
    keys: Sequence[tuple[float, ...]],
    usable: Sequence[bool] | NDArray[np.bool_] | None = None,
) -> int:
    """The one selection rule of every method: the index of the highest score among the usable,
    non-NaN entries; ties go to the smallest key tuple (the smaller lr then wd, the smaller k, the
    smaller C); -1 when no entry is usable.

    The scores are the selection split's top-1 when choosing a configuration, the reported split's
    only for the clearly labelled best-of-sweep (``best_report``)."""
    candidates = [i for i in range(len(scores)) if (usable is None or usable[i]) and not math.isnan(scores[i])]
    if not candidates:
        return -1
    return min(candidates, key=lambda i: (-scores[i], keys[i]))


def refits(refit: bool, reported_role: str | None, shots: int | None, select_split: str, *, val: bool = False) -> bool:
    """Whether the reported model is fit once more after selection, on the training rows and the
    selection rows together, at the chosen setting (scikit-learn's ``GridSearchCV(refit=True)``),
    so that the reported number uses every training row, as the authors' protocols do.

    Only when ``refit`` (the protocol's), when a split apart from the selection rows is reported
    (a refit on the reported rows, ``--select-on report``, or with nothing to report would mean
    nothing), on every training row (a few-shot refit would add the whole selection split to k
    examples per class), and when the selection rows are a holdout of the training split — or,
    with ``val`` (logistic regression, as DINOv2's), a val split as well."""
    return refit and reported_role == "report" and shots is None and (select_split == "holdout" or val)
