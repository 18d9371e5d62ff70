"""Images modified after their store was created: found by modification time, said in one warning.

The cache key digests the images' names and labels, not their bytes (reading every byte of ImageNet
to answer "up to date" would cost a pass of the loader), so an image rewritten under its own name
meets the store computed from its old bytes. What a rewrite does change is the file's modification
time: a file modified after the store was created may hold other pixels than its features came from.
That is said, never acted on: a copy that did not keep modification times (``cp`` without ``-p``)
looks the same from here, and only the user knows which it was (``--overwrite`` extracts again).
A file put in place with an older modification time (``mv`` over it, ``cp -p``, ``rsync -a``) is not
seen; the change time would see it, but also every ``chmod -R`` of a dataset (a warning on every
image, forever, or a re-extraction), so it is not used.

Torch-free: the up-to-date memo (``request.py``) asks :func:`any_file_modified_after` before
importing anything heavy.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from .timestamps import stamp_seconds

if TYPE_CHECKING:
    from .manifest import Manifest

EXAMPLES = 3  # paths named in the warning


def created_ns(created: object) -> int | None:
    """The first nanosecond after the store's creation second (``created`` is kept to the second:
    a file written in that second, before the store, is not called modified after it); None when
    the store records no creation time this can read."""
    seconds = stamp_seconds(created)
    return None if seconds is None else (seconds + 1) * 1_000_000_000


def image_files(manifest: Manifest) -> list[str]:
    """What holds the manifest's images: every image file, or a shard dataset's shard files (a
    shard at a URL has no modification time here, so is never called modified)."""
    if manifest.shards is not None:
        return list(manifest.shards.shards)
    return [p for split in manifest.splits for p in manifest.absolute_paths(split)]


def image_folders(manifest: Manifest) -> list[str]:
    """The folders the images are in, for the memo's quick scan; none for shards (their files are
    stamped one by one: a rewritten shard has a new size or mtime)."""
    if manifest.shards is not None:
        return []
    # the few folders of the relative paths, joined to the root once each: not an absolute path per image
    # (the up-to-date answer builds those already, for the modified-images check)
    folders = {posixpath.dirname(p) for split in manifest.splits.values() for p in split.paths}
    return sorted(os.path.join(manifest.root, f) if f else str(manifest.root) for f in folders)


def modified_after(paths: Iterable[str], since_ns: int) -> list[str]:
    """The paths whose files were modified at or after ``since_ns`` (files that cannot be stat'ed
    are left to the loaders, which call them invalid)."""
    changed = []
    for path in paths:
        try:
            if os.stat(path).st_mtime_ns >= since_ns:
                changed.append(path)
        except OSError:
            pass
    return changed


def any_file_modified_after(folders: Sequence[str], since_ns: int) -> bool:
    """Whether any file directly in ``folders`` was modified at or after ``since_ns`` (a cheap
    over-approximation of :func:`modified_after` on a dataset's images: any file counts)."""
    for folder in folders:
        try:
            with os.scandir(folder) as entries:
                for e in entries:
                    try:
                        if e.is_file() and e.stat().st_mtime_ns >= since_ns:
                            return True
                    except OSError:
                        pass
        except OSError:
            pass
    return False


def warning(
    changed: Sequence[str], images: int, created: str, root: str | os.PathLike[str], noun: str = "images", resuming: bool = False
) -> str:
    """The one line that says so, naming the first few files (relative to the dataset root);
    ``noun``: what the files are ("shards" for a shard dataset); ``resuming``: of a store not yet
    complete, whose finished units alone were computed from the files."""
    base = os.fspath(root)

    def short(path: str) -> str:
        rel = os.path.relpath(path, base) if base else path
        return path if rel.startswith("..") else rel

    named = ", ".join(short(p) for p in changed[:EXAMPLES]) + (", …" if len(changed) > EXAMPLES else "")
    where, whose = (" in its finished units", "Their rows keep the features") if resuming else ("", "Its features are those")
    return (
        f"warning: {len(changed):,} of {images:,} {noun}{where} were modified after this store was created ({created}): "
        f"{named}. {whose} of the images as they were then; --overwrite extracts them again "
        "(if the files were only copied without their modification times, nothing changed)"
    )


def modified_images(
    manifest: Manifest, created: object, log: Callable[[str], None], finished: dict[str, list[tuple[int, int]]] | None = None
) -> list[str]:
    """The manifest's images modified after a store created at ``created``; logs the warning when
    there are any. ``finished``: a store being resumed, the row spans (start, stop) per split of its
    finished units, whose images alone are looked at (a shard dataset's shards are looked at whole)."""
    since = created_ns(created)
    if since is None:
        return []
    if finished is None or manifest.shards is not None:
        files = image_files(manifest)
    else:
        files = []
        for split, spans in finished.items():
            paths = manifest.absolute_paths(split)
            files += [p for start, stop in spans for p in paths[start:stop]]
    changed = modified_after(files, since)
    if changed:
        noun = "shards" if manifest.shards is not None else "images"
        log(warning(changed, len(files), str(created), manifest.root, noun, resuming=finished is not None))
    return changed
