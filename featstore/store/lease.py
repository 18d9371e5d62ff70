"""One writer per store on object storage: a lease object, ``_progress/lock.json``.

Object storage has no ``flock``. Where the server has conditional writes (S3 since 2024, and moto),
the lease is taken by a create-only PUT (``If-None-Match: *``): of two writers starting together
exactly one succeeds. The holder renews it every third of its term with ``If-Match`` on the ETag it
last wrote, so a renewal never overwrites a lease someone else took, and a lease whose holder died
expires after its term (``FEATSTORE_LEASE_SECONDS``, default 120). A holder of this host whose pid
is gone is stale at once (a killed run resumes without waiting). Taking over an expired or stale
lease is again conditional (``If-Match`` on the ETag read), so two takers cannot both win.

A lease can lapse under a live writer (its process stopped, its network stalled) and be taken over:
such a writer must not write on into the store that replaced its own. So every write of a unit
first calls :meth:`Lease.confirm`: free while the last renewal is under half the term old (the
renewer keeps it so), otherwise a renewal there and then, conditional as always, and an error
when it fails. Ranks > 0 of a torchrun job write under rank 0's lease: :class:`RankLease` reads it
(at most once per sixth of the term) and stops the rank when it is no longer its job's.

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
from .lock import StoreLock, is_stale, pid_alive
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
        self._renewing = threading.Lock()  # the renewer thread and a writer's confirm() renew on one ETag
        self._renewed = 0.0  # time.monotonic() when the last successful renewal (or the acquire) was sent

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
        sent = time.monotonic()  # the term runs from before the lease is written
        s3 = _s3(self.remote)
        if s3 is not None and _conditional(self.remote):
            self._acquire_conditional()
        else:
            self._acquire_plain()
        self.held, self._renewed = True, sent
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
        with self._renewing:
            if self.lost:
                return
            sent = time.monotonic()
            if _s3(self.remote) is not None and self._etag is not None:
                if not _put_if_match(self.remote, self._me(), self._etag):
                    self._lose()
                    return
                self._etag = _etag(self.remote)
            elif (self.holder() or {}).get("token") == self._token:
                self.remote.put(LEASE, self._me())
            else:
                self._lose()
                return
            self._renewed = sent

    def _lose(self) -> None:
        self.lost = True
        self._stop.set()

    def confirm(self) -> None:
        """Before each write of a unit: raise unless the lease is ours with half its term or more to run.
        No request while the renewer keeps it fresh; a stale one (the process was stopped, the network
        stalled) is renewed here, conditionally, so a lease another writer took is never written under."""
        if not self.held:
            raise self._lost_error()
        if not self.lost and time.monotonic() - self._renewed < self.term / 2:
            return
        try:
            self.renew()
        except Exception as e:  # unconfirmed is as good as lost: the term may be running out
            raise FeatstoreError(
                f"cannot renew the lease {self.path} ({type(e).__name__}: {' '.join(str(e).split())[:120]}), so stopped writing",
                "check AWS_ENDPOINT_URL and the network, then rerun the same command; it resumes from the finished units",
            ) from e
        if self.lost:
            raise self._lost_error()

    def check(self) -> None:
        """Raise when another writer took the lease over (ours expired unrenewed): stop writing."""
        if self.lost or (self.held and (self.holder() or {}).get("token") != self._token):
            self.lost = True
            raise self._lost_error()

    def _lost_error(self) -> FeatstoreError:
        return FeatstoreError(
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


class RankLease:
    """Rank 0's lease as a rank > 0 of its torchrun job sees it: read, never written. The rank writes
    a unit only while the lease is its job's with half its term or more to run, as rank 0 does."""

    def __init__(self, remote: Remote, job: str):
        self.remote = remote
        self.job = job
        self._until = 0.0  # time.monotonic() up to which the last read vouches for the lease

    @property
    def path(self) -> str:
        return f"{self.remote.url}/{LEASE}"

    def confirm(self) -> None:
        """Before each write of a unit: raise unless rank 0 of this job still holds the lease. Read
        again only once the last read stops vouching for it (at most a GET per sixth of the term)."""
        if time.monotonic() < self._until:
            return
        read = time.monotonic()
        holder = self.remote.read_json(LEASE)
        holder = holder if isinstance(holder, dict) else {}
        now, expires = time.time(), float(holder.get("expires", 0))
        left, term = expires - now, expires - float(holder.get("since", expires - lease_seconds()))  # rank 0's term
        why = self._refusal(holder, left, term)
        if why is not None:
            raise FeatstoreError(
                f"this job lost the lease {self.path} ({why}), so stopped writing",
                "rerun the same command when the store's writer is done; it resumes from the finished units",
            )
        self._until = read + left - term / 2

    def _refusal(self, holder: dict[str, Any], left: float, term: float) -> str | None:
        """Why the lease as read lets this rank write no more (None: it may write)."""
        if not holder:
            return "it is gone"
        if holder.get("job") != self.job:
            return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} holds it for another job"
        if is_stale(holder):
            return f"rank 0, pid {holder.get('pid')} of this host, is no longer running"
        if left < term / 2:
            return f"rank 0 stopped renewing it ({max(left, 0):.0f} s left)"
        return None


def store_lock(location: str | os.PathLike[str], warn: Callable[[str], None] = lambda s: None, job: str = "") -> StoreLock | Lease:
    """The writer's lock of a store: a ``flock`` for a local folder, a lease at a URL."""
    if is_url(location):
        return Lease(Remote.of(os.fspath(location)), warn, job)
    return StoreLock(Path(location) / PROGRESS / "lock.json", warn, job)


def rank_lease(location: str | os.PathLike[str], job: str) -> RankLease | None:
    """What a rank > 0 confirms before each unit it writes: rank 0's lease at a URL; None for a local
    folder (rank 0's flock lasts as long as rank 0 does)."""
    return RankLease(Remote.of(os.fspath(location)), job) if is_url(location) else None


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
