"""``featstore extract ... --repair``: make a damaged store's damaged units pending again, so that
the ordinary resume re-extracts just them.

The store is verified (:func:`.verify.verify_store`). Every intact unit of a complete store gets
its completion marker back (its rows, its invalid rows with their reasons and its digests, as
recorded), the damaged units get none, and ``complete`` is cleared last: a repair killed at any
point leaves a store that the same command (with or without ``--repair``) resumes exactly. Damaged
create-time arrays (labels, paths) are rewritten from the dataset's manifest, which the cache key
guarantees is the one the store was made from; damaged dense targets are written again from the
dataset's target files (their digest is in the cache key too).

A store written before digests existed gets its intact units' digests from their rows as they are
now (they passed every other check), so it is protected from then on. An array's own zarr.json
that is missing or unreadable is written back from the consolidated metadata first. Other damage
that is not in a unit's rows (an array's metadata otherwise, a missing array) cannot be repaired
this way: that is refused with ``--overwrite`` as the way out.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..atomic import write_atomic
from ..errors import FeatstoreError
from .digests import ATTRIBUTE, Recorded, digests_of, unit_bounds
from .feature_store import FeatureStore
from .locations import PROGRESS
from .verify import OWN_METADATA_MISSING, OWN_METADATA_UNREADABLE, Problem, consolidated_entries, verify_store


def _restore_own_metadata(store: FeatureStore, problems: list[Problem], log: Callable[[str], None]) -> int:
    """Write an array's own zarr.json back from the store's consolidated metadata (which featstore
    reads, and verify checks every array's shape and dtype against) where it is missing or
    unreadable; returns how many were. Without it, the re-consolidation at the end of the repair
    would drop the array, and the store would lose it."""
    root = store.path
    if not isinstance(root, Path):
        return 0
    entries = consolidated_entries(root)
    restored = 0
    for p in problems:
        entry = entries.get(f"{p.split}/{p.array}")
        if p.what in (OWN_METADATA_MISSING, OWN_METADATA_UNREADABLE) and isinstance(entry, dict) and entry.get("node_type") == "array":
            folder = root / str(p.split) / str(p.array)
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(folder / "zarr.json", json.dumps(entry, indent=2))
            log(f"restored {p.split}/{p.array}/zarr.json from the store's consolidated metadata")
            restored += 1
    return restored


def reopen_damaged(store: FeatureStore, plan: dict[str, tuple[list[str], np.ndarray]], log: Callable[[str], None] = lambda s: None) -> int:
    """Verify ``store`` and make what is damaged pending again; ``plan``: split → (paths, labels)
    of the dataset. Returns the number of units to re-extract (0 and nothing changed: intact)."""
    report = verify_store(store)
    if report.ok:
        return 0
    if _restore_own_metadata(store, report.problems, log):
        report = verify_store(store)  # again, with the arrays' own files back: what is left is in the rows
        if report.ok:
            return 0
    for problem in report.problems:
        log(f"damaged: {problem.line()}")
    unrepairable = [p for p in report.problems if p.rows is None and p.split is not None and p.array not in ("labels", "paths")]
    unrepairable += [p for p in report.problems if p.split is None and not report.damaged_plan]
    if unrepairable:
        raise FeatstoreError(
            f"store {str(store.path)!r} cannot be repaired unit by unit: {unrepairable[0].line()}",
            "re-extract it with the same command and --overwrite",
        )
    for split in sorted(report.damaged_plan):
        _rewrite_created(store, split, plan[split])
    damaged = {s: set(units) for s, units in report.damaged_units.items()}
    if store.complete:
        recorded = store.digests
        for split in store.splits:
            (store._local / PROGRESS / split).mkdir(parents=True, exist_ok=True)
            invalid = {int(r["row"]): str(r.get("reason", "")) for r in store.invalid_rows(split)}
            created = set(recorded.created.get(split, []))
            for unit in store.units(split):
                if unit.index in damaged.get(split, set()):
                    continue
                digests = {
                    name: values[unit.index]
                    for name, values in recorded.splits.get(split, {}).items()
                    if name not in created and unit.index < len(values)
                }
                if not recorded.present:
                    digests = store._unit_digests(unit, {})
                marker = {
                    "rows": [unit.start, unit.stop],
                    "invalid": {str(r): why for r, why in sorted(invalid.items()) if unit.start <= r < unit.stop},
                    "written": None,  # kept from before the repair
                    "digests": digests,
                }
                path = store._marker(unit)
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, json.dumps(marker))
        store.update_attrs({"complete": False})  # last: until here the store reads as it was
    else:
        for split, units in damaged.items():
            for unit in store.units(split):
                if unit.index in units:
                    store._marker(unit).unlink(missing_ok=True)
    if any(p.array is not None and p.array.startswith("targets/") for p in report.problems):
        # dense targets are not a unit's own rows: without their record, the resume writes them all again
        # from the dataset's target files (the cache key holds their digest), before the damaged units
        store.remove_attrs("targets")
    return sum(len(u) for u in damaged.values())


def _rewrite_created(store: FeatureStore, split: str, plan: tuple[list[str], np.ndarray]) -> None:
    """Labels and paths of ``split`` written again from the dataset, with their digests."""
    paths, labels = plan
    group = store.split_group(split)
    n = store.num_rows(split)
    if len(paths) != n:
        raise FeatstoreError(f"the dataset's split {split!r} has {len(paths)} rows, the store {n}", "re-extract it with --overwrite")
    group["labels"][:] = np.asarray(labels, np.int32)
    group["paths"][:] = np.asarray(paths, dtype=object)
    recorded = store.digests
    if not recorded.present:
        return  # a store without digests: its units' markers will carry them
    bounds = unit_bounds(n, store.chunk_rows)
    for name in ("labels", "paths"):
        values = np.asarray(group[name][:])
        recorded.splits.setdefault(split, {})[name] = [d for _, d in sorted(digests_of(values, bounds).items())]
    store.update_attrs({ATTRIBUTE: Recorded.to_attrs(recorded)})
