"""``probe.fit``: open the stores, check they hold the same data, train every head of the grid at
once per store × view, evaluate, select honestly, and return one row per store × view × lr × wd.

Stores are read only through :class:`featstore.store.FeatureStore`. Each split's features are
read once per view and put on the device once.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from dataclasses import dataclass
from collections.abc import Callable, Iterable

import numpy as np
import torch

from featstore.device import compute_dtype, resolve_device
from featstore.errors import FeatstoreError, UsageError
from featstore.store import FeatureStore

from . import heads as H
from .protocol import Protocol
from .selection import SplitPlan, best_by, plan_splits, select

COLUMNS = [
    "store", "encoder", "weights_sha256", "dataset", "view", "lr", "wd", "optimizer", "epochs",
    "batch_size", "momentum", "normalize", "seed", "train_split", "val_split", "report_split",
    "n_train", "n_val", "n_test", "excluded_invalid", "excluded_nonfinite",
    "train_top1", "val_top1", "test_top1", "train_top5", "val_top5", "test_top5", "train_loss",
    "diverged", "selected", "best_test", "protocol_hash", "device", "dtype", "seconds",
]  # fmt: skip


class ProbeWarning(UserWarning):
    """Something the user should know that does not stop the run (excluded rows, edge-of-grid LR)."""


def _default_warn(message: str) -> None:
    warnings.warn(message, ProbeWarning, stacklevel=3)


@dataclass
class _Store:
    path: str
    store: FeatureStore
    labels: dict[str, np.ndarray]
    valid: dict[str, np.ndarray]
    plan: SplitPlan
    num_classes: int


def _open(path: str | os.PathLike) -> FeatureStore:
    return FeatureStore.open(path).require_complete()


def resolve_views(stores: list[FeatureStore], views: Iterable[str] | None) -> list[str]:
    """The asked views (each must be in every store), or every view all the stores share."""
    if views:
        views = list(dict.fromkeys(views))
        for s in stores:
            for v in views:
                if v not in s.views:
                    raise UsageError(f"view {v!r} not in store {str(s.path)!r}", f"it has: {', '.join(s.views)}")
        return views
    common = [v for v in stores[0].views if all(v in s.views for s in stores[1:])]
    if not common:
        listed = "; ".join(f"{s.path}: {', '.join(s.views)}" for s in stores)
        raise UsageError("the stores share no feature view", f"pass --view per comparison ({listed})")
    return common


def _labels_digest(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()[:12]


def data_difference(a: _Store, b: _Store) -> str | None:
    """A description of how the data behind two stores differ, or None when it is the same."""
    da, db = a.store.attrs.get("dataset", {}), b.store.attrs.get("dataset", {})
    ma, mb = da.get("manifest_sha256"), db.get("manifest_sha256")
    if ma and mb and ma != mb:
        return f"dataset manifest_sha256 {ma[:12]}… vs {mb[:12]}…"
    if sorted(a.labels) != sorted(b.labels):
        return f"splits {sorted(a.labels)} vs {sorted(b.labels)}"
    for split in a.labels:
        la, lb = a.labels[split], b.labels[split]
        if len(la) != len(lb):
            return f"split {split!r} has {len(la)} vs {len(lb)} rows"
        if _labels_digest(la) != _labels_digest(lb):
            return f"split {split!r} has different labels"
    return None


def _num_classes(store: FeatureStore, labels: dict[str, np.ndarray]) -> int:
    dataset = store.attrs.get("dataset", {})
    top = max((int(l.max()) + 1 for l in labels.values() if len(l)), default=0)
    return max(top, int(dataset.get("num_classes") or 0), len(dataset.get("class_names") or []))


def _prepare_store(path, fs: FeatureStore, protocol: Protocol) -> _Store:
    splits = fs.splits
    sizes = {s: fs.num_rows(s) for s in splits}
    labels = {s: fs.labels(s) for s in splits}
    for s, l in labels.items():
        if len(l) and l.min() < 0:
            raise FeatstoreError(f"store {str(path)!r} split {s!r} has negative labels", "the store is damaged; re-extract it")
    plan = plan_splits(str(path), sizes, labels.__getitem__, protocol.val_fraction, protocol.seed)
    valid = {s: fs.valid(s) for s in {plan.train_split, plan.select_source, "test" if plan.has_test else plan.select_source}}
    train_valid = valid[plan.train_split][plan.train_rows]
    if not train_valid.any():
        raise FeatstoreError(f"store {str(path)!r}: split {plan.train_split!r} has no valid rows to train on", "every image of it failed to decode; check the dataset")
    train_classes = np.unique(labels[plan.train_split][plan.train_rows][train_valid])
    if len(train_classes) < 2:
        raise UsageError(
            f"store {str(path)!r}: the training rows have a single class (label {train_classes[0]})",
            "a linear probe needs labels of at least 2 classes",
        )
    return _Store(str(path), fs, labels, valid, plan, _num_classes(fs, labels))


def _finite_rows(features: np.ndarray) -> np.ndarray:
    ok = np.empty(len(features), dtype=bool)
    step = 1 << 16
    for i in range(0, len(features), step):
        ok[i : i + step] = np.isfinite(features[i : i + step]).all(axis=1)
    return ok


def fit(
    stores: Iterable[str | os.PathLike] | str | os.PathLike,
    protocol: Protocol | None = None,
    *,
    views: Iterable[str] | None = None,
    device: str | torch.device = "auto",
    allow_different_data: bool = False,
    out: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> list[dict]:
    """Train and evaluate every head of ``protocol``'s grid on every store × view.

    Returns one dict per store × view × lr × wd with the keys of :data:`COLUMNS` (accuracies in
    percent; None where a split or top-5 does not apply). With ``out``, also writes results.csv,
    protocol.json and accuracy_vs_lr.png there (all or nothing).
    """
    protocol = protocol or Protocol()
    warn = warn or _default_warn
    log = log or (lambda message: None)
    dev = resolve_device(device)  # before any reading: a wrong --device fails at once
    dtype = compute_dtype(dev)
    paths = [stores] if isinstance(stores, (str, os.PathLike)) else list(stores)
    if isinstance(views, str):
        views = [views]
    if not paths:
        raise UsageError("no store given", "pass --store PATH (repeat it to compare stores)")
    seen = set()
    for p in paths:
        key = os.path.realpath(p)
        if key in seen:
            raise UsageError(f"store {str(p)!r} given twice", "pass each store once")
        seen.add(key)
    opened = [_open(p) for p in paths]
    view_list = resolve_views(opened, views)
    infos = [_prepare_store(p, fs, protocol) for p, fs in zip(paths, opened)]
    for other in infos[1:]:
        diff = data_difference(infos[0], other)
        if diff is None:
            continue
        message = f"stores {infos[0].path!r} and {other.path!r} hold different data: {diff}"
        if not allow_different_data:
            raise UsageError(message, "compare stores of the same dataset, or pass --allow-different-data")
        warn(message + " (compared anyway: --allow-different-data)")

    orders_cache: dict[int, np.ndarray] = {}
    rows: list[dict] = []
    for info in infos:
        for view in view_list:
            rows.extend(_fit_one(info, view, protocol, dev, dtype, orders_cache, log, warn))
    if out is not None:
        from .report import write_outputs

        write_outputs(rows, protocol, out, run={"device": str(dev), "dtype": str(dtype).replace("torch.", ""), "stores": [i.path for i in infos], "views": view_list})
    return rows


def _fit_one(info: _Store, view: str, protocol: Protocol, dev, dtype, orders_cache, log, warn) -> list[dict]:
    t0 = time.perf_counter()
    fs, plan = info.store, info.plan
    roles = {"train": (plan.train_split, plan.train_rows), "val": (plan.select_source, plan.select_rows)}
    if plan.has_test:
        roles["test"] = ("test", np.arange(fs.num_rows("test")))
    features: dict[str, np.ndarray] = {}
    excluded_invalid = excluded_nonfinite = 0
    kept: dict[str, np.ndarray] = {}
    for role, (split, rows) in roles.items():
        if split not in features:
            features[split] = fs.features(split, view).read()  # each split read once per view, chunk by chunk
        valid = info.valid[split][rows]
        finite = _finite_rows(features[split][rows])
        bad = valid & ~finite
        if bad.any():
            warn(f"store {info.path!r} view {view!r} split {split!r}{' (holdout)' if role == 'val' and plan.select_split == 'holdout' else ''}: {int(bad.sum())} valid rows have NaN/Inf features; they are excluded")
        excluded_invalid += int((~valid).sum())
        excluded_nonfinite += int(bad.sum())
        kept[role] = rows[valid & finite]
        if len(kept[role]) == 0:
            raise FeatstoreError(f"store {info.path!r} view {view!r}: no usable rows for {role} (split {split!r})", "every row is invalid or non-finite")

    # raw features on the device once per role, then normalized into the compute dtype
    raw = {role: torch.from_numpy(np.ascontiguousarray(features[split][kept[role]])).to(dev) for role, (split, _) in roles.items()}
    labels = {role: torch.from_numpy(info.labels[split][kept[role]]).to(dev) for role, (split, _) in roles.items()}
    del features
    stats = H.standardize_stats(raw["train"]) if protocol.normalize == "standardize" else None
    x = {}
    for role in list(raw):
        x[role] = H.prepare(raw.pop(role), protocol.normalize, dtype, stats)

    n_full = fs.num_rows(plan.train_split)
    if n_full not in orders_cache:
        orders_cache[n_full] = H.epoch_orders(n_full, protocol.epochs, protocol.seed)
    orders = torch.from_numpy(H.restrict_orders(orders_cache[n_full], kept["train"])).to(dev)

    lrs = [lr for lr, _ in protocol.heads]
    wds = [wd for _, wd in protocol.heads]
    dim = x["train"].shape[1]
    heads = H.LinearHeads(dim, info.num_classes, lrs, wds, dev)
    log(f"{info.path} [{view}]: {heads.num_heads} heads × {protocol.epochs} epochs on {len(kept['train'])} rows (D={dim}, C={info.num_classes}) on {dev} ({str(dtype).replace('torch.', '')})")
    result = H.train(x["train"], labels["train"], heads, protocol, orders)
    finite = heads.finite().cpu().numpy()
    metrics = {role: H.evaluate(heads, x[role], labels[role]) for role in x}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    train_loss = result.train_loss.cpu().numpy()

    def metric(role, k, h):
        if role not in metrics or k not in metrics[role] or not finite[h]:
            return None
        return round(float(metrics[role][k][h]), 4)

    val_top1 = np.array([metric("val", "top1", h) if finite[h] else np.nan for h in range(len(lrs))], dtype=float)
    chosen = select(val_top1, lrs, wds, finite)
    best_test = -1
    if plan.has_test:
        test_top1 = np.array([metric("test", "top1", h) if finite[h] else np.nan for h in range(len(lrs))], dtype=float)
        best_test = best_by(test_top1, lrs, wds, finite)
    if not finite.all():
        bad_lrs = ", ".join(f"{lrs[h]:g}" + (f"/wd {wds[h]:g}" if len(protocol.wd_grid) > 1 else "") for h in np.flatnonzero(~finite))
        warn(f"store {info.path!r} view {view!r}: {int((~finite).sum())} heads diverged (lr {bad_lrs}); they are never selected")
    if chosen < 0:
        raise FeatstoreError(f"store {info.path!r} view {view!r}: every head diverged", "lower the learning rates or use --normalize standardize")
    if len(protocol.lr_grid) >= 3 and lrs[chosen] in (protocol.lr_grid[0], protocol.lr_grid[-1]):
        warn(f"store {info.path!r} view {view!r}: the selected lr {lrs[chosen]:g} is at the edge of the grid; consider widening --lr-grid")

    encoder = fs.attrs.get("encoder", {}) or {}
    dataset = fs.attrs.get("dataset", {}) or {}
    out = []
    for h, (lr, wd) in enumerate(protocol.heads):
        out.append(
            {
                "store": info.path,
                "encoder": encoder.get("name"),
                "weights_sha256": encoder.get("weights_sha256"),
                "dataset": dataset.get("name"),
                "view": view,
                "lr": lr,
                "wd": wd,
                "optimizer": protocol.optimizer,
                "epochs": protocol.epochs,
                "batch_size": protocol.batch_size,
                "momentum": protocol.momentum,
                "normalize": protocol.normalize,
                "seed": protocol.seed,
                "train_split": plan.train_split,
                "val_split": plan.select_split,
                "report_split": plan.report_split,
                "n_train": len(kept["train"]),
                "n_val": len(kept["val"]),
                "n_test": len(kept["test"]) if plan.has_test else None,
                "excluded_invalid": excluded_invalid,
                "excluded_nonfinite": excluded_nonfinite,
                "train_top1": metric("train", "top1", h),
                "val_top1": metric("val", "top1", h),
                "test_top1": metric("test", "top1", h),
                "train_top5": metric("train", "top5", h),
                "val_top5": metric("val", "top5", h),
                "test_top5": metric("test", "top5", h),
                "train_loss": round(float(train_loss[h]), 6) if finite[h] and np.isfinite(train_loss[h]) else None,
                "diverged": not bool(finite[h]),
                "selected": h == chosen,
                "best_test": h == best_test,
                "protocol_hash": protocol.hash,
                "device": str(dev),
                "dtype": str(dtype).replace("torch.", ""),
                "seconds": round(seconds, 3),
            }
        )
    return out
