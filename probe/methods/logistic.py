"""L2-regularised logistic regression as a :class:`~probe.methods.method.Method`: the whole C
path by L-BFGS (:mod:`probe.methods.logreg`), the C chosen on the selection rows, then (where a
split apart from them is reported) that C refit on the training and selection rows together."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from ..selection import choose
from . import heads as H
from . import logreg, topk
from .method import Case, Config, MethodResult, Ranking, mark_best_report


class Logreg:
    """Multinomial logistic regression over the protocol's C grid, standardised features."""

    name = "logreg"
    seeded = False  # no randomness: a seed changes it only through the rows
    tokens = False  # global features

    def refits(self, case: Case) -> bool:
        """Refit on train + selection rows, a store's val split included (as DINOv2's logistic
        regression), under :func:`probe.selection.refits`' conditions."""
        return case.refits(val=True)

    def variant(self, case: Case) -> Hashable:
        return self.refits(case)

    def run(self, case: Case) -> MethodResult:
        p = case.protocol
        res = run_logreg(case.x, case.y, case.num_classes, p.logreg_C, p.logreg_tol, p.logreg_max_iter, self.refits(case))
        capped = [c.settings["C"] for c in res.configs if not c.extra["converged"]]
        if capped:
            case.warn(
                f"{case.where}: logistic regression stopped above --logreg-tol {p.logreg_tol:g} at C {', '.join(f'{c:g}' for c in capped)}"
                f" (--logreg-max-iter {p.logreg_max_iter} reached, or no step lowered the objective)"
            )
        chosen = res.selected.settings["C"]
        if len(p.logreg_C) >= 3 and chosen in (p.logreg_C[0], p.logreg_C[-1]) and case.first:
            case.warn(f"{case.where}: the selected C {chosen:g} is at the edge of the grid; consider widening --logreg-C")
        return res

    def columns(self, case: Case, config: Config) -> dict[str, Any]:
        return {"C": config.settings["C"], "normalize": "standardize"}

    def setting(self, row: Mapping[str, Any]) -> str:
        return f"C {row['C']:g}" + (" (refit)" if row.get("refit") else "")


def _metrics(ranked: NDArray[np.int64], labels: NDArray[np.int64]) -> dict[str, float]:
    """One configuration's accuracies (:func:`probe.methods.topk.accuracy` of its (N, ≤5) ranking) as floats."""
    return {name: float(v) for name, v in topk.accuracy(ranked, labels).items()}


def run_logreg(
    x: Mapping[str, torch.Tensor],
    y: Mapping[str, torch.Tensor],
    num_classes: int,
    Cs: Sequence[float],
    tol: float,
    max_iter: int,
    refit: bool,
) -> MethodResult:
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
    mark_best_report(configs, [(C,) for C in path.Cs])
    if not refit:
        configs[chosen].selected = True
        predictions: dict[str, Ranking] = {role: (p[0][chosen], p[1][chosen]) for role, p in preds.items() if role != "train"}
        return MethodResult(configs, predictions)
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
    configs.append(
        Config({"C": C, "refit": True}, metrics, selected=True, extra={"iterations": final.n_iter[0], "converged": final.converged[0]})
    )
    return MethodResult(configs, predictions)
