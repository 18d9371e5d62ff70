"""Weighted k-nearest-neighbour classification on cached features (the DINO/DINOv2 k-NN rule).

Rows are L2-normalised, so the dot product is the cosine similarity. Evaluated rows are taken
in chunks: each chunk costs one (chunk × N_train) similarity GEMM and one top-max(k) selection,
and that single selection serves every k of the grid (the k nearest neighbours are a prefix of
the max(k) nearest). A neighbour at similarity s votes for its class with weight exp(s / T)
(``weights="exp"``) or 1 (``"uniform"``); the class with the most votes wins. Vote ties go to
the smaller class index (as scikit-learn's ``KNeighborsClassifier``), so top-1 is deterministic.

Memory is bounded by ``chunk_elements`` (the similarity block), not by the number of evaluated
rows: ImageNet (1.28 M train × 50 k val) runs in blocks of a few hundred rows.

A refit (train + holdout as the neighbour set) needs no second search of the training rows: the
reported rows' max(k) nearest among train are kept (``keep_neighbours``), the holdout alone is
searched (:func:`nearest`), and the two lists are merged (:meth:`Neighbours.union`) then voted
(:func:`vote`) — the same neighbours as one search over train + holdout.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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
class Neighbours:
    """The nearest training rows of each query row, nearest first, on the device: their cosine
    similarity (N, k) float32 and class (N, k) int64."""

    similarity: torch.Tensor
    labels: torch.Tensor

    def union(self, other: Neighbours, k: int) -> Neighbours:
        """The ``k`` nearest over the union of two disjoint sets of training rows, from each set's
        own nearest (the union's k nearest are among each part's k nearest): a refit's neighbours
        over train + holdout at the cost of searching the holdout only."""
        similarity = torch.cat([self.similarity, other.similarity], dim=1)
        labels = torch.cat([self.labels, other.labels], dim=1)
        values, index = similarity.topk(min(k, similarity.shape[1]), dim=1, largest=True, sorted=True)
        return Neighbours(values, labels.gather(1, index))


@dataclass(frozen=True)
class KnnPredictions:
    """Per-k predictions of every evaluated row (row order as given)."""

    ks: tuple[int, ...]  # as asked (a k larger than the train set uses every train row)
    top1: NDArray[np.int64]  # (K, N) int64 class index
    top5: NDArray[np.int64]  # (K, N, min(5, C)) int64 class indices, best first
    neighbours: Neighbours | None = None  # the max(k) nearest, when asked for (a later refit's union)

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
    keep_neighbours: bool = False,
) -> KnnPredictions:
    """k-NN predictions of every row of ``query_x`` for every k of ``ks``.

    ``train_x`` and ``query_x`` must already be L2-normalised (:func:`l2_normalize`), on one
    device, in one dtype (float32 is the default everywhere: the neighbour ranking is sensitive
    to rounding, and the similarity GEMM is a small part of the work). ``keep_neighbours``: also
    return the max(k) nearest of every row (N × max(k) similarities and labels).
    """
    ks = check_settings(ks, temperature, weights)
    n_train = train_x.shape[0]
    if n_train == 0:
        raise UsageError("k-NN needs at least one training row")
    n_query = query_x.shape[0]
    top1 = torch.empty(len(ks), n_query, dtype=torch.int64, device=query_x.device)
    top5 = torch.empty(len(ks), n_query, min(5, num_classes), dtype=torch.int64, device=query_x.device)
    kept = []
    for i, near in _nearest_chunks(train_x, train_y, query_x, min(ks[-1], n_train), chunk_elements):
        top1[:, i : i + len(near.labels)], top5[:, i : i + len(near.labels)] = _vote(near, ks, num_classes, temperature, weights)
        if keep_neighbours:
            kept.append(near)
    neighbours = Neighbours(torch.cat([n.similarity for n in kept]), torch.cat([n.labels for n in kept])) if keep_neighbours else None
    return KnnPredictions(ks, top1.cpu().numpy(), top5.cpu().numpy(), neighbours)


@torch.no_grad()
def nearest(
    train_x: torch.Tensor, train_y: torch.Tensor, query_x: torch.Tensor, k: int, chunk_elements: int = _CHUNK_ELEMENTS
) -> Neighbours:
    """The ``k`` nearest training rows of every query row (every training row when there are
    fewer), both L2-normalised as for :func:`predict`."""
    chunks = [near for _, near in _nearest_chunks(train_x, train_y, query_x, min(k, train_x.shape[0]), chunk_elements)]
    if not chunks:
        empty = torch.empty(0, min(k, train_x.shape[0]), device=query_x.device)
        return Neighbours(empty.float(), empty.long())
    return Neighbours(torch.cat([n.similarity for n in chunks]), torch.cat([n.labels for n in chunks]))


@torch.no_grad()
def vote(neighbours: Neighbours, ks: Sequence[int], num_classes: int, *, temperature: float = DEFAULT_TEMPERATURE,
         weights: str = "exp", chunk_elements: int = _CHUNK_ELEMENTS) -> KnnPredictions:  # fmt: skip
    """:func:`predict`'s rule applied to neighbours already found (e.g. a :meth:`Neighbours.union`):
    a k larger than the neighbours held uses all of them."""
    ks = check_settings(ks, temperature, weights)
    n_query = neighbours.labels.shape[0]
    dev = neighbours.labels.device
    top1 = torch.empty(len(ks), n_query, dtype=torch.int64, device=dev)
    top5 = torch.empty(len(ks), n_query, min(5, num_classes), dtype=torch.int64, device=dev)
    step = max(1, chunk_elements // max(num_classes, 1))  # the (rows × classes) vote block
    for i in range(0, n_query, step):
        near = Neighbours(neighbours.similarity[i : i + step], neighbours.labels[i : i + step])
        top1[:, i : i + step], top5[:, i : i + step] = _vote(near, ks, num_classes, temperature, weights)
    return KnnPredictions(ks, top1.cpu().numpy(), top5.cpu().numpy())


def _nearest_chunks(
    train_x: torch.Tensor, train_y: torch.Tensor, query_x: torch.Tensor, k: int, chunk_elements: int
) -> Iterator[tuple[int, Neighbours]]:
    """(start row, :class:`Neighbours` of the chunk) per chunk of query rows: one similarity GEMM
    and one top-k each, the similarity block bounded by ``chunk_elements``."""
    train_y = train_y.to(query_x.device, torch.int64)
    train_t = train_x.t()
    step = max(1, chunk_elements // max(train_x.shape[0], 1))
    for i in range(0, query_x.shape[0], step):
        sim = torch.mm(query_x[i : i + step], train_t)
        values, index = sim.topk(k, dim=1, largest=True, sorted=True)
        del sim
        yield i, Neighbours(values.float(), train_y[index])


def _vote(near: Neighbours, ks: Sequence[int], num_classes: int, temperature: float, weights: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, B) top-1 and (K, B, min(5, C)) top-5 classes of each k for a chunk of rows' neighbours."""
    held = near.labels.shape[1]
    n5 = min(5, num_classes)
    rows = near.labels.shape[0]
    top1 = torch.empty(len(ks), rows, dtype=torch.int64, device=near.labels.device)
    top5 = torch.empty(len(ks), rows, n5, dtype=torch.int64, device=near.labels.device)
    if weights == "exp":
        # exp((s - s_max) / T): each row's votes scaled by one constant (the same winner and order) that keeps a small
        # T from overflowing float32 (exp(1 / 0.01) is inf: every close vote tied, the smallest class won)
        weight = (near.similarity - near.similarity[:, :1]).div_(temperature).exp_()
    else:
        weight = torch.ones_like(near.similarity)
    votes = torch.zeros(rows, num_classes, dtype=torch.float32, device=near.labels.device)
    done = 0
    for j, k in enumerate([min(k_asked, held) for k_asked in ks]):
        # the k nearest are a prefix of the max(k) nearest: add only the new neighbours' votes
        votes.scatter_add_(1, near.labels[:, done:k], weight[:, done:k])
        done = k
        # stable descending sort: equal votes keep class order, so ties go to the smaller index
        order = torch.sort(votes, dim=1, descending=True, stable=True).indices[:, :n5]
        top5[j] = order
        top1[j] = order[:, 0]
    return top1, top5
