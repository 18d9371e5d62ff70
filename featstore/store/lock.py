"""One writer per store: a lock file naming the holder's pid and host; stale locks are taken over."""

from __future__ import annotations

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

    def holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else None
        except (OSError, ValueError):
            return None

    def acquire(self) -> StoreLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "job": self.job}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is None:  # being written right now, or garbage: look again
                    time.sleep(0.05)
                    if self.holder() is None:
                        self.path.unlink(missing_ok=True)
                    continue
                if is_stale(holder):
                    self.warn(f"taking over a stale lock of pid {holder.get('pid')} (no longer running) on {holder.get('host')}")
                    self.path.unlink(missing_ok=True)
                    continue
                raise FeatstoreError(
                    f"store is being written by pid {holder.get('pid')} on host {holder.get('host')}",
                    f"wait for it to finish; if that process is gone, delete {self.path}",
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise FeatstoreError(f"cannot take the lock {self.path}", "delete it if no extraction is running")

    def release(self) -> None:
        if self.held:
            holder = self.holder()
            if holder and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
