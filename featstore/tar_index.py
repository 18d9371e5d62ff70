"""What a tar shard holds: its samples, each component's byte range, and each sample's label, listed
once and cached (``$FEATSTORE_HOME/shards/``).

Samples are grouped by DALI's wds2idx rules, which are WebDataset's: regular files only; a member's key
is its name up to the first dot of its last path component, its extension the rest (``a/0001.seg.png``:
key ``a/0001``, extension ``seg.png``); consecutive members with one key are one sample; names whose key
is empty (hidden files such as ``.DS_Store``) are left out. Extensions are compared exactly (case
included), as DALI's reader does with ``case_sensitive_extensions=True``.

The listing of a shard is keyed by its path or URL, size and version (mtime, or the object store's
ETag) and by the label source, so a rewritten shard is listed again. The byte ranges let every loader
read exactly the planned samples, in the planned order, from any point of a shard (a resumed run
reads only what is pending): ``loaders/shard_reader.py`` reads them, DALI gets index files in its
wds2idx format made from them (``loaders/dali_shards.py``).

Damage: a shard that is not a tar is an error; a member cut short by a truncated shard keeps its
sample, whose component is then marked truncated (an invalid row, with the reason); a header garbled
midway ends the listing there, and the shard's ``damage`` says where (logged with the manifest).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_atomic
from .errors import UsageError
from .home import home
from .shards import open_shard, stamp

LISTING_VERSION = 1
LABEL_BYTES = 1 << 20  # a .cls / .json component larger than this is not read as a label
CLS = "cls"


@dataclass(frozen=True)
class Sample:
    key: str
    components: dict[str, tuple[int, int]]  # extension → (data offset, size) in the shard
    label: str | None  # the label as written (cls text, or the json field as text); None: see label_problem
    label_problem: str = ""
    truncated: tuple[str, ...] = ()  # extensions whose data runs past the end of the shard


@dataclass(frozen=True)
class ShardListing:
    shard: str
    size: int
    samples: list[Sample]
    damage: str = ""  # "" or why the listing stops before the end of the archive


def split_name(name: str) -> tuple[str, str]:
    """wds2idx's ``split_name``: (key, extension) at the first dot of the last path component."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def label_source(label: str) -> tuple[str, str]:
    """``--wds-label``: ``cls`` reads the .cls component; ``KEY`` or ``json:KEY`` a field of the .json
    component (``a.b``: field b of field a) → (component, field)."""
    if label == CLS:
        return CLS, ""
    field = label[5:] if label.startswith("json:") else label
    if not field or any(not part for part in field.split(".")):
        raise UsageError(
            f"--wds-label {label!r} names no field", "use cls (the .cls component) or a field of the .json component, e.g. label"
        )
    return "json", field


def list_shard(shard: str, label: str = CLS) -> ShardListing:
    """The shard's listing, from the cache when the shard is unchanged since it was made."""
    cached, size = _cache_entry(shard, label)
    listing = read_cached(shard, label, (cached, size))
    if listing is not None:
        return listing
    listing = scan_shard(shard, size, label)
    with contextlib.suppress(OSError):  # a read-only home: list again next time
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cached, json.dumps(_to_json(listing)), fsync=False)
    return listing


def read_cached(shard: str, label: str = CLS, entry: tuple[Path, int] | None = None) -> ShardListing | None:
    """The cached listing of the shard as it is now, or None (never listed, or changed since)."""
    cached, _ = entry or _cache_entry(shard, label)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return _from_json(json.loads(cached.read_text()))
    return None


def cache_holds(shard: str, label: str = CLS) -> bool:
    """Whether a listing of the shard as it is now is cached (its file exists; ``read_cached`` reads it)."""
    return _cache_entry(shard, label)[0].is_file()


def _cache_entry(shard: str, label: str) -> tuple[Path, int]:
    """Where the listing of the shard as it is now (size, mtime or ETag) is cached, and its size."""
    try:
        size, version = stamp(shard)
    except OSError as e:
        raise UsageError(f"cannot read shard {shard!r}: {e.strerror or e}", "check that it exists and is readable") from None
    digest = hashlib.sha256(json.dumps([LISTING_VERSION, shard, size, version, label]).encode()).hexdigest()[:32]
    return home() / "shards" / f"{digest}.json", size


def scan_shard(shard: str, size: int, label: str = CLS) -> ShardListing:
    """Read the shard's tar headers (seeking over the data) and its label components."""
    component, field = label_source(label)
    samples: list[Sample] = []
    current: dict | None = None
    damage = ""

    def close():
        if current is not None:
            samples.append(_sample(current, component, field))

    try:
        f = open_shard(shard)
    except OSError as e:
        raise UsageError(f"cannot read shard {shard!r}: {e.strerror or e}", "check that it exists and is readable") from None
    with f:
        try:
            tf = tarfile.open(fileobj=f, mode="r:")  # noqa: SIM115 (closed with f)
        except tarfile.TarError as e:
            raise UsageError(f"shard {shard!r} is not a tar archive ({e})", "pass WebDataset shards: uncompressed .tar files") from None
        members = iter(tf)
        while True:
            try:
                member = next(members)
            except StopIteration:
                # tarfile ends quietly at a garbled header: the end of an archive is two zero blocks (or the file's end)
                end = tf.offset
                if end + 512 <= size:
                    f.seek(end)
                    if f.read(512) != b"\0" * 512:
                        damage = f"damaged tar at byte {end} (a garbled header): the samples after it are left out"
                break
            except tarfile.TarError as e:
                if "unexpected end of data" not in str(e):
                    damage = f"damaged tar at byte {tf.offset} ({e}): the samples after it are left out"
                break
            if not member.isreg():
                continue
            key, ext = split_name(member.name)
            if not key or key.endswith("/"):
                continue
            if current is None or current["key"] != key:
                close()
                current = {"key": key, "components": {}, "raw": {}, "truncated": []}
            current["components"][ext] = (member.offset_data, member.size)
            if member.offset_data + member.size > size:
                current["truncated"].append(ext)
            elif ext == component and member.size <= LABEL_BYTES:
                f.seek(member.offset_data)
                current["raw"][ext] = f.read(member.size)
        close()
    if not samples and not damage:
        raise UsageError(f"shard {shard!r} holds no samples", "pass WebDataset shards (tar files of <key>.<ext> members)")
    return ShardListing(shard, size, samples, damage)


def _sample(current: dict, component: str, field: str) -> Sample:
    key, components, truncated = current["key"], current["components"], tuple(current["truncated"])
    raw = current["raw"].get(component)
    if component not in components:
        return Sample(key, components, None, f"no .{component} component (the label)", truncated)
    if component in truncated:
        return Sample(key, components, None, f"its .{component} component is truncated", truncated)
    if raw is None:
        return Sample(key, components, None, f"its .{component} component is over {LABEL_BYTES} bytes", truncated)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return Sample(key, components, None, f"its .{component} component is not UTF-8 text", truncated)
    if component == CLS:
        value = text.strip()
        return Sample(key, components, value or None, "" if value else "an empty .cls component", truncated)
    try:
        value = json.loads(text)
        for part in field.split("."):
            value = value[part]
    except (ValueError, KeyError, TypeError, IndexError):
        return Sample(key, components, None, f"no field {field!r} in its .json component", truncated)
    if isinstance(value, bool) or not isinstance(value, str | int):
        return Sample(key, components, None, f"its .json field {field!r} is {json.dumps(value)[:40]}, not an integer or a name", truncated)
    return Sample(key, components, str(value), "", truncated)


def _to_json(listing: ShardListing) -> dict:
    return {
        "shard": listing.shard,
        "size": listing.size,
        "damage": listing.damage,
        "samples": [
            [s.key, [[e, o, n] for e, (o, n) in s.components.items()], s.label, s.label_problem, list(s.truncated)] for s in listing.samples
        ],
    }


def _from_json(data: dict) -> ShardListing:
    samples = [Sample(k, {e: (o, n) for e, o, n in c}, label, problem, tuple(t)) for k, c, label, problem, t in data["samples"]]
    return ShardListing(data["shard"], int(data["size"]), samples, data["damage"])


def wds2idx_line(components: list[tuple[str, int, int, str]]) -> str:
    """One sample's line of a DALI wds2idx v1.2 index: ``ext offset size name`` per component."""
    return " ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in components)


def wds2idx_text(lines: list[str]) -> str:
    return f"v1.2 {len(lines)}\n" + "".join(line + "\n" for line in lines)
