"""The k-NN and logistic-regression members of the battery on one store × view × seed × shots:
features in, one result per configuration out, the selection made on the selection split only.

Inputs are the raw features of each role already on the device, with probe.fit's role names:
``train`` (what the method fits or searches), ``select`` (the selection split) and, where there
is one apart from it, ``report``. The reported split is never an input to a choice: the k and C
with the best ``select`` top-1 are chosen (:func:`probe.selection.choose`: ties → smaller k, smaller C), and only then is
``report`` looked at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..selection import choose
from . import heads as H
from . import knn, logreg, topk


@dataclass
class Config:
    """One configuration of a method: its settings, accuracy per role, and whether it is the selected one."""

    settings: dict  # e.g. {"k": 20, "temperature": 0.07} or {"C": 0.01, "refit": False}
    metrics: dict[str, dict[str, float]]  # role → {"top1": %, "top5": % (>= 5 classes)}
    selected: bool = False
    best_report: bool = False
    extra: dict = field(default_factory=dict)  # e.g. logreg iterations


@dataclass
class MethodResult:
    method: str
    configs: list[Config]
    # per-row predictions of the selected configuration on each evaluated role: role → (top1 (N,), top5 (N, ≤5))
    predictions: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def selected(self) -> Config:
        return next(c for c in self.configs if c.selected)


def _metrics(ranked: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """One configuration's accuracies (:func:`probe.topk.accuracy` of its (N, ≤5) ranking) as floats."""
    return {name: float(v) for name, v in topk.accuracy(ranked, labels).items()}


def _mark_best_report(configs: list[Config], keys: list[tuple]) -> None:
    """The best configuration on the reported split (for comparison with papers only; never selected)."""
    best = choose([c.metrics["report"]["top1"] if "report" in c.metrics else math.nan for c in configs], keys)
    if best >= 0:
        configs[best].best_report = True


def run_knn(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], num_classes: int, ks, temperature: float, weights: str) -> MethodResult:
    """Every k at once on every evaluated role; k selected on ``select``."""
    train = knn.l2_normalize(x["train"])
    labels = {role: t.cpu().numpy() for role, t in y.items()}
    preds = {}
    for role in x:
        if role == "train":
            continue
        preds[role] = knn.predict(train, y["train"], knn.l2_normalize(x[role]), ks, num_classes, temperature=temperature, weights=weights)
    ks = preds["select"].ks
    accuracy = {role: p.accuracy(labels[role]) for role, p in preds.items()}  # role → metric → (K,)
    configs = []
    for j, k in enumerate(ks):
        metrics = {role: {name: float(v[j]) for name, v in acc.items()} for role, acc in accuracy.items()}
        configs.append(Config({"k": k, "temperature": temperature if weights == "exp" else None, "weights": weights}, metrics))
    chosen = choose([c.metrics["select"]["top1"] for c in configs], [(k,) for k in ks])
    configs[chosen].selected = True
    _mark_best_report(configs, [(k,) for k in ks])
    return MethodResult("knn", configs, {role: (p.top1[chosen], p.top5[chosen]) for role, p in preds.items()})


def run_logreg(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], num_classes: int, Cs, tol: float, max_iter: int, refit: bool) -> MethodResult:
    """The C path on ``train`` (standardised with train statistics), C selected on ``select``;
    with ``refit``, the selected C solved again on train + select (standardised with their
    statistics) and that model reported: one more configuration, marked ``refit`` and selected.
    The caller refits only when ``report`` is a split apart from ``select``."""
    stats = H.standardize_stats(x["train"])
    xs = {role: H.prepare(t, "standardize", torch.float32, stats) for role, t in x.items()}
    labels = {role: t.cpu().numpy() for role, t in y.items()}
    path = logreg.fit_path(xs["train"], y["train"], Cs, num_classes, tol=tol, max_iter=max_iter)
    preds = {role: path.predict(xs[role]) for role in xs}
    configs = []
    for i, C in enumerate(path.Cs):
        metrics = {role: _metrics(p[1][i], labels[role]) for role, p in preds.items()}
        extra = {"iterations": path.n_iter[i], "converged": path.converged[i]}
        configs.append(Config({"C": C, "refit": False}, metrics, extra=extra))
    chosen = choose([c.metrics["select"]["top1"] for c in configs], [(C,) for C in path.Cs])
    _mark_best_report(configs, [(C,) for C in path.Cs])
    if not refit:
        configs[chosen].selected = True
        return MethodResult("logreg", configs, {role: (p[0][chosen], p[1][chosen]) for role, p in preds.items() if role != "train"})
    both = torch.cat([x["train"], x["select"]])
    both_y = torch.cat([y["train"], y["select"]])
    stats = H.standardize_stats(both)
    xr = H.prepare(both, "standardize", torch.float32, stats)
    C = path.Cs[chosen]
    init = (path.weight[chosen], path.bias[chosen])
    final = logreg.fit_path(xr, both_y, [C], num_classes, tol=tol, max_iter=max_iter, init=init)
    metrics = {"train": _metrics(final.predict(xr)[1][0], both_y.cpu().numpy())}
    predictions = {}
    for role in x:
        if role in ("train", "select"):
            continue  # the selection rows trained the refit: no honest number to give
        top1, top5 = final.predict(H.prepare(x[role], "standardize", torch.float32, stats))
        metrics[role] = _metrics(top5[0], labels[role])
        predictions[role] = (top1[0], top5[0])
    configs.append(Config({"C": C, "refit": True}, metrics, selected=True, extra={"iterations": final.n_iter[0], "converged": final.converged[0]}))
    return MethodResult("logreg", configs, predictions)
