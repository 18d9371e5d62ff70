"""A real S3 API for tests: moto's server on 127.0.0.1 (started in this process, on threads), with
the standard AWS environment pointing at it, so subprocesses (CLI runs, torchrun ranks) reach it
exactly as they would reach S3."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def moto_s3(bucket: str = "feats") -> Iterator[str]:
    """Start the server, export AWS_* for it, make ``bucket``; yield ``s3://bucket``; restore everything."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "featstore-test-key",
        "AWS_SECRET_ACCESS_KEY": "featstore-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _reset(env["AWS_ENDPOINT_URL"])  # moto keeps its buckets in this process's memory, across servers
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir(bucket)
        yield f"s3://{bucket}"
    finally:
        _reset(env["AWS_ENDPOINT_URL"])  # the next server (another module's) starts empty too
        server.stop()
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()


def objects(url: str) -> list[str]:
    """Every object below ``url`` (relative names), listed afresh."""
    from featstore.store.remote import Remote

    return Remote.of(url).names("")


def _reset(endpoint: str) -> None:
    """Empty moto's in-process backends (every bucket of every server this process started)."""
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=30).close()
