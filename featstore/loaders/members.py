"""Reading images that are members of tar shards (WebDataset), for every loader: a row is handed over as
a member reference (``manifest.member_ref``: shard, byte offset, size), read with one positioned read,
and refused for the same reasons as a file (``decode.check_encoded``), plus the reasons a shard gives
before any read (no image component, a truncated one, no label: ``wds_dataset``).

Local shards are read with ``os.pread`` on a descriptor kept open per process: no shared file position,
so DataLoader workers forked from one parent never interfere, and one ``open`` serves a whole shard.
URLs are read through fsspec: a file object per shard and process, whose read-ahead serves a batch's
members (stored one after another) from few requests.

Their checks (``verdicts``) are cached like files', keyed by the reference; a verdict holds while the
shard's stamp (its mtime, or the object store's version) is the one it was made under.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO

from ..image_header import image_size_from_header
from ..manifest import parse_member_ref
from ..shards import is_url, open_shard, read_range, stamp
from .decode import check_encoded
from .verdicts import Verdict, cached_verdicts, verdict_of

_OPEN: OrderedDict[tuple[int, str], _Descriptor] = OrderedDict()  # (pid, shard) → descriptor, most recent last
_OPEN_LOCK = threading.Lock()
_REMOTE: OrderedDict[tuple[int, str], tuple[BinaryIO, threading.Lock]] = OrderedDict()  # (pid, URL) → file, lock
_REMOTE_LOCK = threading.Lock()


def _fresh_locks() -> None:
    # a fork copies a lock another thread may hold at that moment: the child starts with its own
    global _OPEN_LOCK, _REMOTE_LOCK
    _OPEN_LOCK, _REMOTE_LOCK = threading.Lock(), threading.Lock()


os.register_at_fork(after_in_child=_fresh_locks)
_KEEP_OPEN = 16


def read_member(ref: str) -> tuple[bytes | None, str]:
    """The member's bytes, or None and why not (the reason given before any read, or the read's error)."""
    shard, offset, size, problem = parse_member_ref(ref)
    if problem:
        return None, problem
    try:
        data = _read(shard, offset, size)
    except OSError as e:
        return None, f"{type(e).__name__}: {e.strerror or e}"
    if len(data) != size:
        return None, f"truncated: the shard ends {size - len(data)} bytes into the member"
    if not data:
        return None, "empty member (0 bytes)"
    return data, ""


def read_member_checked(ref: str) -> tuple[bytes | None, str, tuple[int, int] | None]:
    """``decode.read_checked`` for a member: its bytes (None when refused), why refused, the declared size."""
    data, problem = read_member(ref)
    if data is None:
        return None, problem, None
    problem, hw = check_encoded(data)
    return (None, problem, None) if problem else (data, "", hw)


def read_member_verified(ref: str, verdict: Verdict | None) -> tuple[bytes | None, str]:
    """``verdicts.read_verified`` for a member: a refused member is not read, an accepted one is not checked again."""
    if verdict is None:
        data, problem, _ = read_member_checked(ref)
        return data, problem
    if verdict.problem:
        return None, verdict.problem
    return read_member(ref)


def member_size(ref: str) -> tuple[int, int] | None:
    """``image_header.image_size_from_header`` for a member (the decode budget's sizes): the bytes are read, the header parsed."""
    import tempfile

    data, _ = read_member(ref)
    if data is None:
        return None
    _, hw = check_encoded(data)
    if hw is not None:
        return hw
    with tempfile.NamedTemporaryFile(suffix=".img") as f:  # other formats: PIL's lazy open reads the header
        f.write(data)
        f.flush()
        return image_size_from_header(f.name)


def check_member_chunk(refs: list[str], cache: Path | None) -> list[tuple[Verdict, bool]]:
    """``verdicts.check_files``' chunk check for members: each verdict, and whether it was made now."""
    cached = cached_verdicts(refs, cache)
    stamps: dict[str, int] = {}
    out = []
    for ref in refs:
        shard = parse_member_ref(ref)[0]
        if shard not in stamps:
            try:
                size, version = stamp(shard)
                stamps[shard] = int.from_bytes(hashlib.sha256(f"{size}:{version}".encode()).digest()[:7], "big")
            except OSError:
                stamps[shard] = -1
        old = cached.get(ref)
        if old is not None and stamps[shard] >= 0 and old.mtime_ns == stamps[shard]:
            out.append((old, False))
            continue
        out.append((member_verdict(ref, stamps[shard]), True))
    return out


def member_verdict(ref: str, shard_stamp: int) -> Verdict:
    _, _, size, _ = parse_member_ref(ref)
    data, problem, hw = read_member_checked(ref)
    if data is None:
        # a reason known before reading (size -1) is not cached as a read: it comes with the manifest anyway
        return Verdict(problem, "", 0, 0, -1, size if shard_stamp >= 0 and size >= 0 else -1, shard_stamp)
    return verdict_of(data, hw, len(data) if shard_stamp >= 0 else -1, shard_stamp)


def _read(shard: str, offset: int, size: int) -> bytes:
    if is_url(shard):
        f, lock = _remote(shard)
        with lock:  # one file object per shard and process: its position and read-ahead cache are not thread-safe
            return read_range(f, offset, size)
    held = _hold(shard)
    try:
        return os.pread(held.fd, size, offset)
    finally:
        _let_go(held)


def _remote(shard: str) -> tuple[BinaryIO, threading.Lock]:
    """The shard's fsspec file, opened once per process (an open costs a HEAD request; its read-ahead
    then serves the following members of a batch, which lie one after another, from one GET)."""
    key = (os.getpid(), shard)
    with _REMOTE_LOCK:
        found = _REMOTE.get(key)
        if found is None:
            found = _REMOTE[key] = (open_shard(shard), threading.Lock())
            while len(_REMOTE) > _KEEP_OPEN:
                _REMOTE.popitem(last=False)  # closed when collected (a thread may still be reading it)
        else:
            _REMOTE.move_to_end(key)
        return found


class _Descriptor:
    """An open shard, counted while threads read it: evicted from the cache, it is closed only when the last
    reader is done (closing it under a reader could hand its number to another file, read in its place)."""

    def __init__(self, fd: int):
        self.fd, self.readers, self.evicted = fd, 0, False


def _hold(shard: str) -> _Descriptor:
    key = (os.getpid(), shard)  # a forked DataLoader worker opens its own
    with _OPEN_LOCK:
        held = _OPEN.get(key)
        if held is None:
            held = _OPEN[key] = _Descriptor(os.open(shard, os.O_RDONLY))
            while len(_OPEN) > _KEEP_OPEN:
                (pid, _), old = _OPEN.popitem(last=False)
                old.evicted = True
                if old.readers == 0 and pid == os.getpid():  # a parent's descriptor is the parent's to close
                    os.close(old.fd)
        else:
            _OPEN.move_to_end(key)
        held.readers += 1
        return held


def _let_go(held: _Descriptor) -> None:
    with _OPEN_LOCK:
        held.readers -= 1
        if held.evicted and held.readers == 0:
            os.close(held.fd)
