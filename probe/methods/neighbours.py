"""Weighted k-NN as a :class:`~probe.methods.method.Method`: every k of the grid in one pass
(:mod:`probe.methods.knn`), the k chosen on the selection rows, then (when those rows are a
holdout of train) the reported rows classified at that k with train + holdout as neighbours."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from ..selection import choose
from . import knn
from .method import Case, Config, MethodResult, mark_best_report


class Knn:
    """The DINO k-NN rule over the protocol's k grid."""

    name = "knn"
    seeded = False  # no randomness: a seed changes it only through the rows
    tokens = False  # global features

    def variant(self, case: Case) -> Hashable:
        return case.refits()

    def run(self, case: Case) -> MethodResult:
        p = case.protocol
        n_train = len(case.rows["train"])
        big = [k for k in p.knn_k if k > n_train]
        if big and case.first_view and case.first_seed:
            case.warn(f"{case.where}: k-NN k {', '.join(map(str, big))} exceed the {n_train} training rows; they use every training row")
        return run_knn(case.x, case.y, case.num_classes, p.knn_k, p.knn_temperature, p.knn_weights, refit=case.refits())

    def columns(self, case: Case, config: Config) -> dict[str, Any]:
        return {"k": config.settings["k"], "temperature": config.settings["temperature"], "normalize": "l2"}

    def setting(self, row: Mapping[str, Any]) -> str:
        return f"k {row['k']}" + (" (refit)" if row.get("refit") else "")


def run_knn(
    x: Mapping[str, torch.Tensor],
    y: Mapping[str, torch.Tensor],
    num_classes: int,
    ks: Sequence[int],
    temperature: float,
    weights: str,
    refit: bool = False,
) -> MethodResult:
    """Every k at once on every evaluated role but ``train`` (a row is its own nearest neighbour);
    k selected on ``select``. With ``refit`` (the caller's choice: the selection rows are a
    holdout of train and ``report`` another split), the ``report`` rows are classified again at
    that k with train + select as the neighbour set: one more configuration, marked ``refit``
    and selected, with no selection-split number (those rows are its neighbours)."""
    train = knn.l2_normalize(x["train"])
    labels = {role: t.cpu().numpy() for role, t in y.items()}
    preds: dict[str, knn.KnnPredictions] = {}
    queries: dict[str, torch.Tensor] = {}
    for role in x:
        if role == "train":
            continue
        queries[role] = knn.l2_normalize(x[role])
        keep = refit and role == "report"  # its train neighbours are merged with the holdout's below
        preds[role] = knn.predict(train, y["train"], queries[role], ks, num_classes, temperature=temperature, weights=weights,
                                  keep_neighbours=keep)  # fmt: skip
    del train
    grid = preds["select"].ks
    accuracy = {role: p.accuracy(labels[role]) for role, p in preds.items()}  # role → metric → (K,)
    configs = []
    for j, k in enumerate(grid):
        metrics = {role: {name: float(v[j]) for name, v in acc.items()} for role, acc in accuracy.items()}
        configs.append(
            Config({"k": k, "temperature": temperature if weights == "exp" else None, "weights": weights, "refit": False}, metrics)
        )
    chosen = choose([c.metrics["select"]["top1"] for c in configs], [(k,) for k in grid])
    mark_best_report(configs, [(k,) for k in grid])
    if not refit:
        configs[chosen].selected = True
        return MethodResult(configs, {role: (p.top1[chosen], p.top5[chosen]) for role, p in preds.items()})
    # train + holdout as neighbours: the report rows' nearest among train (kept) merged with their
    # nearest among the holdout, the same neighbours as one search over both
    k_max = grid[-1]
    near_train = preds["report"].neighbours
    assert near_train is not None  # kept above
    near = near_train.union(knn.nearest(queries["select"], y["select"], queries["report"], k_max), k_max)
    final = knn.vote(near, [grid[chosen]], num_classes, temperature=temperature, weights=weights)
    metrics = {"report": {name: float(v[0]) for name, v in final.accuracy(labels["report"]).items()}}
    configs.append(Config({**configs[chosen].settings, "refit": True}, metrics, selected=True))
    return MethodResult(configs, {"report": (final.top1[0], final.top5[0])})
