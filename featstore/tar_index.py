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

LISTING_VERSION = 3  # bump when a listing's fields or rules change: older cached listings are then made again
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
    try:
        return _scan(shard, size, label, _plain_members)
    except _NeedsTarfile:  # a malformed pax record: Python's tarfile reads every variant
        return _scan(shard, size, label, _tarfile_members)


class _NeedsTarfile(Exception):
    """A header the plain reader leaves to ``tarfile`` (pax records it cannot parse)."""


def _scan(shard: str, size: int, label: str, members) -> ShardListing:
    component, field = label_source(label)
    samples: list[Sample] = []
    current: dict | None = None
    damage: list[str] = []  # what ``members`` found wrong, if anything

    def close():
        if current is not None:
            samples.append(_sample(current, component, field))

    try:
        f = open_shard(shard)
    except OSError as e:
        raise UsageError(f"cannot read shard {shard!r}: {e.strerror or e}", "check that it exists and is readable") from None
    with f:
        for name, offset, length in members(f, size, shard, damage):
            key, ext = split_name(name)
            if not key or key.endswith("/"):
                continue
            if current is None or current["key"] != key:
                close()
                current = {"key": key, "components": {}, "raw": {}, "truncated": [], "twice": []}
            if ext in current["components"]:
                current["twice"].append(ext)  # which of the two is the sample's? neither is taken (webdataset refuses it too)
            current["components"][ext] = (offset, length)
            if offset + length > size:
                current["truncated"].append(ext)
            elif ext == component and length <= LABEL_BYTES:
                f.seek(offset)
                current["raw"][ext] = f.read(length)
        close()
    if not samples and not damage:
        raise UsageError(f"shard {shard!r} holds no samples", "pass WebDataset shards (tar files of <key>.<ext> members)")
    return ShardListing(shard, size, samples, damage[0] if damage else "")


_LEFT_OUT = "the samples after it are left out"
_ZERO = bytes(512)


def _plain_members(f, size: int, shard: str, damage: list[str]):
    """(name, data offset, size) of each regular file, from headers parsed here (ustar, GNU long names, pax
    ``path``/``size`` records: what WebDataset's writers make): several times faster than ``tarfile``, which
    builds an object per member. What it does not parse raises ``_NeedsTarfile``."""
    pos = 0
    long_name: bytes | None = None  # from a GNU long-name or a pax header: the next member's name
    long_size: int | None = None
    start, extended_before = 0, False  # where the current member's headers (extended ones first) begin: what damage names
    while pos + 512 <= size:
        if not extended_before:
            start = pos
        f.seek(pos)
        header = f.read(512)
        if len(header) < 512:
            break
        if header == _ZERO:
            return  # the end-of-archive marker
        stored = _octal(header[148:156])
        unsigned = sum(header) - sum(header[148:156]) + 256  # the checksum field counts as eight spaces
        if stored is not None and stored != unsigned:  # some old writers summed signed bytes: as tarfile, accept both
            stored += 256 * sum(1 for i, b in enumerate(header) if b > 127 and not 148 <= i < 156) * (stored < unsigned)
        if stored is None or stored != unsigned:
            if pos == 0:
                raise UsageError(f"shard {shard!r} is not a tar archive (bad checksum)", "pass WebDataset shards: uncompressed .tar files")
            damage.append(f"damaged tar at byte {start} (bad checksum): {_LEFT_OUT}")
            return
        kind = header[156:157]
        length = int.from_bytes(header[125:136], "big") if header[124] & 0x80 else _octal(header[124:136])
        if length is None:
            damage.append(f"damaged tar at byte {start} (a garbled size field): {_LEFT_OUT}")
            return
        data_at, pos = pos + 512, pos + 512 + (length + 511) // 512 * 512
        extended_before = kind in (b"x", b"L", b"g", b"K")
        if kind in (b"x", b"L"):
            if data_at + length > size:
                break  # cut inside the extended header: nothing of the member it describes is there
            f.seek(data_at)
            extended = f.read(length)
            if kind == b"L":
                long_name = extended.split(b"\0", 1)[0]
            else:
                records = _pax_records(extended)
                long_name = records.get(b"path", long_name)
                if b"size" in records:
                    long_size = int(records[b"size"])
            continue
        if kind in (b"g", b"K"):  # global pax records (no path or size of a member), GNU long link names
            continue
        if long_size is not None:
            length, pos = long_size, data_at + (long_size + 511) // 512 * 512
        name = header[:100].split(b"\0", 1)[0]
        if header[257:263] == b"ustar\0":  # POSIX: a prefix holds the leading folders of a long name
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        if long_name is not None:
            name = long_name
        long_name = long_size = None
        if kind in (b"0", b"\0", b"7"):  # regular files (7: contiguous, read as regular)
            yield name.decode("utf-8", "surrogateescape"), data_at, length
    if 0 < size - pos < 512:
        damage.append(f"damaged tar at byte {start} (truncated header): {_LEFT_OUT}")


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """A pax extended header's ``LENGTH key=value\\n`` records."""
    out, i = {}, 0
    try:
        while i < len(data) and data[i] != 0:
            space = data.index(b" ", i)
            n = int(data[i:space])
            key, eq, value = data[space + 1 : i + n - 1].partition(b"=")
            if not eq or n <= 0:
                raise ValueError
            out[key] = value
            i += n
    except ValueError:
        raise _NeedsTarfile from None
    return out


def _octal(field: bytes) -> int | None:
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        return None


def _tarfile_members(f, size: int, shard: str, damage: list[str]):
    """``_plain_members`` by Python's ``tarfile``, for every header variant."""
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
                if f.read(512) != _ZERO:
                    damage.append(f"damaged tar at byte {end} (a garbled header): {_LEFT_OUT}")
            return
        except tarfile.TarError as e:
            if "unexpected end of data" not in str(e):
                damage.append(f"damaged tar at byte {tf.offset} ({e}): {_LEFT_OUT}")
            return
        if member.isreg():
            yield member.name, member.offset_data, member.size


def _sample(current: dict, component: str, field: str) -> Sample:
    key, components, truncated = current["key"], current["components"], tuple(current["truncated"])
    raw = current["raw"].get(component)
    if current.get("twice"):
        ext = current["twice"][0]
        return Sample(key, components, None, f"its .{ext} component appears twice (two members named {key}.{ext})", truncated)
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
