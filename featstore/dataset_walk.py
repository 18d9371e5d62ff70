"""Walking a class folder for its images, safely: only regular files enter a manifest, and a
directory reached again through a symlink is walked once.

Why: a FIFO named ``x.jpg`` made every loader block forever in ``open()``, and ``ln -s . class/loop``
made ``os.walk(followlinks=True)`` list the class's images once per level until the path grew too
long (41 copies). The walk keeps the order ``os.walk`` gave (a folder's files sorted, then its
sub-folders sorted, depth first), so the manifests of ordinary folders, and their digests, are
unchanged.

Policy: a symlink to a file is followed (it is a regular file to whoever opens it); a symlink to a
directory is followed at most once per real directory within one class folder: into a folder not
walked yet, never back into one already walked (an ancestor, itself, or a sibling reached twice),
and never into another class's or split's folder of the same dataset (its images would be rows
of two classes, or val images in train); a link out of the dataset is followed.
Everything left out is counted by reason in ``Skipped``, which the extraction logs.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .manifest import stored_path

# reasons, as they read in the log
FIFO = "FIFOs (named pipes)"
SOCKET = "sockets"
DEVICE = "device files"
BROKEN_LINK = "broken symlinks"
UNREADABLE = "entries that cannot be stat'ed"
LOOP = "directory symlinks to folders already walked"
ELSEWHERE = "directory symlinks to another class's or split's folder"
STORE = "Zarr stores (a store written into the dataset is not a class)"


@dataclass
class Skipped:
    """What a walk left out: counts by reason, and the first few paths of each (for the log)."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, path: str) -> None:
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 3:
            shown.append(path)

    def update(self, other: Skipped) -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            shown = self.examples.setdefault(reason, [])
            shown.extend(other.examples.get(reason, [])[: 3 - len(shown)])

    def lines(self) -> list[str]:
        """One log line per reason, e.g. ``skipped 1 FIFOs (named pipes): cls/x.jpg``."""
        return [
            f"skipped {n} {reason}: {', '.join(stored_path(p) for p in self.examples.get(reason, []))}" + (" …" if n > 3 else "")
            for reason, n in sorted(self.counts.items())
        ]


def walk_images(class_dir: Path, relative_to: Path, is_image, skipped: Skipped) -> list[str]:
    """The images under ``class_dir`` as '/'-separated paths relative to ``relative_to`` (the dataset
    root), in ``os.walk`` order; hidden entries and files ``is_image`` rejects are left out silently,
    entries that are not regular files or directories and repeated directories are counted in ``skipped``.

    Walked with a stack, not recursion: a folder 1,200 levels deep ended the run with RecursionError."""
    out: list[str] = []
    visited = _ancestors(class_dir)  # a link back up (to the class folder, the split, the root) is a loop
    dataset, own = os.path.realpath(relative_to), os.path.realpath(class_dir)
    stack: list[tuple[str, str, tuple[int, int] | None, bool]] = [
        (str(class_dir), Path(class_dir).relative_to(relative_to).as_posix(), None, False)
    ]
    while stack:
        folder, rel, key, link = stack.pop()
        if link:  # judged when its turn comes, as os.walk would reach it: after the folders before it
            assert key is not None
            if key in visited:
                skipped.add(LOOP, rel)
                continue
            real = os.path.realpath(folder)
            if _inside(real, dataset) and not _inside(real, own):
                skipped.add(ELSEWHERE, rel)  # another class's or split's images under this class's label
                continue
            visited.add(key)
        stack.extend(reversed(_scan(folder, rel, is_image, skipped, visited, out)))
    return out


def _ancestors(folder: Path) -> set[tuple[int, int]]:
    """(device, inode) of ``folder`` and of every folder above its real path."""
    out: set[tuple[int, int]] = set()
    path = os.path.realpath(folder)
    while True:
        try:
            st = os.stat(path)
            out.add((st.st_dev, st.st_ino))
        except OSError:
            pass
        parent = os.path.dirname(path)
        if parent == path:
            return out
        path = parent


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _scan(
    folder: str, rel: str, is_image, skipped: Skipped, visited: set[tuple[int, int]], out: list[str]
) -> list[tuple[str, str, tuple[int, int] | None, bool]]:
    """One folder: its images appended to ``out``; its sub-folders to walk, in order."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return []  # os.walk skipped unreadable folders too
    subfolders: list[tuple[str, str, tuple[int, int], bool]] = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = f"{rel}/{entry.name}"
        try:
            st = os.stat(entry.path)  # follows symlinks: what open() would meet
        except FileNotFoundError:
            if is_image(entry.name):
                skipped.add(BROKEN_LINK if entry.is_symlink() else UNREADABLE, path)
            continue
        except OSError:  # a symlink loop on a file name (ELOOP), permissions
            if is_image(entry.name):
                skipped.add(UNREADABLE, path)
            continue
        if stat.S_ISDIR(st.st_mode):
            subfolders.append((entry.path, path, (st.st_dev, st.st_ino), entry.is_symlink()))
        elif is_image(entry.name):
            if stat.S_ISREG(st.st_mode):
                out.append(path)
            else:
                skipped.add(_kind(st.st_mode), path)
    # real sub-folders are claimed before any symlink is judged, so a folder is walked under its own
    # name and a link to it (from here or from deeper down) is the one skipped
    real = [key for _, _, key, link in subfolders if not link and key not in visited]
    visited.update(real)
    todo: list[tuple[str, str, tuple[int, int] | None, bool]] = []
    for sub, sub_rel, key, link in subfolders:
        if not link and key not in real:  # a hard-linked or bind-mounted folder met again
            skipped.add(LOOP, sub_rel)
            continue
        todo.append((sub, sub_rel, key, link))
    return todo


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return FIFO
    if stat.S_ISSOCK(mode):
        return SOCKET
    return DEVICE
