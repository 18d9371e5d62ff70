"""Which tar shards a ``wds:`` pattern names, and reading byte ranges of them (local files or fsspec URLs).

A pattern is expanded as WebDataset's own tools expand it: brace ranges ``{000000..000099}`` (the width
of the first bound is kept: zero padding), brace lists ``{a,b}``, nested; then shell globs
(``*``, ``?``, ``[...]``) are matched, sorted by name. The order of the expansion is the order of the
rows: a brace range gives its numbers in order, a glob its matches sorted.

Local paths are plain files; anything with a ``scheme://`` is opened through fsspec (s3://, gs://,
http(s)://, file://, memory://), with credentials from the standard environment, never from the URL.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import BinaryIO

from .errors import UsageError

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(\d+))?$")
_GLOB = re.compile(r"[*?\[]")


def is_url(path: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path) is not None


def expand_braces(pattern: str) -> list[str]:
    """``a-{0..2}.tar`` → ``a-0.tar a-1.tar a-2.tar``; ``{x,y}`` → both; nested braces expand inside out."""
    depth, start = 0, -1
    for i, c in enumerate(pattern):
        if c == "{":
            if depth == 0:
                start = i
            depth += 1
        elif c == "}" and depth:
            depth -= 1
            if depth == 0:
                head, body, tail = pattern[:start], pattern[start + 1 : i], pattern[i + 1 :]
                return [head + middle + rest for middle in _alternatives(body) for rest in expand_braces(tail)]
    if depth:
        raise UsageError(f"shard pattern {pattern!r} has an unclosed brace", "write ranges as {000000..000099} and lists as {a,b}")
    return [pattern]


def _alternatives(body: str) -> list[str]:
    m = _RANGE.match(body)
    if m:
        first, last, step = m.group(1), m.group(2), int(m.group(3) or 1)
        lo, hi = int(first), int(last)
        if step < 1 or abs(hi - lo) // step > 10_000_000:
            raise UsageError(f"brace range {{{body}}} is too large or has a zero step", "e.g. {000000..000099}")
        width = len(first.lstrip("-")) if first.lstrip("-").startswith("0") else 0
        numbers = range(lo, hi + 1, step) if lo <= hi else range(lo, hi - 1, -step)
        return [f"{n:0{width}d}" for n in numbers]
    parts, depth, current = [], 0, ""
    for c in body:  # split on the commas of this level only
        if c == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += (c == "{") - (c == "}")
        current += c
    parts.append(current)
    if len(parts) == 1:
        return ["{" + body + "}"]  # not a brace expression: literal braces, as the shells keep them
    return [alt for part in parts for alt in expand_braces(part)]


def expand_shards(pattern: str, base: Path | None = None) -> list[str]:
    """The shards ``pattern`` names, in row order: local ones as absolute paths (relative to ``base``,
    default the working folder), URLs as given. Every one must exist; none may be named twice."""
    out: list[str] = []
    for name in expand_braces(pattern):
        if is_url(name):
            out += _expand_url(name)
            continue
        path = Path(name).expanduser()
        if not path.is_absolute():
            path = (base or Path.cwd()) / path
        if _GLOB.search(name):
            found = sorted(p for p in glob.glob(str(path)) if os.path.isfile(p))
            if not found:
                raise UsageError(f"shard pattern {name!r} matches no file", "check the folder and the pattern (globs: * ? [..])")
            out += [os.path.abspath(p) for p in found]
        elif path.is_dir():
            raise UsageError(f"shard {str(path)!r} is a folder", f"name the shards in it, e.g. 'wds:{path}/*.tar'")
        elif not path.is_file():
            what = "is not a regular file" if path.exists() else "not found"
            raise UsageError(f"shard {str(path)!r} {what}", "check the brace range and the folder; every shard named must exist")
        else:
            out.append(os.path.abspath(path))
    seen: set[str] = set()
    for s in out:
        if s in seen:
            raise UsageError(f"shard {s!r} is named twice by {pattern!r}", "each shard may appear once (its samples would be rows twice)")
        seen.add(s)
    return out


def _expand_url(url: str) -> list[str]:
    fs, path = _filesystem(url)
    protocol = url.split("://", 1)[0]
    if _GLOB.search(path):
        found = sorted(fs.glob(path))
        if not found:
            raise UsageError(f"shard pattern {url!r} matches nothing", "check the bucket, the prefix and the pattern")
        return [p if is_url(p) else f"{protocol}://{p}" for p in found]
    if not fs.exists(path):
        raise UsageError(f"shard {url!r} not found", "check the URL; credentials and endpoint come from the environment (AWS_*)")
    return [url]


def _filesystem(url: str):
    if "@" in url.split("://", 1)[1].split("/", 1)[0]:
        raise UsageError(
            f"shard URL {url!r} holds credentials", "pass credentials through the environment (e.g. AWS_ACCESS_KEY_ID), never in a URL"
        )
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise UsageError(f"cannot open {url!r}: {e}", "install the fsspec backend for this scheme (s3fs, gcsfs, aiohttp)") from None
    return fs, path


def stamp(shard: str) -> tuple[int, str]:
    """(size, version) of a shard: its mtime in ns locally, the ETag / mtime an object store reports."""
    if not is_url(shard):
        st = os.stat(shard)
        return st.st_size, str(st.st_mtime_ns)
    fs, path = _filesystem(shard)
    info = fs.info(path)
    version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or info.get("created") or ""
    return int(info.get("size") or 0), str(version)


def open_shard(shard: str) -> BinaryIO:
    """The shard opened for reading bytes (seekable)."""
    if not is_url(shard):
        return open(shard, "rb")
    fs, path = _filesystem(shard)
    return fs.open(path, "rb")


def read_range(f: BinaryIO, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)
