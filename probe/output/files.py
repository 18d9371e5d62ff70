"""Outputs of a probe run: results.csv, protocol.json, predictions.csv (per-image predictions of the
selected heads), accuracy_vs_lr.png and a markdown summary (with intervals and, for 2+ stores, the
difference to the first store), written as one folder.

A results folder is never silently overwritten: a folder that is not empty is refused unless
``overwrite`` (and even then only when it holds a previous probe run). Everything is rendered
into a temp folder beside it first and moved into place only after all files were written, so a
failed run leaves the previous results untouched and no partial file.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from featstore.atomic import atomic_folder
from featstore.errors import FeatstoreError, UsageError
from featstore.version import __version__

from ..protocol import Protocol
from ..results import table_csv
from ..results.columns import COLUMNS
from ..results.predictions import PREDICTIONS
from ..results.predictions import of_rows as predictions_of
from ..results.predictions import write as write_predictions
from ..results.runs import PROTOCOL, RESULTS
from ..results.summary import summary_csv
from .plots import FIXED_PLOT, PLOT, plot, plot_name
from .tables import Digest, summary

SUMMARY = "summary.csv"  # results.csv and protocol.json: probe.runs (their reader); the plots' names: probe.output.plots


def csv_text(rows: list[dict]) -> str:
    """results.csv: one line per row, the columns of :data:`probe.results.columns.COLUMNS`."""
    return table_csv.csv_text(COLUMNS, rows)


def protocol_json(protocol: Protocol, run: dict | None = None) -> str:
    import torch

    record = {
        "protocol_hash": protocol.hash,
        "protocol": protocol.to_dict(),
        "run": {
            **(run or {}),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "featstore_version": __version__,
            "torch_version": torch.__version__,
        },
    }
    return json.dumps(record, indent=2) + "\n"


_OURS = (RESULTS, PROTOCOL, PLOT, FIXED_PLOT, SUMMARY, PREDICTIONS)


def check_out(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an output folder that would lose results: a file, a folder holding anything (unless
    ``overwrite``), or, even with ``overwrite``, a folder that is not a previous probe run."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file", "pass a folder (it is created if missing)")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        raise UsageError(
            f"--out {str(out)!r} already holds {', '.join(held[:3])}{'…' if len(held) > 3 else ''}",
            "pass a new --out folder, or --overwrite to replace a previous run",
        )
    if held and not any(name in _OURS for name in held):
        raise UsageError(
            f"--out {str(out)!r} holds files that are not probe results ({', '.join(held[:3])})", "pass a new or empty --out folder"
        )
    _check_writable(out)
    return out


def check_report_out(out: str | os.PathLike) -> Path:
    """``probe report``'s --out, checked before any run is read: a report folder is rewritten in
    place (its files renamed over the old ones), so only a file, or a place nothing can be written, is refused."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file", "pass a folder (it is created if missing)")
    _check_writable(out)
    return out


def _check_writable(out: Path) -> None:
    """Refuse ``out`` when its results could not be written there: the folder it would be made
    in (its nearest existing ancestor) is a file or refuses a file. Tried with a real temporary
    file, not ``os.access``: that answers yes to root on a read-only mount."""
    import tempfile

    place = Path(os.path.abspath(out))
    while not place.exists():
        place = place.parent
    if not place.is_dir():
        raise UsageError(f"--out {str(out)!r} cannot be made: {str(place)!r} is a file", "pass a folder path that is not inside a file")
    try:
        with tempfile.TemporaryFile(dir=place):
            pass
    except OSError as e:
        raise UsageError(
            f"--out {str(out)!r} is not writable ({e.strerror or type(e).__name__} in {str(place)!r})", "pass a folder you can write to"
        ) from None


def new_run_folder(parent: str | os.PathLike) -> Path:
    """A fresh ``parent/run-YYYYMMDD-HHMMSS[-N]`` path (not created): the default results folder."""
    base = Path(parent) / time.strftime("run-%Y%m%d-%H%M%S", time.gmtime())
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def write_outputs(
    rows: list[dict],
    protocol: Protocol,
    out: str | os.PathLike,
    run: dict | None = None,
    overwrite: bool = False,
    digest: Digest | None = None,
) -> dict[str, Path]:
    """Write results.csv, summary.csv, protocol.json, predictions.csv and (with linear rows)
    accuracy_vs_lr.png as the folder ``out``, all or nothing. ``digest``: the rows'
    :func:`digest_of` when the caller holds it (summary.csv is its ``summary``)."""
    out = Path(os.path.abspath(check_out(out, overwrite)))  # absolute: "." has no name to build beside
    out.parent.mkdir(parents=True, exist_ok=True)
    written = [SUMMARY, PROTOCOL, PREDICTIONS, RESULTS]

    def place(build: Path, out: Path) -> None:
        if out.exists():
            # an empty folder, or a previous run with --overwrite (checked above): its files are
            # replaced one by one, results.csv last (its presence means the run finished); the
            # folder itself (owner, permissions, a mount point) and other files stay; a plot
            # of a previous run that this run has none of is removed, not left to mislead
            for name in written:
                os.replace(build / name, out / name)
            for stale in {PLOT, FIXED_PLOT} - set(written):
                (out / stale).unlink(missing_ok=True)
        else:
            os.replace(build, out)

    try:
        with atomic_folder(out, "building", place) as build:
            (build / RESULTS).write_text(csv_text(rows))
            (build / PROTOCOL).write_text(protocol_json(protocol, run))
            (build / SUMMARY).write_text(summary_csv(digest.summary if digest else summary(rows)))
            write_predictions(predictions_of(rows), build / PREDICTIONS)
            name = plot_name(rows)
            if name:
                plot(rows, build / name, protocol)
                written.insert(0, name)
    except OSError as e:  # a full disk or a quota after training: one line (the folder is left as it was)
        raise FeatstoreError(
            f"cannot write the results to {str(out)!r}: {e.strerror or type(e).__name__}",
            "free space there (or pass another --out) and run again; nothing was written",
        ) from None
    return {name: out / name for name in written}
