"""One writer per store on object storage: a lease object, ``_progress/lock.json``.

Object storage has no ``flock``. Where the server has conditional writes (S3 since 2024, and moto),
the lease is taken by a create-only PUT (``If-None-Match: *``): of two writers starting together
exactly one succeeds. The holder renews it every third of its term with ``If-Match`` on the ETag it
last wrote, so a renewal never overwrites a lease someone else took, and a lease whose holder died
expires after its term (``FEATSTORE_LEASE_SECONDS``, default 120). A holder of this host whose pid
is gone is stale at once (a killed run resumes without waiting). Taking over an expired or stale
lease is again conditional (``If-Match`` on the ETag read), so two takers cannot both win.

A server without conditional writes (found by a probe: a second create-only PUT of one probe
object succeeds) gets a plain lease: check, write, wait, read back. It keeps a second writer out
unless two start within the same second; the docs say so (docs/scale.md).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import FeatstoreError
from .locations import PROGRESS, is_url
from .lock import StoreLock, pid_alive
from .remote import Remote

LEASE = f"{PROGRESS}/lock.json"


def lease_seconds() -> float:
    return float(os.environ.get("FEATSTORE_LEASE_SECONDS", "120"))


def is_live(holder: dict[str, Any], now: float) -> bool:
    """A lease's holder still counts: its term has not run out and it is not a dead pid of this host."""
    if holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid", -1))):
        return False
    return float(holder.get("expires", 0)) > now


class Lease:
    """The writer's lease on the store at ``remote`` (a context manager, like :class:`~.lock.StoreLock`)."""

    def __init__(self, remote: Remote, warn: Callable[[str], None] = lambda s: None, job: str = ""):
        self.remote = remote
        self.warn = warn
        self.job = job
        self.term = lease_seconds()
        self.held = False
        self.lost = False  # a renewal found another writer's lease: this one must stop writing
        self._token = uuid.uuid4().hex
        self._etag: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def path(self) -> str:
        return f"{self.remote.url}/{LEASE}"

    def holder(self) -> dict[str, Any] | None:
        holder = self.remote.read_json(LEASE)
        return holder if isinstance(holder, dict) else None

    def _me(self) -> bytes:
        now = time.time()
        me = {"pid": os.getpid(), "host": socket.gethostname(), "job": self.job, "since": now, "expires": now + self.term}
        return json.dumps(dict(me, token=self._token)).encode()

    # ------------------------------------------------------------ acquire / renew / release

    def acquire(self) -> Lease:
        if self.held:
            return self
        s3 = _s3(self.remote)
        if s3 is not None and _conditional(self.remote):
            self._acquire_conditional()
        else:
            self._acquire_plain()
        self.held = True
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew_loop, name="featstore-lease", daemon=True)
        self._renewer.start()
        atexit.register(self.release)  # an error on the way out still frees the lease for others
        return self

    def _acquire_conditional(self) -> None:
        if self.remote.create(LEASE, self._me()):
            self._etag = _etag(self.remote)
            return
        holder, etag = self.holder(), _etag(self.remote)
        if holder is not None and is_live(holder, time.time()):
            self._refuse(holder)
        if holder is not None:
            self.warn(f"taking over the lease of pid {holder.get('pid')} on {holder.get('host')} (no longer running or expired)")
        if etag is None or not _put_if_match(self.remote, self._me(), etag):
            self._refuse(self.holder())  # another writer took it between our read and our write
        self._etag = _etag(self.remote)

    def _acquire_plain(self) -> None:
        holder = self.holder()
        if holder is not None and is_live(holder, time.time()):
            self._refuse(holder)
        self.remote.put(LEASE, self._me())
        time.sleep(1.0)  # a writer that read the old lease when we did has written by now: who is last wins
        if (self.holder() or {}).get("token") != self._token:
            self._refuse(self.holder())

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.term / 3):
            try:
                self.renew()
            except Exception as e:  # reported by release(): the writer goes on (a lost lease stops its finalize)
                self.warn(f"cannot renew the lease {self.path}: {e}")

    def renew(self) -> None:
        if _s3(self.remote) is not None and self._etag is not None:
            if not _put_if_match(self.remote, self._me(), self._etag):
                self.lost = True
                self._stop.set()
                return
            self._etag = _etag(self.remote)
        elif (self.holder() or {}).get("token") == self._token:
            self.remote.put(LEASE, self._me())
        else:
            self.lost = True
            self._stop.set()

    def check(self) -> None:
        """Raise when another writer took the lease over (ours expired unrenewed): stop writing."""
        if self.lost or (self.held and (self.holder() or {}).get("token") != self._token):
            self.lost = True
            raise FeatstoreError(
                f"lost the lease {self.path} to another writer (ours expired unrenewed)",
                "rerun the same command when that writer is done; it resumes from the finished units",
            )

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        atexit.unregister(self.release)
        self.held = False
        if self.lost:
            return
        try:
            if (self.holder() or {}).get("token") == self._token:  # never another writer's
                self.remote.fs.rm_file(self.remote.key(LEASE))
                self.remote.fs.invalidate_cache(self.remote.key(PROGRESS))
        except (OSError, FeatstoreError):
            pass  # a finalized store has no _progress left, or the network is gone: the lease expires

    def _refuse(self, holder: dict[str, Any] | None) -> None:
        holder = holder or {}
        left = float(holder.get("expires", 0)) - time.time()
        raise FeatstoreError(
            f"store is being written by pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
            + (f" (its lease runs {left:.0f} s more)" if left > 0 else ""),
            f"wait for it to finish; a writer that died frees it when its lease expires (or delete {self.path})",
        ) from None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def store_lock(location: str | os.PathLike[str], warn: Callable[[str], None] = lambda s: None, job: str = "") -> StoreLock | Lease:
    """The writer's lock of a store: a ``flock`` for a local folder, a lease at a URL."""
    if is_url(location):
        return Lease(Remote.of(os.fspath(location)), warn, job)
    return StoreLock(Path(location) / PROGRESS / "lock.json", warn, job)


# ---------------------------------------------------------------- S3's conditional requests


def _s3(remote: Remote) -> Any:
    """The s3fs filesystem of ``remote``, or None for another backend."""
    return remote.fs if type(remote.fs).__name__ == "S3FileSystem" else None


def _split(remote: Remote) -> tuple[str, str]:
    bucket, _, key = remote.key(LEASE).partition("/")
    return bucket, key


def _etag(remote: Remote) -> str | None:
    bucket, key = _split(remote)
    try:
        return str(remote.fs.call_s3("head_object", Bucket=bucket, Key=key)["ETag"])
    except FileNotFoundError:
        return None


def _put_if_match(remote: Remote, data: bytes, etag: str) -> bool:
    """PUT the lease only while it is still the object with ``etag``; False when it is not."""
    bucket, key = _split(remote)
    try:
        remote.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=etag)
    except (OSError, FileNotFoundError) as e:
        if _precondition_failed(e):
            return False
        raise
    return True


def _precondition_failed(e: BaseException) -> bool:
    cause = e.__cause__ or e.__context__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause is not None else None
    return code in ("PreconditionFailed", "NoSuchKey", "ConditionalRequestConflict") or isinstance(e, FileNotFoundError)


_PROBED: dict[str, bool] = {}


def _conditional(remote: Remote) -> bool:
    """Whether the server honours ``If-None-Match: *`` (probed once per bucket and endpoint)."""
    bucket = remote.root.split("/", 1)[0]
    key = f"{os.environ.get('AWS_ENDPOINT_URL', '')}/{bucket}"
    if key not in _PROBED:
        probe = f"{PROGRESS}/.conditional-{uuid.uuid4().hex}"
        try:
            first = remote.create(probe, b"1")
            second = remote.create(probe, b"2")
            _PROBED[key] = first and not second
        finally:
            with contextlib.suppress(OSError):
                remote.fs.rm_file(remote.key(probe))
    return _PROBED[key]
