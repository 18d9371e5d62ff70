"""Reading results rows (probe.fit's dicts, or results.csv read back): which probe a row belongs to,
on what its configuration was chosen, and whether a run is more than one linear sweep."""

from __future__ import annotations

from ..protocol import Protocol

# the columns that name one probe (one line in the plot, one row in the table)
PROBE_KEY = ("label", "view")


def by_probe(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows grouped by probe (label × view), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in PROBE_KEY), []).append(r)
    return groups


def probe_name(key: tuple, with_view: bool) -> str:
    label, view = key[0], key[1]
    return f"{label} [{view}]" if with_view else label


def selection_words(row: dict, protocol: Protocol | None) -> str:
    if row["select_split"] != "holdout":
        return row["select_split"]
    what = "train" if row["train_split"] == "train" else repr(row["train_split"])
    return f"{protocol.val_fraction * 100:g}% {what} holdout" if protocol else f"{what} holdout"


def chosen_on_report(row: dict) -> bool:
    """--select-on report: the row's LR, k or C was chosen on the split it reports."""
    return row["report_split"] is not None and row["select_split"] == row["report_split"]


def is_battery(rows: list[dict]) -> bool:
    """More than today's single linear sweep: other methods, several seeds or few-shot sizes."""
    return any(r.get("method", "linear") != "linear" or r.get("shots") is not None for r in rows) or len({r["seed"] for r in rows}) > 1


_SETTINGS = ("method", "seed", "shots", "lr", "wd", "k", "C")  # a configuration within one probe's rows


def sweep_rows(rows: list[dict]) -> list[dict]:
    """The rows of the sweeps themselves: the configurations compared on the selection split (not the refits)."""
    return [r for r in rows if not r.get("refit")]


def chosen_on_selection(rows: list[dict], selected: dict) -> dict:
    """The row of the configuration chosen on the selection split: ``selected`` itself, or, when it
    is a refit (trained on train + selection rows, so without a selection-split number), the
    sweep's row of the same settings in ``rows``."""
    if not selected.get("refit"):
        return selected
    key = tuple(selected.get(c) for c in _SETTINGS)
    return next((r for r in sweep_rows(rows) if tuple(r.get(c) for c in _SETTINGS) == key), selected)
