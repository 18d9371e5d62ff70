"""A store at an object-storage URL (``s3://``, ``gs://``) written through fsspec: what a local
folder gets from renames, object storage gets from single PUTs.

A PUT of one object is atomic on S3 and GCS: readers see the old object or the whole new one.
So a unit's marker, the lease and the store's ``zarr.json`` (where ``complete`` lives) are each
one object written in one request. A store is created by uploading a plan built in a local temp
folder with ``zarr.json`` last (a prefix without it is not a store, and a creation that died
half-way is recognised by the ``_progress/creating.json`` it uploaded first), and every object of
the creation is written create-only where the server has conditional writes, so a second
creator racing the first fails on its first object and never overwrites one.

Credentials never ride in the URL (:func:`~.locations.refuse_credentials`); the endpoint and
keys come from the standard AWS environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``, ``AWS_PROFILE``) or gcloud's, as the fsspec backend reads them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FeatstoreError, UsageError
from .locations import PROGRESS, fsspec_fs, is_url, refuse_credentials

CREATING = f"{PROGRESS}/creating.json"  # uploaded first by a creation; a prefix with it and no zarr.json died half-created
WRITABLE_SCHEMES = ("s3", "gs", "gcs")  # object stores featstore writes (s3 is tested, against moto; gs through gcsfs is not)


def scheme(url: str) -> str:
    return url.split("://", 1)[0].lower()


def refuse_unwritable(url: str) -> None:
    """A URL featstore cannot write (http, ftp, …): one line naming the writable ones."""
    if scheme(url) not in WRITABLE_SCHEMES:
        raise UsageError(
            f"cannot write a store to {url!r}: featstore writes to s3:// and gs:// URLs",
            "write to s3://BUCKET/PREFIX/NAME.zarr (or gs://), or to a local folder",
        )


@dataclass
class Remote:
    """A store's prefix at a URL: its fsspec filesystem and the path of the prefix in it."""

    url: str
    fs: Any
    root: str

    @classmethod
    def of(cls, url: str) -> Remote:
        refuse_credentials(url)
        fs, inner = fsspec_fs(url)
        return cls(url.rstrip("/"), fs, inner.rstrip("/"))

    def key(self, name: str = "") -> str:
        return f"{self.root}/{name}" if name else self.root

    # ------------------------------------------------------------ objects

    def read(self, name: str) -> bytes | None:
        """The object ``name`` (relative to the prefix), or None when it does not exist."""
        try:
            return bytes(self._call(lambda: self.fs.cat_file(self.key(name)), "read"))
        except FileNotFoundError:
            return None

    def require_bucket(self) -> None:
        """A missing bucket is one line before any work is done (featstore never creates buckets)."""
        bucket = self.root.split("/", 1)[0]
        if not self._call(lambda: self.fs.exists(bucket), "read"):
            raise FeatstoreError(
                f"cannot write to {self.url}: the bucket {bucket!r} does not exist",
                f"create it first (e.g. `aws s3 mb s3://{bucket}`) or check the URL and AWS_ENDPOINT_URL",
            )

    def read_json(self, name: str) -> Any:
        data = self.read(name)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return None

    def put(self, name: str, data: bytes) -> None:
        """One PUT: readers see the old object or this one, never part of it."""
        self._call(lambda: self.fs.pipe_file(self.key(name), data))

    def create(self, name: str, data: bytes) -> bool:
        """Write ``name`` only if it does not exist (``If-None-Match: *``); False when it does.
        Where the backend has no create-only write, an existing object is checked for first (not
        atomic: :mod:`.lease` says what that costs)."""
        try:
            self._call(lambda: self.fs.pipe_file(self.key(name), data, mode="create"))
            return True
        except FileExistsError:
            return False
        except TypeError:  # a backend without mode=: check, then write
            if self.exists(name):
                return False
            self.put(name, data)
            return True

    def exists(self, name: str) -> bool:
        return bool(self._call(lambda: self.fs.exists(self.key(name)), "read"))

    def names(self, folder: str) -> list[str]:
        """The objects below ``folder`` (relative names), listed afresh (fsspec caches listings,
        and other processes write here)."""
        self.fs.invalidate_cache(self.key(folder))
        prefix = self.key(folder).rstrip("/") + "/"
        try:
            return [str(p)[len(self.root) + 1 :] for p in self._call(lambda: self.fs.find(prefix), "read")]
        except FileNotFoundError:
            return []

    def remove(self, folder: str = "") -> None:
        """Delete every object below ``folder`` (the whole prefix by default)."""
        keys = [self.key(n) for n in self.names(folder)]
        if keys:
            self._call(lambda: self.fs.rm(keys))  # batched: S3's DeleteObjects takes 1000 keys a request
        self.fs.invalidate_cache(self.key(folder))

    def remove_store(self) -> None:
        """Delete the store here, leaving the lease to its holder (the caller). The creation marker
        goes first and ``zarr.json`` next: from then on no reader sees a store, and a removal killed
        half-way leaves what the next run clears as a half-created store."""
        self.put(CREATING, json.dumps({"pid": os.getpid(), "removing": True}).encode())
        if self.exists("zarr.json"):
            self._call(lambda: self.fs.rm_file(self.key("zarr.json")))
        keep = {f"{PROGRESS}/lock.json", CREATING}
        keys = [self.key(n) for n in self.names("") if n not in keep]
        if keys:
            self._call(lambda: self.fs.rm(keys))
        self._call(lambda: self.fs.rm_file(self.key(CREATING)))
        self.fs.invalidate_cache(self.key())

    def size(self) -> int:
        self.fs.invalidate_cache(self.key())
        return int(self.fs.du(self.key())) if self.names("") else 0

    # ------------------------------------------------------------ the store

    def attrs(self) -> dict[str, Any] | None:
        """The featstore attributes of the store here, or None when there is none (no zarr.json)."""
        meta = self.read_json("zarr.json")
        attrs = meta.get("attributes") if isinstance(meta, dict) else None
        return attrs if isinstance(attrs, dict) and "schema_version" in attrs else None

    def half_created(self) -> bool:
        """A creation died here before its zarr.json: the prefix holds a plan nobody can use."""
        return self.attrs() is None and self.exists(CREATING)

    def is_empty(self) -> bool:
        """Nothing here but a lease (a writer about to create the store)."""
        return all(n.startswith(f"{PROGRESS}/") for n in self.names(""))

    def upload_plan(self, build: Path) -> None:
        """Upload the store built in the local folder ``build``: the creation marker first, then
        every object create-only, the root ``zarr.json`` last (until then this is no store)."""
        if not self.create(CREATING, json.dumps({"pid": os.getpid()}).encode()):
            raise self._collision(CREATING)
        files = sorted(p for p in build.rglob("*") if p.is_file())
        root_meta = build / "zarr.json"
        for path in [p for p in files if p != root_meta] + [root_meta]:
            name = path.relative_to(build).as_posix()
            if not self.create(name, path.read_bytes()):
                raise self._collision(name)
        self._call(lambda: self.fs.rm_file(self.key(CREATING)))

    def _collision(self, name: str) -> FeatstoreError:
        return FeatstoreError(
            f"{self.url}/{name} appeared while the store was being created",
            "another extraction writes there; wait for it or choose another --out",
        )

    def _call(self, do: Callable[[], Any], what: str = "write to") -> Any:
        """One request; a refusal of the server (no such bucket, access denied, no connection) is one line.
        FileExistsError (a create-only write that found the object), FileNotFoundError on a read
        (no such object) and TypeError (a backend without create-only writes) go to the caller."""
        try:
            return do()
        except (FileExistsError, TypeError):
            raise
        except FileNotFoundError as e:
            if what == "read":
                raise
            raise FeatstoreError(
                f"cannot write to {self.url}: {e}", "check the bucket exists (featstore never creates one) and the URL"
            ) from e
        except Exception as e:  # botocore's connection and credential errors are not OSErrors
            raise FeatstoreError(
                f"cannot {what} {self.url}: {type(e).__name__}: {e}",
                "check AWS_ENDPOINT_URL, the network and your credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)",
            ) from e


def location(text: str | os.PathLike[str]) -> Path | str:
    """A store location as featstore handles it: a URL stays a str (a Path would fold its ``//``),
    its scheme in lower case (``S3://`` is s3://, as URLs' schemes are case-insensitive; fsspec knows
    only the lower-case names)."""
    if not is_url(text):
        return Path(text)
    url = os.fspath(text)
    return scheme(url) + url[url.index("://") :]
