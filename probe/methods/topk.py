"""Top-1 and top-5 accuracy from ranked class predictions: the one scoring rule of every method
(linear heads, k-NN, logistic regression).

A ranking holds each row's best classes, best first, ``min(5, C)`` of them: its first column is
the top-1 prediction, so top-1 and top-5 are read off one ranking and agree image by image.
Top-5 is scored only when the ranking holds 5 classes (a problem of >= 5 classes); below that
every row's label would be among its ranked classes. Works on numpy arrays and torch tensors
alike (hits are counted where the ranking lives: on the device for torch).
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import torch
from numpy.typing import NDArray

# a ranking and its labels: numpy arrays or torch tensors (counted where they live)
Array = TypeVar("Array", NDArray[Any], torch.Tensor)

TOP5 = 5


def hits(ranked: Array, labels: Array) -> tuple[Array, Array]:
    """(top-1 hits, top-5 hits): how many rows of ``ranked`` ((N, ..., k) class indices, best
    first; ``labels``: (N,)) have the label first / among their k classes, per trailing index
    (shape ``...``)."""
    hit = ranked == labels.reshape(tuple(labels.shape) + (1,) * (ranked.ndim - 1))
    return hit[..., 0].sum(0), hit.any(-1).sum(0)


def percent(top1_hits: NDArray[Any], top5_hits: NDArray[Any], n: int, classes: int) -> dict[str, NDArray[np.float64]]:
    """Hit counts (numpy) over ``n`` rows as percentages (float64): ``top1`` and, with
    ``classes`` >= 5 (the problem's classes, or a ranking's width: min(5, C) is >= 5 exactly
    when C is), ``top5``."""
    out = {"top1": np.asarray(top1_hits) * 100.0 / max(n, 1)}
    if classes >= TOP5:
        out["top5"] = np.asarray(top5_hits) * 100.0 / max(n, 1)
    return out


def accuracy(ranked: NDArray[np.int64], labels: NDArray[np.int64]) -> dict[str, NDArray[np.float64]]:
    """Top-1 and (rankings of 5 classes) top-5 accuracy in percent of ``ranked`` ((N, ..., k)
    numpy class indices, best first) against ``labels`` (N,), per trailing index."""
    return percent(*hits(ranked, labels), len(labels), ranked.shape[-1])
