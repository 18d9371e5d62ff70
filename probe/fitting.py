"""``probe.fit``: open the stores, check they hold the same data, run every method of the
protocol (the batched linear sweep, k-NN, logistic regression) per store × view × seed × shots,
select honestly, and return one row per configuration (a head, a k, a C).

Stores are read only through :class:`featstore.store.FeatureStore`. Each split's features are
read once per view and put on the device once.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from featstore.device import compute_dtype, resolve_device
from featstore.errors import FeatstoreError, UsageError
from featstore.store import FeatureStore
from featstore.store.verify import require_labels

from . import augment as A
from . import fewshot, methods
from . import intervals as I
from .comparison import Comparison, compare
from .methods import Case, Method, MethodResult
from .methods.token_rows import TokenRows, default_memory, finite_rows
from .methods.view_rows import ViewRows
from .methods.view_rows import place as place_views
from .protocol import Protocol, augment_views
from .results.columns import COLUMNS
from .results.predictions import ConfigKey, ImagePredictions
from .results.predictions import of_rows as predictions_of
from .selection import SplitPlan, described, plan_splits, single_split_advice
from .stores import StoreSpec, assign_labels, open_checked, parse_store_spec, resolve_views


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
    plan: SplitPlan  # the first seed's (the one reported in protocol.json's run record)
    plans: dict[int, SplitPlan]  # per seed: the holdout is drawn per seed
    num_classes: int
    _paths: dict[str, np.ndarray] = field(default_factory=dict)

    def paths(self, split: str) -> np.ndarray:
        """A split's dataset paths, read once (every selected configuration's predictions need them)."""
        if split not in self._paths:
            self._paths[split] = self.store.paths(split)
        return self._paths[split]


def _labels_digest(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()[:12]


def data_difference(a: _Store, b: _Store) -> str | None:
    """A description of how the data behind two stores differ, or None when it is the same."""
    ma, mb = a.store.meta.dataset.manifest_sha256, b.store.meta.dataset.manifest_sha256
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


def _prepare_store(path, label: str, views: list[str], fs: FeatureStore, protocol: Protocol, warn) -> _Store:
    splits = fs.splits
    sizes = {s: fs.num_rows(s) for s in splits}
    labels = {s: fs.labels(s) for s in splits}
    num_classes = require_labels(fs, labels)  # labels outside [0, classes) are refused, never trained on
    drawn: dict[str, Any] = dict(test_fraction=protocol.test_fraction, test_seed=protocol.seed)  # one test draw for every seed
    plans = {
        seed: plan_splits(str(path), sizes, labels.__getitem__, protocol.val_fraction, seed, protocol.select_on, **drawn)
        for seed in protocol.run_seeds
    }
    plan = plans[protocol.run_seeds[0]]
    if plan.report_split is None:
        warn(f"store {str(path)!r}: {described(plan, protocol.fixed, protocol.refit)}; {single_split_advice(str(path))}")
    valid = {s: fs.valid(s) for s in {plan.train_split, plan.select_source, plan.report_source or plan.select_source}}
    train_valid = valid[plan.train_split][plan.train_rows]
    if not train_valid.any():
        raise FeatstoreError(
            f"store {str(path)!r}: split {plan.train_split!r} has no valid rows to train on",
            "every image of it failed to decode; check the dataset",
        )
    train_classes = np.unique(labels[plan.train_split][plan.train_rows][train_valid])
    if len(train_classes) < 2:
        raise UsageError(
            f"store {str(path)!r}: the training rows have a single class (label {train_classes[0]})",
            "a linear probe needs labels of at least 2 classes",
        )
    return _Store(str(path), label, views, fs, labels, valid, plan, plans, num_classes)


def _finite_rows(features: np.ndarray) -> np.ndarray:
    ok = np.empty(len(features), dtype=bool)
    step = 1 << 16
    for i in range(0, len(features), step):
        ok[i : i + step] = np.isfinite(features[i : i + step]).all(axis=1)
    return ok


@dataclass
class FitResult:
    """The rows of a probe run and the statistics over them, each computed once: ``comparison``
    (:func:`probe.compare.compare` of every selected configuration's per-image predictions: its
    bootstrap interval is the rows' ``ci95_*``) and, when asked for, ``digest`` (summary.csv's
    per-seed entries and the difference to the first store: what the tables show)."""

    rows: list[dict]
    comparison: Comparison | None  # None when nothing was reported

    @cached_property
    def digest(self):
        from .output.tables import digest_of

        return digest_of(self.rows, self.comparison)


def fit(stores, protocol: Protocol | None = None, **options: Any) -> list[dict]:
    """Probe feature stores under one protocol and return one row per configuration.

    The rows of :func:`fit_run` (same arguments): one dict per store × view × seed × shots ×
    method configuration (for the default linear-only protocol, per store × view × lr × wd).

    Parameters
    ----------
    stores : path, str, StoreSpec, or an iterable of them
        Feature stores (folders, ``.h5`` exports, URLs); a text may be ``[LABEL=]PATH[:VIEW]`` as
        on the command line. Several stores are one comparison under the same protocol.
    protocol : Protocol, optional
        Every hyperparameter (LR grid, epochs, methods, shots, seeds…); default ``Protocol()``.
    views : str or iterable of str, optional
        Views of every store without its own ``:VIEW``; default: every view the stores share,
        else each store's primary view (``pool`` for a CNN, ``cls`` for a ViT).
    device : {"auto", "cpu", "cuda"} or torch.device, default "auto"
    allow_different_data : bool, default False
        Compare stores whose dataset manifests differ (with a warning) instead of refusing.
    out : path, optional
        Also write results.csv, summary.csv, protocol.json, predictions.csv and
        accuracy_vs_lr.png into this folder (all or nothing).
    overwrite : bool, default False
        Replace a previous probe run in ``out``; a folder holding other files is still refused.
    log : callable, optional
        Receives the progress lines (default: none).
    warn : callable, optional
        Receives warnings (default: Python ``warnings`` with category :class:`ProbeWarning`).
    verify : bool, default True
        Check every unit read against the store's content digests and refuse a damaged store
        (naming the split, array and rows, and the ``featstore extract ... --repair`` that repairs it).

    Returns
    -------
    list of dict
        Keys of :data:`probe.COLUMNS` (accuracies in percent, ``*_top1_pct``; None where a column
        does not apply). ``selected`` marks the configuration chosen on the selection split; its
        row also holds ``report_predictions`` (per-image paths, target, top-1, top-5).

    Raises
    ------
    featstore.UsageError
        A store given twice, stores of different data, a bad view, ``out`` not empty.
    featstore.FeatstoreError
        A store that is missing or not complete.

    Examples
    --------
    >>> rows = probe.fit(["a.zarr", "ft=b.zarr:cls4"], probe.Protocol(lr_grid="1e-3:1e-1:5", epochs=10),
    ...                  out="results/ab")                                       # doctest: +SKIP
    >>> [(r["label"], r["lr"], r["report_top1_pct"]) for r in rows if r["selected"]]  # doctest: +SKIP
    """
    return fit_run(stores, protocol, **options).rows


def fit_run(
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
    command: list[str] | None = None,
    verify: bool = True,
    max_memory: int | None = None,
) -> FitResult:
    """Run every method of ``protocol`` (its LR grid, k grid, C path) on every store × view × seed × shots.

    The same as :func:`fit`, and the statistics computed over the rows, each once.

    Parameters
    ----------
    stores, protocol, views, device, allow_different_data, out, overwrite, log, warn, verify
        As :func:`fit`.
    command : list of str, optional
        The command line that started the run (protocol.json records it).
    max_memory : int, optional
        Bytes of patch tokens a token method (``attentive``) holds resident per role; beyond it they
        stream from the store in blocks of rows. Augmented views are held on the device when they
        fit it, else in host memory (one view per row uploaded each epoch) up to half the RAM, else
        read from the store each epoch. Default: a quarter of the RAM / GPU memory.

    Returns
    -------
    FitResult
        ``rows`` (as :func:`fit` returns them; 95% intervals of the reported top-1 in
        ``wilson95_*`` and, on the selected rows, ``ci95_*``), ``comparison`` (a
        :class:`probe.comparison.Comparison` of every selected configuration's per-image
        predictions against the first store; None when nothing was reported) and ``digest``
        (summary.csv's per-seed entries and the difference to the first store).

    Raises
    ------
    featstore.UsageError, featstore.FeatstoreError
        As :func:`fit`.

    Examples
    --------
    >>> result = probe.fit_run(["a.zarr", "b.zarr"], out="results/ab")           # doctest: +SKIP
    >>> [(r.label, r.delta) for r in result.comparison.rows]                     # doctest: +SKIP
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
        from .output.files import check_out

        check_out(out, overwrite)  # before hours of training, not after
    opened = [open_checked(s.path, verify, warn) for s in specs]
    token_methods = [m for m in protocol.methods if methods.get(m).tokens]
    store_views = resolve_views(specs, opened, list(views) if views else None, log, patch=bool(token_methods))
    for spec, fs, probed in zip(specs, opened, store_views):
        _check_view_kinds(spec.path, fs, probed, protocol, token_methods)
    if token_methods:  # each view is probed by the methods of its kind; a view no method reads is not read
        global_methods = len(token_methods) < len(protocol.methods)
        store_views = [[v for v in probed if v in fs.patch_views or global_methods] for fs, probed in zip(opened, store_views)]
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
    # "on": the stores' augmented views, where every store holds the same (a mix is refused)
    protocol = A.resolve(protocol, [(i.path, i.store, i.plan.train_split) for i in infos], warn)

    cache: dict = {}  # what the methods keep from one case for the next (the linear heads' epoch orders)
    rows: list[dict] = []
    for info in infos:
        for view in info.views:
            rows.extend(_fit_one(info, view, protocol, dev, dtype, cache, log, warn, max_memory))
    predictions = predictions_of(rows)
    result = FitResult(rows, compare(predictions) if predictions else None)
    _add_intervals(rows, result.comparison)
    if out is not None:
        from .output.files import write_outputs
        from .provenance import environment, store_record

        dataset = infos[0].store.meta.dataset.raw
        run = {
            "device": str(dev),
            "dtype": str(dtype).replace("torch.", ""),
            **environment(command),
            "allow_different_data": allow_different_data,
            "stores": [
                {
                    "label": i.label,
                    "path": i.path,
                    **store_record(i.store),
                    "views": i.views,
                    "reported_as": described(i.plan, protocol.fixed, protocol.refit),
                }
                for i in infos
            ],
            # what probe compare / probe report need to pair and name results without the stores
            "dataset": {k: dataset.get(k) for k in ("name", "manifest_sha256", "class_names")},
        }
        write_outputs(rows, protocol, out, run=run, overwrite=overwrite, digest=result.digest)
    return result


def _check_view_kinds(path: str, fs: FeatureStore, probed: list[str], protocol: Protocol, token_methods: list[str]) -> None:
    """Every method of the protocol has a view of its kind among a store's probed views: token
    methods (attentive) a patch view, the others a global one; UsageError naming the fix otherwise."""
    patch = [v for v in probed if v in fs.patch_views]
    others = [m for m in protocol.methods if m not in token_methods]
    if token_methods and not patch:
        fix = (f"probe one of its patch views: --view {next(iter(fs.patch_views))}" if fs.patch_views
               else "extract the patch tokens with `featstore extract --views patch` (or patch4)")  # fmt: skip
        raise UsageError(
            f"--method {','.join(token_methods)} needs a patch view; store {path!r} view {', '.join(probed)} holds global features", fix
        )
    if others and len(patch) == len(probed):
        have = [v for v in fs.views if v not in fs.patch_views]
        fix = f"add a global view (--view {have[0]})" if have else "extract a global view (e.g. --views patch,avgpool)"
        raise UsageError(f"--method {','.join(others)} needs global features; store {path!r} view {', '.join(probed)} holds patch tokens",
                         f"{fix}, or probe the tokens with --method attentive")  # fmt: skip


def _fit_one(info: _Store, view: str, protocol: Protocol, dev, dtype, cache: dict, log, warn, max_memory: int | None = None) -> list[dict]:
    """Every seed × shots × method on one store × view; each split's features read once."""
    features: dict[str, Any] = {}  # split → its features; "<split>#augment" → its views, placed
    finite: dict[str, np.ndarray] = {}
    memo: dict[tuple, MethodResult] = {}
    rows: list[dict] = []
    for seed in protocol.run_seeds:
        for shots in protocol.run_shots:
            rows += _fit_case(info, view, protocol, seed, shots, features, finite, memo, dev, dtype, cache, log, warn, max_memory)
    return rows


def _first_case(protocol: Protocol, seed: int, shots: int | None) -> bool:
    """The first seed × shots of a store × view: where once-per-probe warnings go."""
    return seed == protocol.run_seeds[0] and shots == protocol.run_shots[0]


def _fit_case(
    info: _Store, view: str, protocol: Protocol, seed: int, shots: int | None, features, finite, memo, dev, dtype, cache, log, warn,
    max_memory: int | None = None,
) -> list[dict]:  # fmt: skip
    t0 = time.perf_counter()
    fs, plan = info.store, info.plans[seed]
    roles: dict[str, tuple[str, np.ndarray]] = {
        "train": (plan.train_split, plan.train_rows),
        "select": (plan.select_source, plan.select_rows),
    }
    if plan.reported_role == "report":  # else the selection rows (if any) are the reported ones
        assert plan.report_source is not None and plan.report_rows is not None  # a "report" role has its own split
        roles["report"] = (plan.report_source, plan.report_rows)
    first = _first_case(protocol, seed, shots)  # warn once per store × view
    excluded_invalid = excluded_nonfinite = 0
    kept: dict[str, np.ndarray] = {}
    patch = view in fs.patch_views  # tokens: read by the token methods themselves, row block by row block
    for role, (split, rows) in roles.items():
        if split not in finite:
            if patch:
                finite[split] = finite_rows(fs, split, view)
            else:
                features[split] = fs.features(split, view).read()  # each split read once per view, chunk by chunk
                finite[split] = _finite_rows(features[split])
        valid = info.valid[split][rows]
        ok = finite[split][rows]
        bad = valid & ~ok
        if bad.any() and first:
            warn(
                f"store {info.path!r} view {view!r} split {split!r}{' (holdout)' if role == 'select' and plan.select_split == 'holdout' else ''}: {int(bad.sum())} valid rows have NaN/Inf features; they are excluded"
            )
        excluded_invalid += int((~valid).sum())
        excluded_nonfinite += int(bad.sum())
        kept[role] = rows[valid & ok]
        if role == "train" and shots is not None:
            # the same rows for every store and method: drawn from the labels and the seed only
            kept[role] = fewshot.sample(info.labels[split], kept[role], shots, seed)
            short = fewshot.shortfall(info.labels[split], kept[role], shots)
            if short and info.views.index(view) == 0:
                warn(
                    f"store {info.path!r} seed {seed}: {len(short)} classes have fewer than {shots} usable training rows; "
                    f"they train on what they have ({', '.join(f'class {c}: {n}' for c, n in list(short.items())[:3])}{'…' if len(short) > 3 else ''})"
                )
        if len(kept[role]) == 0:
            raise FeatstoreError(
                f"store {info.path!r} view {view!r}: no usable rows for {role} (split {split!r})", "every row is invalid or non-finite"
            )

    # raw features on the device once per role; each method normalizes its own copy
    raw = (
        {}
        if patch
        else {role: torch.from_numpy(np.ascontiguousarray(features[split][kept[role]])).to(dev) for role, (split, _) in roles.items()}
    )
    tokens = {role: TokenRows(fs, split, view, kept[role]) for role, (split, _) in roles.items()} if patch else None
    labels = {role: torch.from_numpy(info.labels[split][kept[role]]).to(dev) for role, (split, _) in roles.items()}
    augmented = {}
    if augment_views(protocol.augment):  # the train split's rows (train, and a holdout of it) train on their views
        for role, (split, _) in roles.items():
            if split == plan.train_split and role != "report":
                stored = f"{split}#augment"  # the split's views, placed once per store × view for every seed
                if stored not in features:
                    placed, bad = place_views(fs.augmented(split, view), features[split], dev, max_memory or default_memory(dev))
                    if bad:
                        warn(
                            f"store {info.path!r} view {view!r}: {bad} augmented views have NaN/Inf values; their rows' center crops stand in"
                        )
                    features[stored] = placed
                augmented[role] = ViewRows.of(features[stored], kept[role])
    rows_of = _Rows(info, view, protocol, plan, seed, shots, kept, excluded_invalid, excluded_nonfinite, dev, dtype, t0)
    detail = rows_of.detail
    case = Case(protocol=protocol, x=raw, y=labels, rows=kept, split_rows=fs.num_rows(plan.train_split), num_classes=info.num_classes,
                seed=seed, shots=shots, reported_role=plan.reported_role, select_split=plan.select_split, device=dev, dtype=dtype,
                name=f"{info.label} [{view}]{f' ({detail})' if detail else ''}", where=rows_of.where, first=first,
                first_view=view == info.views[0], first_seed=seed == protocol.run_seeds[0], warn=warn, log=log, cache=cache,
                augmented=augmented, tokens=tokens, max_memory=max_memory)  # fmt: skip
    # a method without randomness (k-NN, logistic regression) changes with a seed only through the
    # rows (holdout, few-shot sample), so a seed with the same rows as an earlier one reuses its result
    rows_key = tuple(hashlib.sha256(np.ascontiguousarray(kept[r]).tobytes()).hexdigest() for r in sorted(kept))
    out: list[dict] = []
    for name in protocol.methods:
        method = methods.get(name)
        if method.tokens != patch:  # token methods on patch views, the others on global ones
            continue
        if method.seeded:
            result = method.run(case)
        else:
            key = (name, rows_key, method.variant(case))
            if key not in memo:  # a reused result's warnings were given with it
                memo[key] = method.run(case)
            result = memo[key]
        out += rows_of.method_rows(method, case, result)
        rows_of.t0 = time.perf_counter()  # each method's rows carry its own seconds
    return out


@dataclass
class _Rows:
    """One store × view × seed × shots: what every method's rows share, and the rows made of a result."""

    info: _Store
    view: str
    protocol: Protocol
    plan: SplitPlan
    seed: int
    shots: int | None
    kept: dict[str, np.ndarray]
    excluded_invalid: int
    excluded_nonfinite: int
    dev: torch.device
    dtype: torch.dtype
    t0: float

    @property
    def detail(self) -> str:
        """``seed 1 5-shot``: what tells this case from the store × view's others ('' when nothing does)."""
        return " ".join(
            ([f"seed {self.seed}"] if len(self.protocol.run_seeds) > 1 else []) + ([f"{self.shots}-shot"] if self.shots else [])
        )

    @property
    def where(self) -> str:
        return f"store {self.info.path!r} view {self.view!r}" + (f" {self.detail}" if self.detail else "")

    def seconds(self) -> float:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        return round(time.perf_counter() - self.t0, 3)

    def method_rows(self, method: Method, case: Case, result: MethodResult) -> list[dict]:
        """One row per configuration (a head, a k, a C); the selected one keeps its per-image predictions."""
        seconds = self.seconds()
        out = [self.row(method.name, c.metrics, **method.columns(case, c), **self.refit_columns(c), selected=c.selected,
                        best_report=c.best_report, sweep_seconds=seconds) for c in result.configs]  # fmt: skip
        next(r for r in out if r["selected"])["report_predictions"] = self.report_predictions(result.predictions)
        return out

    def refit_columns(self, config) -> dict[str, Any]:
        """``refit`` on every method's rows; a refit's ``n_train`` counts the selection rows it also trained on."""
        if not config.settings.get("refit"):
            return {"refit": False}
        return {"refit": True, "n_train": len(self.kept["train"]) + len(self.kept["select"])}

    def row(self, method: str, metrics: dict[str, dict[str, float]], **fields) -> dict:
        """A results row: the shared columns, ``fields`` (the method's own), ``metrics`` (role → top1/top5).

        With --select-on report the selection rows are the reported ones (evaluated once): here,
        and only here, their numbers become the report_* columns and the selected configuration
        the best on the reported split."""
        fs, plan, p = self.info.store, self.plan, self.protocol
        encoder, dataset = fs.meta.encoder, fs.meta.dataset
        reported = plan.reported_role
        if reported == "select":
            metrics = {**metrics, "report": metrics["select"]} if "select" in metrics else metrics
            fields = {**fields, "best_report": fields.get("selected", False)}

        def metric(role, k):
            v = metrics.get(role, {}).get(k)
            return None if v is None else round(float(v), 4)

        row: dict[str, Any] = {c: None for c in COLUMNS}
        row.update({
            "label": self.info.label, "store": self.info.path, "encoder": encoder.name, "weights_sha256": encoder.weights_sha256,
            "dataset": dataset.name, "view": self.view, "method": method, "shots": self.shots, "seed": self.seed,
            "select_on": p.select_on, "train_split": plan.train_split, "select_split": plan.select_split, "report_split": plan.report_split,
            "reported_as": described(plan, p.fixed, p.refit), "n_train": len(self.kept["train"]), "n_select": len(self.kept["select"]),
            "n_report": len(self.kept[reported]) if reported else None,
            "excluded_invalid": self.excluded_invalid, "excluded_nonfinite": self.excluded_nonfinite,
            "train_top1_pct": metric("train", "top1"), "select_top1_pct": metric("select", "top1"), "report_top1_pct": metric("report", "top1"),
            "train_top5_pct": metric("train", "top5"), "select_top5_pct": metric("select", "top5"), "report_top5_pct": metric("report", "top5"),
            "diverged": False, "protocol_hash": p.hash, "device": str(self.dev), "dtype": str(self.dtype).replace("torch.", ""),
        })  # fmt: skip
        row.update(fields)
        return row

    def report_predictions(self, predictions: dict) -> ImagePredictions | None:
        """The selected configuration's per-image predictions on the reported rows (the selection rows
        with --select-on report; None when nothing is reported): dataset paths, targets, top-1, top-5.
        Kept on the selected row (not a CSV column) for the per-image predictions file."""
        role = self.plan.reported_role
        if role is None:
            return None
        split = self.plan.report_source  # the selection rows' split too when they are the reported ones
        assert split is not None  # set whenever a role is reported
        rows = self.kept[role]
        top1, top5 = predictions[role]
        return ImagePredictions(paths=self.info.paths(split)[rows], target=self.info.labels[split][rows], pred=top1, top5=top5)


def _add_intervals(rows: list[dict], comparison: Comparison | None) -> None:
    """The 95% intervals of every reported top-1: Wilson on every row (from the count), the
    percentile bootstrap over the images on the rows that keep per-image predictions (the
    selected ones), taken from ``comparison``'s row of the same configuration."""
    boots = {c.key: c.ci95 for c in comparison.rows} if comparison else {}
    for r in rows:
        pct, n = r.get("report_top1_pct"), r.get("n_report")
        if pct is not None and n:
            low, high = I.wilson_interval(round(pct * n / 100), n)
            r["wilson95_low"], r["wilson95_high"] = round(low, 4), round(high, 4)
        else:
            r["wilson95_low"], r["wilson95_high"] = None, None
        boot = boots[ConfigKey.of_row(r)] if r.get("selected") and r.get("report_predictions") is not None else None
        if boot is not None and pct is not None and np.isfinite(boot).all():
            r["ci95_low"], r["ci95_high"] = round(boot[0], 4), round(boot[1], 4)
        else:
            r["ci95_low"], r["ci95_high"] = None, None
