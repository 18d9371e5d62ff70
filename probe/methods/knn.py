"""Weighted k-nearest-neighbour classification on cached features (the DINO/DINOv2 k-NN rule).

Rows are L2-normalised, so the dot product is the cosine similarity. Evaluated rows are taken
in chunks: each chunk costs one (chunk × N_train) similarity GEMM and one top-max(k) selection,
and that single selection serves every k of the grid (the k nearest neighbours are a prefix of
the max(k) nearest). A neighbour at similarity s votes for its class with weight exp(s / T)
(``weights="exp"``) or 1 (``"uniform"``); the class with the most votes wins. Vote ties go to
the smaller class index (as scikit-learn's ``KNeighborsClassifier``), so top-1 is deterministic.

Memory is bounded by ``chunk_elements`` (the similarity block), not by the number of evaluated
rows: ImageNet (1.28 M train × 50 k val) runs in blocks of a few hundred rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from featstore.errors import UsageError

from ..protocol import DEFAULT_KNN_TEMPERATURE as DEFAULT_TEMPERATURE
from ..protocol import check_knn as check_settings  # one check for Protocol and predict
from . import topk
from .heads import prepare

_CHUNK_ELEMENTS = 1 << 26  # similarity elements per chunk: 256 MiB in float32


@dataclass(frozen=True)
class KnnPredictions:
    """Per-k predictions of every evaluated row (row order as given)."""

    ks: tuple[int, ...]  # as asked (a k larger than the train set uses every train row)
    top1: NDArray[np.int64]  # (K, N) int64 class index
    top5: NDArray[np.int64]  # (K, N, min(5, C)) int64 class indices, best first

    def accuracy(self, labels: NDArray[np.int64]) -> dict[str, NDArray[np.float64]]:
        """Top-1 and (with >= 5 classes) top-5 accuracy in percent per k, as (K,) float64."""
        return topk.accuracy(self.top5.transpose(1, 0, 2), np.asarray(labels))  # rows first; top-1 is column 0


def l2_normalize(x: torch.Tensor, dtype: torch.dtype = torch.float32, chunk_rows: int = 1 << 16) -> torch.Tensor:
    """Rows scaled to unit length, as a new ``dtype`` tensor on x's device (a zero row stays zero):
    the linear probe's ``l2`` normalization."""
    return prepare(x, "l2", dtype, chunk_rows=chunk_rows)


@torch.no_grad()
def predict(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    query_x: torch.Tensor,
    ks: Sequence[int],
    num_classes: int,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    weights: str = "exp",
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> KnnPredictions:
    """k-NN predictions of every row of ``query_x`` for every k of ``ks``.

    ``train_x`` and ``query_x`` must already be L2-normalised (:func:`l2_normalize`), on one
    device, in one dtype (float32 is the default everywhere: the neighbour ranking is sensitive
    to rounding, and the similarity GEMM is a small part of the work).
    """
    ks = check_settings(ks, temperature, weights)
    n_train = train_x.shape[0]
    if n_train == 0:
        raise UsageError("k-NN needs at least one training row")
    effective = [min(k, n_train) for k in ks]
    k_max = effective[-1]
    n5 = min(5, num_classes)
    n_query = query_x.shape[0]
    dev = query_x.device
    top1 = torch.empty(len(ks), n_query, dtype=torch.int64, device=dev)
    top5 = torch.empty(len(ks), n_query, n5, dtype=torch.int64, device=dev)
    train_y = train_y.to(dev, torch.int64)
    train_t = train_x.t()
    step = max(1, chunk_elements // max(n_train, 1))
    for i in range(0, n_query, step):
        sim = torch.mm(query_x[i : i + step], train_t)
        values, index = sim.topk(k_max, dim=1, largest=True, sorted=True)
        del sim
        neighbour_labels = train_y[index]
        vote = values.float().div_(temperature).exp_() if weights == "exp" else torch.ones_like(values, dtype=torch.float32)
        votes = torch.zeros(values.shape[0], num_classes, dtype=torch.float32, device=dev)
        done = 0
        for j, k in enumerate(effective):
            # the k nearest are a prefix of the k_max nearest: add only the new neighbours' votes
            votes.scatter_add_(1, neighbour_labels[:, done:k], vote[:, done:k])
            done = k
            # stable descending sort: equal votes keep class order, so ties go to the smaller index
            order = torch.sort(votes, dim=1, descending=True, stable=True).indices[:, :n5]
            top5[j, i : i + step] = order
            top1[j, i : i + step] = order[:, 0]
    return KnnPredictions(ks, top1.cpu().numpy(), top5.cpu().numpy())
