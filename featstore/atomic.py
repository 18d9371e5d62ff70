"""Writing beside, then renaming: readers see the old file (or folder) or the whole new one, never half.

The one place featstore and probe spell this out:

* :func:`write_atomic` writes a text or bytes file in one call (fsynced by default);
* :func:`atomic_file` yields the temp path for a writer that takes a path (h5py, ``np.savez``);
* :func:`atomic_folder` yields a hidden folder to build a whole tree in;
* :func:`remove_folder` renames a tree out of the way, then deletes it.

A temp file is ``.NAME.PID.tmp`` beside its target (``FeatureStore.clean_temp_files`` removes a
killed writer's leftovers by that ``.tmp`` ending); a build folder is ``.NAME.TAG-PID``
(``feature_store._remove_stale_builds`` finds ``.NAME.creating-PID`` and ``.NAME.removing-PID`` by
that pattern).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def temp_path(path: Path) -> Path:
    """The hidden temp file a write of ``path`` goes through: ``.NAME.PID.tmp`` beside it."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield the temp path to write ``path`` through; it is renamed onto ``path`` when the block
    ends without error and removed when it raises (or the rename fails)."""
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: str | bytes, *, fsync: bool = True, encoding: str | None = None) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never half;
    with ``fsync`` the data is on disk before the rename. Text is written in ``encoding`` (default:
    the locale's, as ``open`` does)."""
    with atomic_file(path) as tmp:
        if isinstance(data, bytes):
            with open(tmp, "wb") as fb:
                fb.write(data)
                _sync(fb, fsync)
        else:
            with open(tmp, "w", encoding=encoding) as ft:
                ft.write(data)
                _sync(ft, fsync)


def _sync(f: IO[Any], fsync: bool) -> None:
    if fsync:
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def atomic_folder(path: Path, tag: str = "building", place: Callable[[Path, Path], None] = os.replace) -> Iterator[Path]:
    """Yield an empty hidden folder ``.NAME.TAG-PID`` beside ``path`` (a leftover of that name is
    removed first) to build ``path`` in. When the block ends without error, ``place(build, path)``
    moves it into place (default: one rename); whatever is left of the build folder afterwards, or
    after an error, is removed."""
    build = path.with_name(f".{path.name}.{tag}-{os.getpid()}")
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    try:
        yield build
        place(build, path)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def remove_folder(path: Path) -> None:
    """Delete the tree at ``path`` so that nothing is ever seen half-deleted at ``path``: renamed to
    ``.NAME.removing-PID`` first (a killed delete leaves only that hidden folder, which the next
    creation of ``path`` removes), then deleted. A symbolic link is refused (ValueError): deleting
    what it points to is not the link's deletion."""
    if path.is_symlink():
        raise ValueError(f"{str(path)!r} is a symbolic link")
    trash = path.with_name(f".{path.name}.removing-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
