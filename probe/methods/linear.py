"""The linear probe as a :class:`~probe.methods.method.Method`: every (lr, wd) head of the sweep
trained at once (:mod:`probe.methods.heads`), the head chosen on the selection rows, then (when
those rows are a holdout of train) that head trained again on train + holdout and reported.

With augmented views (``Case.augmented``, ``probe fit --augment``) each train row trains, each
epoch, on one of its K stored views (``heads.view_choice``), and "standardize" takes its statistics
from those views (the inputs the heads train on, as BatchNorm's running statistics would); every
evaluated role is the center crop."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping
from typing import Any, cast

import numpy as np
import torch
from numpy.typing import NDArray

from featstore.errors import FeatstoreError

from . import heads as H
from .method import Case, Config, MethodResult, Metrics, Ranking, grid_configs, select_head
from .view_rows import ViewRows


class Linear:
    """Batched linear heads over the protocol's lr × wd grid."""

    name = "linear"
    seeded = True  # the minibatch order is drawn from the seed
    tokens = False  # global features

    def variant(self, case: Case) -> Hashable:
        return (case.seed, case.refits())

    def run(self, case: Case) -> MethodResult:
        protocol, dev, dtype = case.protocol, case.device, case.dtype
        views = case.augmented.get("train")
        stats = None
        if protocol.normalize == "standardize":
            stats = H.standardize_stats(case.x["train"] if views is None else views.blocks(dev))
        x = {role: H.prepare(t, protocol.normalize, dtype, stats) for role, t in case.x.items()}
        orders = torch.from_numpy(H.restrict_orders(_epoch_orders(case), case.rows["train"])).to(dev)
        train_x = x["train"] if views is None else _epoch_views(case, views, stats)

        lrs = [lr for lr, _ in protocol.heads]
        wds = [wd for _, wd in protocol.heads]
        dim = x["train"].shape[1]
        heads = H.LinearHeads(dim, case.num_classes, lrs, wds, dev)
        on_views = ""
        if views is not None:
            if views.where == "store":
                held = "in the store, read each epoch"
            elif views.where == dev.type:
                held = "in memory" if dev.type == "cpu" else "on the device"
            else:
                held = "in host memory, each epoch's uploaded"
            on_views = f" ({views.num_views} augmented views each, held {held})"
        case.log(
            f"{case.name}: {heads.num_heads} heads × {protocol.epochs} epochs on {len(case.rows['train'])} rows{on_views} (D={dim}, C={case.num_classes}) on {dev} ({str(dtype).replace('torch.', '')})"
        )
        train_loss = H.train(train_x, case.y["train"], heads, protocol, orders).cpu().numpy()
        finite = heads.finite().cpu().numpy()
        # every head's top-5 on the reported rows in one pass, before the features go (the chosen
        # one is kept below); that role's accuracies are read from them, the other roles are streamed
        shown = case.reported_role
        ranked = H.predict(heads, x[shown]) if shown else None
        metrics: dict[str, dict[str, NDArray[np.float64]]] = {}
        for role in x:
            if role == shown and ranked is not None:
                metrics[role] = H.accuracy(ranked, case.y[role], heads.num_classes)
            else:
                metrics[role] = H.evaluate(heads, x[role], case.y[role])
        top = {shown: ranked.cpu().numpy()} if shown and ranked is not None else {}
        del ranked, x

        def per_head(h: int) -> Metrics:
            if not finite[h]:
                return {}
            return {role: {k: float(v[h]) for k, v in m.items()} for role, m in metrics.items()}

        def top1(role: str) -> NDArray[np.float64]:
            return np.array([np.nan if not finite[h] else float(metrics[role]["top1"][h]) for h in range(len(lrs))], dtype=float)

        # selection reads the select role only: the reported split is never an input (unless opted in)
        chosen = select_head(case, top1("select"), finite, "head", "lower the learning rates or use --normalize standardize")

        refit = case.refits()
        configs = grid_configs(protocol, train_loss, finite, chosen, refit, per_head)
        if refit:
            del top
            return _refit(case, configs[chosen], configs)
        predictions: dict[str, Ranking] = {
            role: (t[:, chosen, 0], t[:, chosen, :5] if t.shape[2] == 5 else None) for role, t in top.items()
        }
        return MethodResult(configs, predictions)

    def columns(self, case: Case, config: Config) -> dict[str, Any]:
        p = case.protocol
        return {"lr": config.settings["lr"], "wd": config.settings["wd"], "optimizer": p.optimizer, "epochs": p.epochs,
                "batch_size": p.batch_size, "momentum": p.momentum, "normalize": p.normalize,
                "train_loss": config.extra["train_loss"], "diverged": config.extra["diverged"],
                "augment": p.augment if "train" in case.augmented else None}  # fmt: skip

    def setting(self, row: Mapping[str, Any]) -> str:
        if row.get("lr") is None:  # a results.csv without the column (written before it existed)
            return "—"
        text = f"lr {row['lr']:g}" + (f" wd {row['wd']:g}" if row.get("wd") else "")
        return text + (" (refit)" if row.get("refit") else "")


def _refit(case: Case, chosen: Config, configs: list[Config]) -> MethodResult:
    """The chosen head trained again, alone, on train + holdout (both rows of the train split,
    put back in split order) under the same protocol: normalization statistics of those rows,
    the epoch orders of the seed restricted to them, epochs, batch size, schedule. It is the head
    a sweep of that one (lr, wd) would train on every usable train row (tested); reported once."""
    protocol, dev, dtype = case.protocol, case.device, case.dtype
    rows = np.concatenate([case.rows["train"], case.rows["select"]])
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    # each train / holdout row copied once, straight to its place in split order
    place = torch.from_numpy(np.argsort(order)).to(dev)
    n = len(case.rows["train"])
    center = torch.empty((len(rows), case.x["train"].shape[1]), dtype=case.x["train"].dtype, device=dev)
    y = torch.empty(len(rows), dtype=case.y["train"].dtype, device=dev)
    for part, role in ((place[:n], "train"), (place[n:], "select")):
        center.index_copy_(0, part, case.x[role])
        y.index_copy_(0, part, case.y[role])
    orders = torch.from_numpy(H.restrict_orders(_epoch_orders(case), rows)).to(dev)
    lr, wd = chosen.settings["lr"], chosen.settings["wd"]
    head = H.LinearHeads(center.shape[1], case.num_classes, [lr], [wd], dev)
    case.log(f"{case.name}: refit of lr {lr:g}{f' wd {wd:g}' if wd else ''} on {len(rows)} rows (train + holdout)")
    views = None
    if "train" in case.augmented:  # trained on the views of both, its train accuracy on their center crops (as the sweep's)
        if "select" not in case.augmented:
            raise FeatstoreError(f"{case.where}: the refit on train + holdout has no augmented views of the holdout", "pass --no-refit")
        views = case.augmented["train"].join(case.augmented["select"])
    stats = None
    if protocol.normalize == "standardize":
        stats = H.standardize_stats(center if views is None else views.blocks(dev))
    x = H.prepare(center, protocol.normalize, dtype, stats)  # trained on without views, and the train accuracy's rows either way
    del center
    train_loss = float(H.train(x if views is None else _epoch_views(case, views, stats), y, head, protocol, orders)[0])
    if not bool(head.finite()[0]):
        raise FeatstoreError(
            f"{case.where}: the refit of lr {lr:g} on train + holdout diverged", "lower the learning rates, or pass --no-refit"
        )
    metrics = {"train": {k: float(v[0]) for k, v in H.evaluate(head, x, y).items()}}
    del x
    report = H.prepare(case.x["report"], protocol.normalize, dtype, stats)
    ranked = H.predict(head, report)
    metrics["report"] = {k: float(v[0]) for k, v in H.accuracy(ranked, case.y["report"], head.num_classes).items()}
    top = ranked[:, 0].cpu().numpy()
    extra = {"train_loss": round(train_loss, 6) if math.isfinite(train_loss) else None, "diverged": False}
    configs.append(Config({"lr": lr, "wd": wd, "refit": True}, metrics, selected=True, extra=extra))
    return MethodResult(configs, {"report": (top[:, 0], top[:, :5] if top.shape[1] == 5 else None)})


def _epoch_views(case: Case, views: ViewRows, stats: tuple[torch.Tensor, torch.Tensor] | None) -> Callable[[int], torch.Tensor]:
    """Epoch → (n, D) normalized inputs on the device: the view of each of ``views``' rows that the
    seed chose for that epoch (:func:`heads.view_choice`, drawn over the whole train split)."""
    key = ("linear.view_choice", case.split_rows, case.seed, views.num_views, case.protocol.epochs)
    if key not in case.cache:
        case.cache[key] = H.view_choice(case.split_rows, case.protocol.epochs, views.num_views, case.seed)
    choice = cast(NDArray[np.int64], case.cache[key])  # (epochs, split rows) in host memory: one epoch's row of it moves at a time
    rows = views.rows.cpu().numpy()
    protocol, device, dtype = case.protocol, case.device, case.dtype

    def inputs(epoch: int) -> torch.Tensor:
        return H.prepare(views.gather(torch.from_numpy(choice[epoch, rows]), device), protocol.normalize, dtype, stats)

    return inputs


def _epoch_orders(case: Case) -> NDArray[np.int64]:
    """The (epochs, split rows) minibatch orders over the whole train split, drawn from the seed
    once per run: every store of the same data (and every view) trains on the same order."""
    key = ("linear.epoch_orders", case.split_rows, case.seed)
    if key not in case.cache:
        case.cache[key] = H.epoch_orders(case.split_rows, case.protocol.epochs, case.seed)
    return cast(NDArray[np.int64], case.cache[key])
