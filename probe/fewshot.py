"""Few-shot training sets: ``shots`` rows of every class, drawn once per seed.

The draw depends only on the split's labels, the seed, and which rows may be drawn (the
training rows that are usable), so every store and every method of a comparison trains on the
same rows. Rows are taken in the order of one seeded permutation of the whole split, class by
class: a larger shot count extends a smaller one (the 1-shot rows are among the 5-shot rows),
and a row a store cannot use is skipped for the next row of its class in that order.
"""

from __future__ import annotations

import numpy as np

from featstore.errors import UsageError


def parse_ints(text, *, what: str, option: str, minimum: int = 0, allow_all: bool = False, keep_order: bool = False) -> tuple[int, ...]:
    """``1,5,10`` (or a list of ints) → a sorted tuple of distinct ints >= ``minimum``.

    ``allow_all``: the word ``all`` is 0 (every row); ``keep_order``: keep the given order (seeds).
    """
    items = list(text) if isinstance(text, (list, tuple)) else str(text).split(",")
    values = []
    for item in items:
        if allow_all and str(item).strip().lower() == "all":
            values.append(0)
            continue
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise UsageError(f"bad {what} {text!r}: {str(item).strip()!r} is not an integer", f"pass {option} like 1,5,10") from None
        if not value.is_integer() or value < minimum:
            raise UsageError(f"bad {what} {text!r}: {str(item).strip()!r} is not an integer >= {minimum}", f"pass {option} like 1,5,10")
        values.append(int(value))
    if not values:
        raise UsageError(f"empty {what}", f"pass {option} like 1,5,10")
    return tuple(dict.fromkeys(values)) if keep_order else tuple(sorted(set(values)))


def permutation(num_rows: int, seed: int) -> np.ndarray:
    """The seeded order in which few-shot rows are drawn, over every row of the split."""
    return np.random.default_rng([seed, 0x5407]).permutation(num_rows)


def sample(labels: np.ndarray, usable: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Sorted row indices: the first ``shots`` usable rows of every class in the seeded order.

    ``labels``: the whole split's labels; ``usable``: bool mask (or indices) of the rows that
    may be drawn (e.g. valid training rows, holdout excluded). A class with fewer usable rows
    gives all it has (see :func:`shortfall`).
    """
    if shots < 1:
        raise UsageError(f"shots must be >= 1, got {shots}", "pass --shots like 1,5,10,25")
    labels = np.asarray(labels)
    mask = np.zeros(len(labels), bool)
    mask[usable] = True
    order = permutation(len(labels), seed)
    order = order[mask[order]]
    ranked = labels[order]
    # rank of each drawn row within its class, in permutation order
    sort = np.argsort(ranked, kind="stable")
    sorted_labels = ranked[sort]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.empty(len(order), np.int64)
    rank[sort] = np.arange(len(order)) - starts
    return np.sort(order[rank < shots])


def shortfall(labels: np.ndarray, rows: np.ndarray, shots: int) -> dict[int, int]:
    """Classes of the split (``labels``) that got fewer than ``shots`` of ``rows``: class → rows it
    got, 0 for a class with no usable training row at all."""
    labels = np.asarray(labels)
    present = np.unique(labels)
    counts = np.bincount(labels[rows], minlength=int(present.max(initial=-1)) + 1)
    return {int(c): int(counts[c]) for c in present if counts[c] < shots}
