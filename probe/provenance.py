"""What makes a probe run repeatable and citable: the command line, the package version and git
commit it ran, and each store's absolute location and content digest (protocol.json's ``run``).

:func:`store_digest` is the one place that says what "the same store" means, so that it can later
use the per-unit content digests a store records itself where it has them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
from pathlib import Path

import numpy as np

from featstore.store import FeatureStore, is_url
from featstore.version import __version__

CONTENT = "content-attrs+unit-digests/sha256"  # a store that records per-unit content digests (featstore verify)
UNIT_DIGESTS = "attrs+unit-digests/sha256"  # the same with the run log: what records written before CONTENT name
END_CHUNKS = "attrs+labels+valid+end-chunks/sha256"  # a store written before unit digests
SCHEMES = (CONTENT, UNIT_DIGESTS, END_CHUNKS)  # recorded beside every digest: another scheme is never compared with it

# when, how long, where and by which command a store was extracted (or exported): the same
# extraction run again renews them over bit-identical features, so they are no part of its content
RUN_LOG = frozenset(
    {
        "created",
        "completed",
        "command",
        "run_seconds",
        "images_per_second",
        "device",
        "batch_size",
        "world_size",
        "job",
        "exported",
        "exported_from",
    }
)


def digest_scheme(fs: FeatureStore) -> str:
    """How :func:`store_digest` takes this store's digest (the scheme a new record names)."""
    return CONTENT if fs.digests.present else END_CHUNKS


def schemes_of(fs: FeatureStore) -> tuple[str, ...]:
    """Every scheme this store's digest can be taken by: with unit digests, also the older form."""
    return (CONTENT, UNIT_DIGESTS) if fs.digests.present else (END_CHUNKS,)


def content_attrs(attrs: dict) -> dict:
    """A store's attributes less its run log (:data:`RUN_LOG`)."""
    return {k: v for k, v in attrs.items() if k not in RUN_LOG}


def store_digest(fs: FeatureStore, scheme: str | None = None) -> str:
    """A stable digest of a complete store's content, by ``scheme`` (default :func:`digest_scheme`).

    A store that records per-unit content digests (every array of every unit, :mod:`featstore.store.digests`)
    is named by sha256 over its attributes, those digests included, less the run log (``CONTENT``:
    encoder and weights digest, preprocessing, dataset manifest, splits and classes, views, dtype,
    invalid rows; when, how long and where it was extracted do not); ``UNIT_DIGESTS``, the
    form records written before ``CONTENT`` hold, counts the run log too. No data is read, and a
    value edited in place is refused by the verified read itself. A store written before unit
    digests is named by sha256 over all its attributes (with the completion time every
    re-extraction renews), every split's labels and validity mask, and the features of each split's
    first and last chunk of rows in every view; that bounded read misses features rewritten in place
    only in the middle, with the same attributes."""
    scheme = scheme or digest_scheme(fs)
    if scheme not in schemes_of(fs):
        raise ValueError(f"a digest by {scheme!r} is not taken of store {str(fs.path)!r}; it has {schemes_of(fs)}")
    h = hashlib.sha256()
    attrs = content_attrs(fs.attrs) if scheme == CONTENT else fs.attrs
    h.update(json.dumps(attrs, sort_keys=True, separators=(",", ":"), default=str).encode())
    if scheme != END_CHUNKS:
        return h.hexdigest()
    for split in sorted(fs.splits):
        h.update(split.encode() + b"\0")
        h.update(np.ascontiguousarray(fs.labels(split), dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(fs.valid(split), dtype=bool).tobytes())
        n, rows = fs.num_rows(split), fs.chunk_rows
        ends = sorted({(0, min(rows, n)), (max(0, n - rows), n)})
        for view in sorted(fs.views):
            for start, stop in ends:
                h.update(view.encode() + b"\0")
                h.update(np.ascontiguousarray(fs.features(split, view)[start:stop]).tobytes())
    return h.hexdigest()


def location(fs: FeatureStore) -> str:
    """The store's absolute path (a URL as it is): where a rerun finds it from any folder."""
    return absolute(str(fs.path))


def absolute(path: str) -> str:
    """``path`` made absolute; a URL as it is."""
    return path if is_url(path) else os.path.abspath(path)


def git_commit(source: Path | None = None) -> dict[str, str | bool | None]:
    """The commit of the git checkout this package runs from (``commit``; None when it is not run
    from one, e.g. an installed wheel) and whether tracked files differ from it (``dirty``)."""
    package = (source or Path(__file__).resolve().parent).resolve()

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    # a checkout of this project: the package folder sits at its top (not a venv inside someone's repo)
    if top is None or Path(top).resolve() != package.parent:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def environment(command: list[str] | None) -> dict:
    """The run record's provenance: the command line (as a list and as one shell line), the
    working folder it ran in, the featstore version and git commit."""
    git = git_commit()
    return {
        "command": list(command) if command is not None else None,
        "command_line": shlex.join(command) if command is not None else None,
        "cwd": os.getcwd(),
        "featstore_version": __version__,
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
    }


def store_record(fs: FeatureStore) -> dict:
    """A store's location and digest, as protocol.json records them."""
    return {"location": location(fs), "digest": store_digest(fs), "digest_scheme": digest_scheme(fs)}
