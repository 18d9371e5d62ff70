"""One writer per store: a lock file naming the holder's pid and host; stale locks are taken over.

Who holds the lock is decided by the kernel, not by reading the file: the holder keeps an exclusive
``flock`` on ``lock.json`` for as long as it writes, and the kernel drops it the moment that process
dies (kill -9 included). Taking over a stale lock is therefore one atomic step: whoever gets the
flock is the only process that may read the old holder, judge it and write itself in; every other
start fails the flock and is refused, however many start together (reading the file, judging the
holder dead and deleting it, as before, let two resumes both "take over" the same stale lock).
The JSON inside stays for humans and for ``featstore ls``/``rm``: it names the writer. A holder
that the flock cannot see (a pid of this host still running, or another host, whose locks a network
file system may not share) is still refused from what the file says.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import FeatstoreError


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def is_stale(holder: dict[str, Any]) -> bool:
    """Whether a lock's holder is gone: a pid of this host no longer running (another host's cannot be checked)."""
    return holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid", -1)))


class StoreLock:
    def __init__(self, path: Path, warn: Callable[[str], None] = lambda s: None, job: str = ""):
        self.path = Path(path)
        self.warn = warn
        self.job = job  # a torchrun job id: recorded so a second job is told whose lock it met
        self.held = False
        self._fd: int | None = None

    def holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else None
        except (OSError, ValueError):
            return None

    def acquire(self) -> StoreLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._refuse(self.holder())
            # the holder before us may have deleted the file between our open and our flock: then we
            # hold a lock on a file nobody else can see, and must start again on the new one
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            try:
                self._take(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd, self.held = fd, True
            return self
        raise FeatstoreError(f"cannot take the lock {self.path}", "delete it if no extraction is running")

    def _take(self, fd: int) -> None:
        """Holding the flock: judge what the file says about an earlier holder, then write ourselves in."""
        with os.fdopen(os.dup(fd), "r+") as f:
            text = f.read()
            try:
                holder = json.loads(text) if text.strip() else None
            except ValueError:
                holder = None  # garbage: its writer died mid-write (it held the flock while writing)
            if isinstance(holder, dict) and holder.get("pid") is not None:
                if not is_stale(holder):
                    # alive without the flock: a writer of an older featstore, or of another host
                    self._refuse(holder)
                self.warn(f"taking over a stale lock of pid {holder.get('pid')} (no longer running) on {holder.get('host')}")
            me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "job": self.job}
            f.seek(0)
            f.truncate()
            json.dump(me, f)
            f.flush()

    def _refuse(self, holder: dict[str, Any] | None) -> None:
        holder = holder or {}
        raise FeatstoreError(
            f"store is being written by pid {holder.get('pid', '?')} on host {holder.get('host', '?')}",
            f"wait for it to finish; if that process is gone, delete {self.path}",
        ) from None

    def check(self) -> None:
        """Nothing to check: the kernel keeps the flock for as long as this process lives (a lease can lapse)."""

    def confirm(self) -> None:
        """Nothing to confirm before a write, for the same reason (:meth:`~.lease.Lease.confirm`)."""

    def release(self) -> None:
        if self.held and self._fd is not None:
            # delete while still holding the flock, so no one takes a lock on the file we are removing
            # without noticing (the inode check in acquire)
            holder = self.holder()
            if holder and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            os.close(self._fd)
        self._fd, self.held = None, False

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
