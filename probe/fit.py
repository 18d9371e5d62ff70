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
from .stores import StoreSpec, assign_labels, parse_store_spec, resolve_views

# One row per store × view × head. Accuracies are percent (*_pct). The select_* columns are the
# split the LR was chosen on, report_* the split reported once (named in report_split, described
# in reported_as); report_* never hold another split's numbers.
COLUMNS = [
    "label", "store", "encoder", "weights_sha256", "dataset", "view", "lr", "wd", "optimizer", "epochs",
    "batch_size", "momentum", "normalize", "seed", "select_on", "train_split", "select_split", "report_split",
    "reported_as", "n_train", "n_select", "n_report", "excluded_invalid", "excluded_nonfinite",
    "train_top1_pct", "select_top1_pct", "report_top1_pct", "train_top5_pct", "select_top5_pct", "report_top5_pct",
    "train_loss", "diverged", "selected", "best_report", "protocol_hash", "device", "dtype", "sweep_seconds",
]  # fmt: skip


class ProbeWarning(UserWarning):
    """Something the user should know that does not stop the run (excluded rows, edge-of-grid LR)."""


def _default_warn(message: str) -> None:
    warnings.warn(message, ProbeWarning, stacklevel=3)


@dataclass
class _Store:
    path: str
    label: str
    views: list[str]
    store: FeatureStore
    labels: dict[str, np.ndarray]
    valid: dict[str, np.ndarray]
    plan: SplitPlan
    num_classes: int


def _open(path: str | os.PathLike) -> FeatureStore:
    return FeatureStore.open(path).require_complete()


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


def _prepare_store(path, label: str, views: list[str], fs: FeatureStore, protocol: Protocol, warn) -> _Store:
    splits = fs.splits
    sizes = {s: fs.num_rows(s) for s in splits}
    labels = {s: fs.labels(s) for s in splits}
    for s, l in labels.items():
        if len(l) and l.min() < 0:
            raise FeatstoreError(f"store {str(path)!r} split {s!r} has negative labels", "the store is damaged; re-extract it")
    plan = plan_splits(str(path), sizes, labels.__getitem__, protocol.val_fraction, protocol.seed, protocol.select_on)
    if plan.report_split is None:
        warn(f"store {str(path)!r}: {plan.reported_as}; "
             "extract a dataset with a val or test split, or pass --select-on report for the max over the holdout")  # fmt: skip
    valid = {s: fs.valid(s) for s in {plan.train_split, plan.select_source, plan.report_source or plan.select_source}}
    train_valid = valid[plan.train_split][plan.train_rows]
    if not train_valid.any():
        raise FeatstoreError(f"store {str(path)!r}: split {plan.train_split!r} has no valid rows to train on", "every image of it failed to decode; check the dataset")
    train_classes = np.unique(labels[plan.train_split][plan.train_rows][train_valid])
    if len(train_classes) < 2:
        raise UsageError(
            f"store {str(path)!r}: the training rows have a single class (label {train_classes[0]})",
            "a linear probe needs labels of at least 2 classes",
        )
    return _Store(str(path), label, views, fs, labels, valid, plan, _num_classes(fs, labels))


def _finite_rows(features: np.ndarray) -> np.ndarray:
    ok = np.empty(len(features), dtype=bool)
    step = 1 << 16
    for i in range(0, len(features), step):
        ok[i : i + step] = np.isfinite(features[i : i + step]).all(axis=1)
    return ok


def fit(
    stores: Iterable[str | os.PathLike | StoreSpec] | str | os.PathLike | StoreSpec,
    protocol: Protocol | None = None,
    *,
    views: Iterable[str] | None = None,
    device: str | torch.device = "auto",
    allow_different_data: bool = False,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> list[dict]:
    """Train and evaluate every head of ``protocol``'s grid on every store × view.

    ``stores``: paths, ``[LABEL=]PATH[:VIEW]`` texts or :class:`StoreSpec`. Returns one dict per
    store × view × lr × wd with the keys of :data:`COLUMNS` (accuracies in percent; None where a
    split or top-5 does not apply). With ``out``, also writes results.csv, protocol.json and
    accuracy_vs_lr.png into that folder (all or nothing); a folder that is not empty is refused
    unless ``overwrite``.
    """
    protocol = protocol or Protocol()
    warn = warn or _default_warn
    log = log or (lambda message: None)
    dev = resolve_device(device)  # before any reading: a wrong --device fails at once
    dtype = compute_dtype(dev)
    specs = [parse_store_spec(s) for s in ([stores] if isinstance(stores, (str, os.PathLike, StoreSpec)) else list(stores))]
    if isinstance(views, str):
        views = [views]
    if not specs:
        raise UsageError("no store given", "pass --store PATH (repeat it to compare stores)")
    seen = set()
    for spec in specs:
        key = os.path.realpath(spec.path)
        if key in seen:
            raise UsageError(f"store {spec.path!r} given twice", "pass each store once; --view A --view B probes several views of it")
        seen.add(key)
    if out is not None:
        from .report import check_out

        check_out(out, overwrite)  # before hours of training, not after
    opened = [_open(s.path) for s in specs]
    store_views = resolve_views(specs, opened, list(views) if views else None, log)
    labels = assign_labels(specs, opened)
    infos = [_prepare_store(s.path, label, v, fs, protocol, warn) for s, label, v, fs in zip(specs, labels, store_views, opened)]
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
        for view in info.views:
            rows.extend(_fit_one(info, view, protocol, dev, dtype, orders_cache, log, warn))
    if out is not None:
        from .report import write_outputs

        run = {"device": str(dev), "dtype": str(dtype).replace("torch.", ""),
               "stores": [{"label": i.label, "path": i.path, "views": i.views, "reported_as": i.plan.reported_as} for i in infos]}  # fmt: skip
        write_outputs(rows, protocol, out, run=run, overwrite=overwrite)
    return rows


def _fit_one(info: _Store, view: str, protocol: Protocol, dev, dtype, orders_cache, log, warn) -> list[dict]:
    t0 = time.perf_counter()
    fs, plan = info.store, info.plan
    roles = {"train": (plan.train_split, plan.train_rows), "select": (plan.select_source, plan.select_rows)}
    if plan.report_split is not None and not plan.selects_on_report:
        roles["report"] = (plan.report_source, plan.report_rows)
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
            warn(f"store {info.path!r} view {view!r} split {split!r}{' (holdout)' if role == 'select' and plan.select_split == 'holdout' else ''}: {int(bad.sum())} valid rows have NaN/Inf features; they are excluded")
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
    log(f"{info.label} [{view}]: {heads.num_heads} heads × {protocol.epochs} epochs on {len(kept['train'])} rows (D={dim}, C={info.num_classes}) on {dev} ({str(dtype).replace('torch.', '')})")
    result = H.train(x["train"], labels["train"], heads, protocol, orders)
    finite = heads.finite().cpu().numpy()
    metrics = {role: H.evaluate(heads, x[role], labels[role]) for role in x}
    if plan.selects_on_report:
        metrics["report"], kept["report"] = metrics["select"], kept["select"]  # one split, evaluated once
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    train_loss = result.train_loss.cpu().numpy()

    def metric(role, k, h):
        if role not in metrics or k not in metrics[role] or not finite[h]:
            return None
        return round(float(metrics[role][k][h]), 4)

    def top1(role):
        return np.array([np.nan if metric(role, "top1", h) is None else metric(role, "top1", h) for h in range(len(lrs))], dtype=float)

    # selection reads the select role only: the reported split is never an input (unless opted in)
    chosen = select(top1("select"), lrs, wds, finite)
    best_report = best_by(top1("report"), lrs, wds, finite) if "report" in metrics else -1
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
                "label": info.label,
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
                "select_on": protocol.select_on,
                "train_split": plan.train_split,
                "select_split": plan.select_split,
                "report_split": plan.report_split,
                "reported_as": plan.reported_as,
                "n_train": len(kept["train"]),
                "n_select": len(kept["select"]),
                "n_report": len(kept["report"]) if "report" in kept else None,
                "excluded_invalid": excluded_invalid,
                "excluded_nonfinite": excluded_nonfinite,
                "train_top1_pct": metric("train", "top1", h),
                "select_top1_pct": metric("select", "top1", h),
                "report_top1_pct": metric("report", "top1", h),
                "train_top5_pct": metric("train", "top5", h),
                "select_top5_pct": metric("select", "top5", h),
                "report_top5_pct": metric("report", "top5", h),
                "train_loss": round(float(train_loss[h]), 6) if finite[h] and np.isfinite(train_loss[h]) else None,
                "diverged": not bool(finite[h]),
                "selected": h == chosen,
                "best_report": h == best_report,
                "protocol_hash": protocol.hash,
                "device": str(dev),
                "dtype": str(dtype).replace("torch.", ""),
                "sweep_seconds": round(seconds, 3),
            }
        )
    return out
