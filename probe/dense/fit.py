"""``probe fit --task depth|seg``: every (lr, wd) dense head trained at once on a patch view of each
store, the head chosen on a split that is not reported (as for the linear probes: the store's val
when test is reported, else a seeded train holdout), the chosen head reported once.

Writes into ``--out``: results.csv (one row per store × head: lr, wd, train loss, the selection and
report metrics; ``selected`` marks the chosen one), predictions.csv (the reported images' metrics
under the chosen head, one row per store × image), protocol.json (the protocol, the head and its
hash; ``task`` tells ``probe compare`` it is a dense run), confusion.npz (seg: per-image confusion
matrices) and, with ``--save-predictions``, predictions/<label>.npz (the reported split's depth maps
or label maps at target resolution, with their store rows) so every metric can be recomputed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featstore.atomic import atomic_folder
from featstore.errors import UsageError
from featstore.store import FeatureStore, target_info, target_valid

from ..methods.heads import schedule_factor
from ..methods.token_rows import default_memory, minibatches_per_epoch
from ..output.files import check_out
from ..protocol import Protocol
from ..results import markdown_cells, table_csv
from ..selection import SplitPlan, choose, plan_splits
from ..stores import StoreSpec, assign_labels, open_checked, parse_store_spec
from . import metrics
from . import targets as dense_targets
from .allocator import fix_mmap_threshold, step_heap
from .compare import safe_name
from .heads import DenseHeads, DenseSpec
from .precision import matmul_dtype
from .prediction_file import PredictionFile, write_npz
from .tokens import Tokens, train_stats

TASKS = ("depth", "seg")
DEPTH_HEADS = ("bins", "linear")
TARGET_KIND = {"depth": "depth", "seg": "mask"}
CLS_OF = {"patch": "cls", "patch4": "cls4"}  # DINOv2's lin.1 / lin.4: patch tokens ⊕ the CLS of the same layers
DEFAULT_BATCH = 16  # images per minibatch (DINOv2's depth runs 2 per GPU × 8; 16 keeps CPU GEMMs efficient)
N_BINS = 256
UPSAMPLE = 4  # the loss resolution: at most 4× the token grid (DINOv2's head upsamples its input 4×)
_EVAL_ELEMENTS = 1 << 25  # prediction elements per evaluation batch


@dataclass
class _Store:
    label: str
    path: str
    fs: FeatureStore
    view: str
    cls_view: str | None
    plan: SplitPlan
    rows: dict[str, np.ndarray]  # role → usable rows (valid image and target) of the role's source split


@dataclass
class DenseResult:
    """What :func:`fit_dense` returns: results.csv's rows, the per-image rows, where they were written."""

    rows: list[dict[str, Any]]
    images: list[dict[str, Any]]
    out: Path
    files: list[str] = field(default_factory=list)


def parse_memory(text: str | int | None) -> int | None:
    """``--max-memory``: bytes, or a number with K/M/G (powers of 1024)."""
    if text is None or isinstance(text, int):
        return text
    s = str(text).strip().upper().removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
    try:
        value = float(s[:-1] if scale > 1 else s) * scale
    except ValueError:
        raise UsageError(f"bad --max-memory {text!r}", "pass bytes or a size like 512M or 8G") from None
    if value < 1 << 20:
        raise UsageError(f"--max-memory {text!r} is below 1 MiB", "pass a size like 512M or 8G")
    return int(value)


def _open(
    specs: list[StoreSpec], task: str, view: str | None, allow_different_data: bool, verify: bool, log: Callable[[str], None]
) -> list[tuple[StoreSpec, FeatureStore, str, str | None]]:
    opened = []
    for spec in specs:
        fs = open_checked(spec.path, verify, lambda m: log(f"warning: {m}"), read="its tokens and targets")
        v = spec.view or view or next((p for p in ("patch", "patch4") if p in fs.patch_views), next(iter(fs.patch_views), None))
        if v is None or v not in fs.patch_views:
            have = ", ".join(fs.patch_views) or "none"
            raise UsageError(f"store {spec.path!r} has no patch view {v or ''!s}".rstrip() + f" (its patch views: {have})",
                             "extract one with `featstore extract --views patch` (or patch4)")  # fmt: skip
        kind = TARGET_KIND[task]
        info = target_info(fs)
        if kind not in info.get("kinds", []):
            raise UsageError(f"store {spec.path!r} has no {kind} targets", "extract a dataset with dense targets (docs/dense.md)")
        cls_view = CLS_OF.get(v) if task == "depth" and CLS_OF.get(v) in fs.views else None
        opened.append((spec, fs, v, cls_view))
    first = opened[0][1]
    for spec, fs, _, _ in opened[1:]:
        for what, a, b in (
            ("images", first.meta.dataset.manifest_sha256, fs.meta.dataset.manifest_sha256),
            ("targets", target_info(first).get("files_sha256"), target_info(fs).get("files_sha256")),
            ("target size", target_info(first).get("size"), target_info(fs).get("size")),
        ):
            if a != b and not allow_different_data:
                raise UsageError(f"store {spec.path!r} has other {what} than {opened[0][0].path!r}",
                                 "dense probes compare stores of the same images and targets; pass --allow-different-data to run anyway")  # fmt: skip
        if task == "seg" and target_info(first).get("num_classes") != target_info(fs).get("num_classes"):
            # every store gets the first store's head (one protocol), which cannot score another label set
            raise UsageError(f"store {spec.path!r} has {target_info(fs).get('num_classes')} segmentation classes, "
                             f"{opened[0][0].path!r} has {target_info(first).get('num_classes')}",
                             "compare stores of one label set (--allow-different-data allows other images, not other classes)")  # fmt: skip
    return opened


def _plan(fs: FeatureStore, path: str, protocol: Protocol) -> tuple[SplitPlan, dict[str, np.ndarray]]:
    sizes = {s: fs.num_rows(s) for s in fs.splits}
    plan = plan_splits(path, sizes, lambda s: np.zeros(sizes[s], np.int64), protocol.val_fraction, protocol.seed, protocol.select_on)
    rows = {}
    for role, source, chosen in (("train", plan.train_split, plan.train_rows), ("select", plan.select_source, plan.select_rows),
                                 ("report", plan.report_source, plan.report_rows)):  # fmt: skip
        if source is None or chosen is None:
            continue
        usable = target_valid(fs, source)
        rows[role] = np.asarray(chosen, np.int64)[usable[chosen]]
    sources = {"train": plan.train_split, "select": plan.select_source, "report": plan.report_source}
    for role, name in (("train", "train"), ("select", "selection"), ("report", "report")):
        if role in rows and len(rows[role]) == 0:  # else: train has nothing to learn, or every head scores NaN ("diverged")
            raise UsageError(
                f"store {path!r}: no {name} rows ({sources[role]}) with a usable target",
                "check the dataset's targets (featstore info lists invalid rows)",
            )
    return plan, rows


def _loss_targets(target: np.ndarray, size: tuple[int, int], task: str) -> torch.Tensor:
    return dense_targets.at_size(target, size, task)


def _dense_spec(task: str, head: str, fs: FeatureStore, view: str, train_rows: np.ndarray, split: str) -> DenseSpec:
    h, w, _ = fs.patch_views[view]
    size = target_info(fs)["size"]
    loss_size = (min(int(size[0]), UPSAMPLE * h), min(int(size[1]), UPSAMPLE * w))
    if task == "seg":
        return DenseSpec("seg", "seg", int(target_info(fs)["num_classes"]), loss_size=loss_size)
    top, mean_log = dense_targets.depth_range(dense_targets.targets(fs, split, "depth", train_rows))
    max_depth = float(math.ceil(top * 1.05 * 10) / 10)  # the bins cover the train depths with a margin, in 10 cm steps
    log_mean = round(mean_log, 6) if mean_log is not None else None
    return DenseSpec("depth", head, N_BINS if head == "bins" else 1, 1e-3, max_depth, loss_size, log_mean if head == "linear" else None)


def _train(
    heads: DenseHeads, tokens: Tokens, targets: torch.Tensor, protocol: Protocol, seed: int, log: Callable[[str], None]
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    bs = protocol.batch_size
    total, step = protocol.epochs * minibatches_per_epoch(len(tokens), tokens.block_rows, bs), 0
    targets = targets.to(heads.device)
    loss = torch.zeros(heads.num_heads)
    for epoch in range(protocol.epochs):
        loss.zero_()
        for positions, (patches, cls) in tokens.epoch(generator, bs):
            with step_heap():
                batch_loss = heads.train_step(patches, cls, targets[torch.as_tensor(positions, device=heads.device)], protocol,
                                              schedule_factor(protocol, step, total))  # fmt: skip
            loss += batch_loss.cpu() * len(positions)
            step += 1
        log(f"  epoch {epoch + 1}/{protocol.epochs}: best head loss {float(torch.nan_to_num(loss / len(tokens), nan=math.inf).min()):.4f}")
    return loss / len(tokens)


@torch.no_grad()
def _evaluate(
    heads: DenseHeads,
    tokens: Tokens,
    target: dense_targets.TargetRows,
    keep: int | None,
    sink: PredictionFile | None = None,
    budget: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """Per head: per-image metrics (depth; seg: per-image mIoU and pixel accuracy and the summed
    confusion matrix under "confusion_sum"); for head ``keep`` (seg) also the per-image confusion
    matrices under "confusion". The predictions of head ``keep`` (depth maps float32 / label maps
    uint8) go to ``sink`` batch by batch. Memory: one batch of predictions and targets, plus
    O(N × G) per-image numbers (and O(N × K²) confusions of one head)."""
    g, size = heads.num_heads, target.shape[1:]
    k = heads.num_classes
    per_pixel = g * int(np.prod(size)) * (k if heads.spec.task == "seg" else 1)
    elements = _EVAL_ELEMENTS if budget is None else max(1, min(_EVAL_ELEMENTS, budget // 16))
    batch = max(1, min(elements // per_pixel, tokens.block_rows))  # the tokens' memory bound holds here too
    parts: list[list[dict[str, np.ndarray]]] = [[] for _ in range(g)]
    sums = np.zeros((g, k, k), np.int64) if heads.spec.task == "seg" else None
    for positions, (patches, cls) in tokens.in_order(batch):
        out = heads.predict(patches, cls, (int(size[0]), int(size[1])))
        gt = dense_targets.read(target, positions)
        if sums is not None:
            labels = out.argmax(dim=2).cpu().numpy().astype(np.uint8)  # (B, G, H, W)
            conf = metrics.confusions(labels, gt, k)  # (B, G, K, K)
            sums += conf.sum(0)
            for h in range(g):
                parts[h].append(metrics.seg_per_image_from_confusion(conf[:, h]))
            if keep is not None:
                parts[keep][-1]["confusion"] = conf[:, keep]
                if sink is not None:
                    sink.append(labels[:, keep])
        else:
            depth = out.cpu().numpy()  # (B, G, H, W)
            for h in range(g):
                per = {f"{m}": v for m, v in metrics.depth_per_image(depth[:, h], gt).items()}
                per.update({f"{m}_ssa": v for m, v in metrics.depth_per_image(depth[:, h], gt, aligned=True).items()})
                parts[h].append(per)
            if sink is not None and keep is not None:
                sink.append(depth[:, keep])
        del out
    joined = [{name: np.concatenate([p[name] for p in head]) for name in head[0]} if head else {} for head in parts]
    if sums is not None:
        for h, head in enumerate(joined):
            head["confusion_sum"] = sums[h]
    return joined


def _summary(task: str, per_image: dict[str, np.ndarray]) -> dict[str, float]:
    """The reported numbers of one head on one split (means over images; seg: one confusion matrix)."""
    if not per_image:
        return {}
    if task == "seg":
        return metrics.seg_scores(per_image["confusion_sum"])
    return {m: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for m, v in per_image.items() if v.ndim == 1}


def dense_hash(protocol: Protocol, spec: DenseSpec, view: str) -> str:
    record = {"protocol": protocol.to_dict(), "dense": spec.to_dict(), "view": view}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def fit_dense(
    stores: Sequence[str | os.PathLike[str] | StoreSpec],
    protocol: Protocol,
    task: str,
    *,
    view: str | None = None,
    head: str = "bins",
    out: str | os.PathLike[str],
    overwrite: bool = False,
    save_predictions: bool = False,
    max_memory: int | None = None,
    device: str = "auto",
    allow_different_data: bool = False,
    log: Callable[[str], None] = lambda s: None,
    verify: bool = True,
    precision: str = "auto",
) -> DenseResult:
    """Train and select the dense heads of ``task`` on each store, write the results folder ``out``."""
    if task not in TASKS:
        raise UsageError(f"unknown dense task {task!r}", f"use one of {', '.join(TASKS)}")
    if head not in DEPTH_HEADS:
        raise UsageError(f"unknown depth head {head!r}", f"use one of {', '.join(DEPTH_HEADS)}")
    if protocol.normalize != "standardize":
        raise UsageError(f"dense probes standardize their tokens (DINOv2's BatchNorm), not --normalize {protocol.normalize}",
                         "leave --normalize at standardize")  # fmt: skip
    out = Path(os.path.abspath(check_out(out, overwrite)))
    fix_mmap_threshold()  # streamed blocks must not fragment the heap (allocator.py): peak memory then stays flat as N grows
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    budget = max_memory or default_memory(dev)
    low = ran = matmul_dtype(precision, dev)
    specs = [parse_store_spec(s) for s in stores]
    if not specs:
        raise UsageError("no store given", "pass --store PATH")
    opened = _open(specs, task, view, allow_different_data, verify, log)
    labels = assign_labels([s for s, _, _, _ in opened], [fs for _, fs, _, _ in opened])
    rows_out: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    saved: dict[str, dict[str, Any]] = {}
    scratch: Path | None = None  # --save-predictions' maps on disk until the results folder is written
    confusions: dict[str, np.ndarray] = {}
    spec0: DenseSpec | None = None
    reported_as = ""
    try:
        for (sspec, fs, v, cls_view), label in zip(opened, labels):
            plan, rows = _plan(fs, sspec.path, protocol)
            reported_as = plan.reported_as
            spec = _dense_spec(task, head, fs, v, rows["train"], plan.train_split)
            spec0 = spec0 or spec
            if spec != spec0:
                spec = spec0  # every store gets the same head (the bins of the first store's train depths)
            kind = TARGET_KIND[task]
            log(f"{label} [{v}{' ⊕ ' + cls_view if cls_view else ''}]: {task} ({spec.head}), {len(protocol.heads)} heads, "
                f"{len(rows['train'])} train rows, loss at {spec.loss_size[0]}×{spec.loss_size[1]}")  # fmt: skip
            stats = train_stats(
                fs, plan.train_split, v, cls_view, rows["train"], max(1, budget // (int(np.prod(fs.patch_views[v])) * 8)), dev
            )
            train = Tokens(fs, plan.train_split, v, cls_view, rows["train"], stats, dev, budget)
            if not train.in_memory:
                log(f"  streaming: {train.block_rows} rows per block (--max-memory {budget / (1 << 20):.0f} MiB)")
            c = fs.patch_views[v][2]
            heads = DenseHeads(spec, c, fs.views[cls_view] if cls_view else 0, [lr for lr, _ in protocol.heads],
                               [wd for _, wd in protocol.heads], dev, matmul_dtype=low)  # fmt: skip
            ran = heads.matmul_dtype  # what ran (the log-linear head keeps float32)
            start = time.perf_counter()
            loss_targets = dense_targets.loss_targets(
                dense_targets.targets(fs, plan.train_split, kind, rows["train"]), spec.loss_size, task
            )
            train_loss = _train(heads, train, loss_targets, protocol, protocol.seed, log)
            del loss_targets
            seconds = time.perf_counter() - start
            del train
            finite = heads.finite().cpu().numpy() & np.isfinite(train_loss.numpy())
            evaluations: dict[str, list[dict[str, np.ndarray]]] = {}
            for role in ("select", "report"):
                if role not in rows or (role == "report" and plan.selects_on_report):
                    continue
                source = plan.select_source if role == "select" else plan.report_source
                assert source is not None
                toks = Tokens(fs, source, v, cls_view, rows[role], stats, dev, budget)
                evaluations[role] = _evaluate(heads, toks, dense_targets.targets(fs, source, kind, rows[role]), None, budget=budget)
                del toks
            if plan.selects_on_report:
                evaluations["report"] = evaluations["select"]
            summaries = {role: [_summary(task, e) for e in ev] for role, ev in evaluations.items()}
            key = "miou" if task == "seg" else "rmse"
            sign = 1.0 if task == "seg" else -1.0
            scores = [sign * s.get(key, float("nan")) for s in summaries["select"]]
            usable = finite & np.isfinite(scores)
            if not usable.any():
                raise UsageError(f"store {sspec.path!r}: every head diverged", "lower the --lr-grid")
            chosen = choose(scores, [(lr, wd) for lr, wd in protocol.heads], usable)
            best_report = None
            if "report" in summaries:
                rscores = [sign * s.get(key, float("nan")) for s in summaries["report"]]
                best_report = choose(rscores, [(lr, wd) for lr, wd in protocol.heads], finite & np.isfinite(rscores))
            for i, (lr, wd) in enumerate(protocol.heads):
                row: dict[str, Any] = {"store": label, "path": sspec.path, "view": v, "task": task, "head": spec.head, "lr": lr, "wd": wd,
                                       "selected": i == chosen, "best_report": i == best_report, "diverged": not finite[i],
                                       "train_loss": float(train_loss[i]), "train_seconds": round(seconds, 3),
                                       "select_split": plan.selection_label, "report_split": plan.report_split or ""}  # fmt: skip
                for role, prefix in (("select", "select_"), ("report", "")):
                    for m, value in summaries.get(role, [{}] * len(protocol.heads))[i].items():
                        row[prefix + m] = value
                rows_out.append(row)
            if plan.report_split is not None and plan.report_source is not None:
                source = plan.report_source
                toks = Tokens(fs, source, v, cls_view, rows["report"], stats, dev, budget)
                target = dense_targets.targets(fs, source, kind, rows["report"])
                sink = None
                if save_predictions:
                    if scratch is None:
                        out.parent.mkdir(parents=True, exist_ok=True)
                        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}-predictions-", dir=out.parent))
                    sink = PredictionFile(scratch / f"{len(saved)}.raw", target.shape, np.uint8 if task == "seg" else np.float32)
                per = _evaluate(heads, toks, target, chosen, sink, budget)[chosen]
                del toks
                paths = fs.paths(source)[rows["report"]]
                for j, r in enumerate(rows["report"].tolist()):
                    images.append({"store": label, "split": plan.report_split, "row": r, "path": str(paths[j]),
                                   **{m: float(per[m][j]) for m in per if per[m].ndim == 1}})  # fmt: skip
                if task == "seg":
                    confusions[label] = per["confusion"]
                if sink is not None:
                    sink.close()
                    saved[label] = {"prediction": sink, "rows": rows["report"], "paths": paths.astype(str), "split": np.asarray(source),
                                    "lr": np.asarray(protocol.heads[chosen][0]), "wd": np.asarray(protocol.heads[chosen][1])}  # fmt: skip
            sel = summaries["select"][chosen]
            log(f"  chosen lr {protocol.heads[chosen][0]:g} wd {protocol.heads[chosen][1]:g} ({key} {sel.get(key, float('nan')):.4f} on "
                f"{plan.selection_label}); trained in {seconds:.1f} s")  # fmt: skip
        assert spec0 is not None
        run = {"task": task, "view": view, "head": spec0.head, "dense": spec0.to_dict(), "reported_as": reported_as,
               "matmul_dtype": str(ran).replace("torch.", ""),
               "stores": [{"label": lab, "path": s.path} for (s, _, _, _), lab in zip(opened, labels)]}  # fmt: skip
        files = _write(out, rows_out, images, protocol, spec0, run, saved, confusions, view or opened[0][2])
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return DenseResult(rows_out, images, out, files)


def _write(out: Path, rows: list[dict[str, Any]], images: list[dict[str, Any]], protocol: Protocol, spec: DenseSpec, run: dict[str, Any],
           saved: dict[str, dict[str, Any]], confusions: dict[str, np.ndarray], view: str) -> list[str]:  # fmt: skip
    """The results folder, all or nothing (built beside and renamed, as probe fit's)."""
    import featstore
    from featstore.version import __version__

    del featstore
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"protocol_hash": dense_hash(protocol, spec, view), "protocol": protocol.to_dict(), "task": run["task"], "dense": spec.to_dict(),
              "run": {**run, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "featstore_version": __version__,
                      "torch_version": torch.__version__}}  # fmt: skip
    written = ["results.csv", "predictions.csv", "protocol.json"]

    def place(build: Path, target: Path) -> None:
        if target.exists():
            for name in os.listdir(build):
                os.replace(build / name, target / name)
        else:
            os.replace(build, target)

    with atomic_folder(out, "building", place) as build:
        (build / "results.csv").write_text(table_csv.csv_text(_columns(rows), rows))
        (build / "predictions.csv").write_text(table_csv.csv_text(_columns(images), images))
        (build / "protocol.json").write_text(json.dumps(record, indent=2) + "\n")
        if confusions:
            np.savez_compressed(build / "confusion.npz", **{safe_name(k): v for k, v in confusions.items()})  # type: ignore[arg-type]
            written.append("confusion.npz")
        if saved:
            (build / "predictions").mkdir()
            for label, arrays in saved.items():
                write_npz(build / "predictions" / f"{safe_name(label)}.npz", arrays)
            written.append("predictions/")
        if _plot(rows, build / f"{run['task']}_vs_lr.png"):
            written.append(f"{run['task']}_vs_lr.png")
    return written


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def _plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """The LR curves, drawn as the report draws them (selection and reported split side by side)."""
    from .report import lr_figure

    fig = lr_figure(rows, str(rows[0]["task"])) if rows else None
    if fig is None:
        return False
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def summary_table(result: DenseResult) -> str:
    """A markdown table of each store's selected head: lr, wd and the reported metrics."""
    chosen = [r for r in result.rows if r["selected"]]
    if not chosen:
        return ""
    task = chosen[0]["task"]
    names = ["miou", "pixel_acc"] if task == "seg" else [m + s for s in ("", "_ssa") for m in metrics.DEPTH_METRICS]
    names = [n for n in names if n in chosen[0]]
    head = ["store", "view", "lr", "wd", *names]
    lines = [markdown_cells.row(head), "|" + "---|" * len(head)]
    for r in chosen:
        lines.append(markdown_cells.row([str(r["store"]), str(r["view"]), f"{r['lr']:g}", f"{r['wd']:g}", *(f"{r[n]:.4f}" for n in names)]))
    return "\n".join(lines)
