"""Per-image predictions of the selected heads: the ``predictions.csv`` format, written and read.

One row per image of the report split per selected head (store × view × method × shots ×
seed). Rows are identified by the image's dataset path, so two encoders' predictions pair
exactly, and any comparison can be recomputed later without the features.

    label,store,view,method,shots,seed,path,target,pred,correct,top5
    r18,feats/r18.zarr,pool,linear,,0,val/n01440764/x.JPEG,0,0,1,0 7 3 9 2

``shots`` is empty for "every training row"; ``top5`` holds the five best classes, best first,
space separated (empty with fewer than 5 classes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from featstore.errors import UsageError

from . import table_csv

PREDICTIONS = "predictions.csv"
COLUMNS = ["label", "store", "view", "method", "shots", "seed", "path", "target", "pred", "correct", "top5"]


class ConfigKey(NamedTuple):
    """Which selected configuration a row, a prediction set or a comparison row is: the one identity
    they are matched by. ``shots`` is "" for every training row."""

    label: str
    view: str
    method: str
    shots: str
    seed: int

    @classmethod
    def make(cls, label, view, method, shots, seed) -> ConfigKey:
        """The key with the CSV's spellings normalised: no method = linear, no shots = "", no seed = 0."""
        return cls(str(label), str(view), method or "linear", "" if shots is None else str(shots), int(seed or 0))

    @classmethod
    def of_row(cls, row: dict, label: str | None = None) -> ConfigKey:
        """A results row's key (probe.fit's or results.csv's), under ``label`` when given, else its ``label`` column."""
        return cls.make(row["label"] if label is None else label, row["view"], row.get("method"), row.get("shots"), row.get("seed"))


@dataclass(eq=False)  # arrays inside: identity, not element-wise, equality
class Predictions:
    """One selected head's predictions on the images of the report split."""

    label: str
    store: str
    view: str
    method: str
    shots: str  # "" = every training row; else the number of examples per class
    seed: int
    paths: np.ndarray  # (N,) str, dataset-relative
    target: np.ndarray  # (N,) int64
    pred: np.ndarray  # (N,) int64, top-1 class
    top5: np.ndarray | None = field(default=None)  # (N, 5) int64, best first; None with < 5 classes

    def __post_init__(self):
        self.paths = np.asarray(self.paths, dtype=str)
        self.target = np.asarray(self.target, dtype=np.int64)
        self.pred = np.asarray(self.pred, dtype=np.int64)
        self.shots = "" if self.shots is None else str(self.shots)
        self.seed = int(self.seed)
        if self.top5 is not None:
            self.top5 = np.asarray(self.top5, dtype=np.int64)
            if self.top5.ndim != 2 or self.top5.shape[1] < 5:
                self.top5 = None  # fewer than 5 classes: no top-5
        n = len(self.paths)
        if len(self.target) != n or len(self.pred) != n or (self.top5 is not None and len(self.top5) != n):
            raise ValueError("paths, target, pred and top5 must have one entry per image")

    @property
    def correct(self) -> np.ndarray:
        return self.pred == self.target

    @property
    def key(self) -> ConfigKey:
        return ConfigKey(self.label, self.view, self.method, self.shots, self.seed)


class ImagePredictions(dict):
    """``paths``, ``target``, ``pred``, ``top5`` of one selected configuration, as ``probe.fit``
    keeps them on its row (``report_predictions``). Equal when the arrays are, so rows of two
    runs compare with ``==`` as plain rows do."""

    def __eq__(self, other) -> bool:
        if not isinstance(other, dict) or self.keys() != other.keys():
            return False
        return all(
            (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
            for a, b in ((self[k], other[k]) for k in self)
        )

    def __ne__(self, other) -> bool:  # dict's own __ne__ would compare the arrays element-wise
        return not self.__eq__(other)

    __hash__ = None  # mutable, like dict


def of_rows(rows: list[dict]) -> list[Predictions]:
    """The predictions that ``probe.fit`` keeps on its selected rows (``report_predictions``: paths,
    target, pred, top5), one set per store × view × method × shots × seed, in row order."""
    out = []
    for r in rows:
        p = r.get("report_predictions")
        if r.get("selected") and p is not None:
            key = ConfigKey.of_row(r)
            out.append(Predictions(key.label, r["store"], key.view, key.method, key.shots, key.seed, **p))
    return out


def align(a: Predictions, b: Predictions) -> tuple[np.ndarray, np.ndarray]:
    """Indices (ia, ib) of the images both hold, in ``a``'s order: ``a.paths[ia] == b.paths[ib]``."""
    where = {p: i for i, p in enumerate(b.paths.tolist())}
    ia = np.array([i for i, p in enumerate(a.paths.tolist()) if p in where], dtype=np.int64)
    ib = np.array([where[p] for p in a.paths[ia].tolist()], dtype=np.int64)
    return ia, ib


def csv_text(predictions: list[Predictions]) -> str:
    return table_csv.csv_text(COLUMNS, _lines(predictions))


def _lines(predictions: list[Predictions]):
    for p in predictions:
        head = [p.label, p.store, p.view, p.method, p.shots, p.seed]
        top5 = [" ".join(map(str, row)) for row in p.top5.tolist()] if p.top5 is not None else [""] * len(p.paths)
        correct = p.correct.astype(np.int8).tolist()
        for path, t, y, c, t5 in zip(p.paths.tolist(), p.target.tolist(), p.pred.tolist(), correct, top5):
            yield head + [path, t, y, c, t5]


def write(predictions: list[Predictions], path: str | os.PathLike) -> None:
    Path(path).write_text(csv_text(predictions))


def read(path: str | os.PathLike) -> list[Predictions]:
    """The predictions of every selected head in ``path``, in file order."""
    path = Path(path)
    groups: dict[tuple, dict] = {}
    with table_csv.reading(path) as (columns, lines):
        missing = [c for c in COLUMNS if c not in columns]
        if missing:
            raise UsageError(
                f"{str(path)!r} is not a predictions file: no column {', '.join(missing)}",
                "it is written by `probe fit` beside results.csv",
            )
        for line, r in lines:
            key = (r["label"], r["store"], r["view"], r["method"], r["shots"], r["seed"])
            g = groups.setdefault(key, {"paths": [], "target": [], "pred": [], "top5": []})
            try:
                g["target"].append(int(r["target"]))
                g["pred"].append(int(r["pred"]))
                g["top5"].append([int(v) for v in r["top5"].split()] if r["top5"] else None)
            except ValueError:
                raise UsageError(
                    f"{str(path)!r} line {line}: target, pred and top5 must be class indices",
                    "the file was edited or truncated; rerun probe fit",
                ) from None
            g["paths"].append(r["path"])
    out = []
    for (label, store, view, method, shots, seed), g in groups.items():
        top5 = np.array(g["top5"], dtype=np.int64) if g["top5"] and all(t is not None and len(t) == 5 for t in g["top5"]) else None
        out.append(Predictions(label, store, view, method, shots, int(seed or 0), g["paths"], g["target"], g["pred"], top5))
    return out
