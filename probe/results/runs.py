"""A results folder written by ``probe fit``, read back: results.csv, protocol.json, predictions.csv.

Used by ``probe compare`` and ``probe report``; never touches a store or the features.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from featstore.errors import UsageError

from . import predictions as P
from . import table_csv
from .columns import TEXT_COLUMNS

RESULTS, PROTOCOL = "results.csv", "protocol.json"  # the file names probe.report writes


def row_label(row: dict) -> str:
    """A results row's store label: its ``label`` column, else the store folder's name."""
    label = row.get("label")
    if label is not None and label != "":
        return str(label)
    return Path(str(row["store"]).rstrip("/")).name or str(row["store"])


def reported_top1(row: dict) -> float | None:
    """The row's accuracy on its report split (percent); also reads results.csv of before the
    ``report_*`` columns (``test_top1``, or ``val_top1`` when the run had no test split)."""
    if "report_top1_pct" in row:
        return row["report_top1_pct"]
    return row.get("test_top1") if row.get("report_split") == "test" else row.get("val_top1")


def selection_top1(row: dict) -> float | None:
    """The row's accuracy on the split its LR was selected on (percent)."""
    return row["select_top1_pct"] if "select_top1_pct" in row else row.get("val_top1")


def reported_n(row: dict) -> int | None:
    if "n_report" in row:
        return row["n_report"]
    return row.get("n_test") if row.get("report_split") == "test" else row.get("n_val")


@dataclass
class Run:
    folder: Path
    rows: list[dict]
    record: dict  # protocol.json: protocol_hash, protocol, run
    predictions: list[P.Predictions] | None  # None for results written before predictions.csv existed

    @property
    def name(self) -> str:
        return self.folder.resolve().name

    @property
    def protocol_hash(self) -> str:
        return str(self.record.get("protocol_hash") or self.rows[0].get("protocol_hash"))

    @property
    def dataset(self) -> dict:
        return (self.record.get("run") or {}).get("dataset") or {"name": self.rows[0].get("dataset")}

    @property
    def manifest_sha256(self) -> str | None:
        return self.dataset.get("manifest_sha256")

    @property
    def class_names(self) -> list[str] | None:
        return self.dataset.get("class_names")

    @property
    def report_splits(self) -> list[str]:
        """The names of the splits the selected heads were reported on (``test``, ``val``; ``none``
        where nothing was): the words "top-1 on the … split" and the report-split grouping use."""
        return sorted({str(r.get("report_split") or "none") for r in self.rows if r.get("selected")})

    @property
    def selected(self) -> list[dict]:
        return [r for r in self.rows if r.get("selected")]


def load_record(folder: str | os.PathLike) -> dict:
    """A results folder's protocol.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"results folder {str(folder)!r} not found", "pass the --out folder of a probe fit run")
    try:
        record = json.loads((folder / PROTOCOL).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(
            f"{str(folder)!r} holds no {PROTOCOL}", "results without their protocol record cannot be compared safely"
        ) from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{str(folder / PROTOCOL)!r} is not valid JSON ({e.msg})", "rerun probe fit") from None
    except UnicodeDecodeError:
        raise UsageError(f"{str(folder / PROTOCOL)!r} is not UTF-8 text", "rerun probe fit") from None
    # the record's frame, as probe fit writes it: what reads it further may then index it
    if not isinstance(record, dict) or not isinstance(record.get("protocol"), dict) or not isinstance(record.get("run", {}), dict):
        raise UsageError(
            f"{str(folder / PROTOCOL)!r} is not a protocol record of probe fit (an object with 'protocol' and 'run')", "rerun probe fit"
        )
    return record


def load(folder: str | os.PathLike) -> Run:
    folder = Path(folder)
    results = folder / RESULTS
    if not folder.is_dir():
        raise UsageError(f"results folder {str(folder)!r} not found", "pass the --out folder of a probe fit run")
    if not results.is_file():
        raise UsageError(f"{str(folder)!r} holds no {RESULTS}", "pass the --out folder of a finished probe fit run")
    with table_csv.reading(results) as (_, lines):
        rows = [{k: table_csv.value(v, k in TEXT_COLUMNS) for k, v in r.items()} for _, r in lines]
    if not rows:
        raise UsageError(f"{str(results)!r} has no rows", "rerun probe fit")
    record = load_record(folder)
    preds_path = folder / P.PREDICTIONS
    predictions = P.read(preds_path) if preds_path.is_file() else None
    return Run(folder, rows, record, predictions)


def require_predictions(run: Run) -> list[P.Predictions]:
    if run.predictions is None:
        raise UsageError(
            f"{str(run.folder)!r} holds no {P.PREDICTIONS}", "results of an older probe fit; rerun it to get per-image predictions"
        )
    if not run.predictions:
        raise UsageError(
            f"the run in {str(run.folder)!r} reported no split, so there is nothing to compare", "probe stores with a val or test split"
        )
    return run.predictions
