"""The stores a dense probe reads, opened as ``probe fit`` opens them for the linear probes: complete,
their arrays as their schema says, and (unless ``--no-verify``) every unit read — patch tokens and
targets alike — checked against the content digest its extraction recorded."""

from __future__ import annotations

from collections.abc import Callable

from featstore.store import FeatureStore
from featstore.store.verify import require_readable


def open_verified(path: str, verify: bool, warn: Callable[[str], None]) -> FeatureStore:
    """A complete, schema-consistent store; with ``verify`` a damaged unit is refused when read,
    naming the split, array and rows (and the command that repairs it)."""
    fs = FeatureStore.open(path, verify=verify).require_complete()
    require_readable(fs)
    if verify and not fs.digests.present:
        warn(
            f"warning: store {path!r} records no content digests (written before featstore recorded them): its tokens and "
            "targets are read unchecked; `featstore extract ... --repair` adds digests"
        )
    return fs
