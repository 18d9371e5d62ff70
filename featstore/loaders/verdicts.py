"""The file checks, once per file: run on a pool before extraction, cached, read by the loaders.

Every loader refuses the same files for the same reasons (``decode.read_encoded``: unreadable,
empty, broken container, decompression bomb), and DALI also refuses JPEG/PNG headers its parser
cannot read (``dali.py``). Those checks used to run on the thread that feeds the decoder, file by
file, every run. Here they run once per file when an extraction plans its rows (or resumes with
more), on a thread pool (a process pool for large sets: the container check holds the GIL), and
their verdicts are kept in ``$FEATSTORE_HOME/checks/<dataset>-<digest of its root>.sqlite``, keyed
by absolute path, size and mtime, so a rerun on an unchanged dataset checks nothing again (it only
``stat``\\ s each file). A changed file (new size or mtime) is checked again.

A :class:`Verdict` also keeps the image size the header declares, so a loader can bound what
decoding a file would allocate before it decodes.

The verdict's reason is exactly ``read_encoded``'s (the check calls it). A file that changes between
its check and its read keeps its old verdict for that run; the loaders that read bytes themselves
compare the size read with the verdict's and check again when it differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..orientation import exif_orientation
from .containers import image_format, jpeg_components
from .decode import pil_quietly, read_checked, read_encoded

# bump when the checks or the fields change: older cached verdicts are then dropped
CHECKS_VERSION = 3
CHUNK = 512  # files per pool task
PROCESS_POOL_FROM = 20_000  # files to check before a process pool pays for its start (~1 s)


class Verdict(NamedTuple):
    problem: str  # read_encoded's reason to refuse the file ("" when its bytes are fine)
    kind: str  # "jpeg", "png" or "other" ("" when refused)
    width: int  # declared by the header; 0 when unknown (other formats, refused files)
    height: int
    dali_parses: int  # JPEG/PNG: 1 when nvImageCodec's parser (DALI's) reads the header, 0 when not; -1 not asked
    size: int  # bytes; -1 when the file could not be read (such verdicts are not cached)
    mtime_ns: int

    @property
    def ok(self) -> bool:
        return not self.problem

    def dali_problem(self) -> str:
        """Why DALI must not see the file ("" when it may): the common refusal or its parser's."""
        if self.problem:
            return self.problem
        if self.dali_parses == 0:
            return f"{self.kind.upper()} header that DALI's decoder cannot parse"
        return ""


def check_file(path: str) -> Verdict:
    """The verdict on one file, from its bytes (what ``read_encoded`` says, plus DALI's parser)."""
    try:
        st = os.stat(path)
        size, mtime = st.st_size, st.st_mtime_ns
    except OSError:
        size, mtime = -1, 0
    data, problem, hw = read_checked(path)
    if data is None:
        return Verdict(problem, "", 0, 0, -1, size if size >= 0 else -1, mtime)
    return verdict_of(data, hw, len(data) if size >= 0 else -1, mtime)


def verdict_of(data: bytes, hw: tuple[int, int] | None, size: int, mtime: int) -> Verdict:
    """The verdict on bytes ``read_checked`` (or ``check_encoded``) accepted, declaring the size ``hw``."""
    kind = image_format(data)
    if kind in ("jpeg", "png") and decodes_otherwise_in_dali(data, kind):
        kind = "other"  # DALI is given PIL's pixels (as a PNG), as for BMP or WebP
    parses = nvimgcodec_parses(data) if kind in ("jpeg", "png") else -1
    width, height = hw or (0, 0)
    return Verdict("", kind, width, height, parses, size, mtime)


def decodes_otherwise_in_dali(data: bytes, kind: str) -> bool:
    """A JPEG/PNG that DALI's decoder would turn out other than PIL (the reference every loader
    follows): a 4-component (CMYK/YCCK) JPEG, whose inversion PIL assumes and nvImageCodec does not
    without Adobe's marker (colours inverted: all black); and an EXIF orientation DALI reads
    otherwise or not at all (a PNG's eXIf chunk, a LONG-typed tag, a second EXIF segment), where the
    turn and the augmented views' windows would differ."""
    if kind == "jpeg" and jpeg_components(data) == 4:
        return True
    if b"Exif\x00\x00" not in data and b"eXIf" not in data:  # no EXIF: nothing to turn (a fast scan, at C speed)
        return False
    from PIL import Image

    try:
        with pil_quietly(), Image.open(io.BytesIO(data)) as im:
            turn = im.getexif().get(0x0112, 1)
    except Exception:
        return False  # the decoders decide
    if turn not in range(2, 9):
        return False
    return kind == "png" or exif_orientation(data) != turn or data.count(b"Exif\x00\x00") > 1


def nvimgcodec_parses(data: bytes) -> int:
    """1 when nvImageCodec's parser (the one DALI's decoder uses) reads the header, 0 when not, -1 when it is not importable."""
    codec = _nvimgcodec()
    if codec is None:
        return -1
    try:
        return int(codec.CodeStream(data).width > 0)
    except Exception:
        return 0


@lru_cache(maxsize=1)
def _nvimgcodec():
    # its Python binding logs refusals in colour on stderr unless told not to (read at import)
    os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")
    try:
        import nvidia.nvimgcodec as nvimgcodec
    except Exception:  # DALI without the binding: the container checks still apply
        return None
    return nvimgcodec


def read_verified(path: str, verdict: Verdict | None) -> tuple[bytes | None, str]:
    """``read_encoded(path)``, without checking again what ``verdict`` already says about the file.

    A refused file is not read; an accepted one is read and, when its size is still the checked
    one, not checked again (a file that changed since is checked as it is now)."""
    if verdict is None:
        return read_encoded(path)
    if verdict.problem:
        return None, verdict.problem
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return read_encoded(path)  # the same reason as any loader would give
    if len(data) != verdict.size:
        return read_encoded(path)
    return data, ""


# ------------------------------------------------------------------------------ the cache

_COLUMNS = "problem, kind, width, height, dali_parses, size, mtime_ns"


def cache_path(name: str, root: Path) -> Path:
    """Where the verdicts on the files of a dataset rooted at ``root`` are kept."""
    from ..home import home

    digest = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:60] or "dataset"
    return home() / "checks" / f"{safe}-{digest}.sqlite"


def _connect(path: Path) -> sqlite3.Connection:
    """The cache's database, made (or made again: damaged, or of another version of the checks) where needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _open(path)
    except sqlite3.DatabaseError:  # not a database (a damaged file): start it again
        path.unlink(missing_ok=True)
        return _open(path)


def _open(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=120, isolation_level=None)  # ranks of one job may write at once: SQLite locks
    db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
    version = db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
    if version is None or version[0] != _version_tag():
        db.execute("BEGIN IMMEDIATE")
        db.execute("DROP TABLE IF EXISTS verdicts")
        db.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)", (_version_tag(),))
        db.execute("COMMIT")
    db.execute(
        "CREATE TABLE IF NOT EXISTS verdicts (path TEXT PRIMARY KEY, problem TEXT, kind TEXT, width INTEGER, height INTEGER,"
        " dali_parses INTEGER, size INTEGER, mtime_ns INTEGER)"
    )
    return db


def _version_tag() -> str:
    # the bomb limit decides verdicts too; so does whether DALI's parser could be asked
    from PIL import Image

    return f"{CHECKS_VERSION} pixels<={Image.MAX_IMAGE_PIXELS} nvimgcodec={_nvimgcodec() is not None}"


def _key(path: str) -> str:
    """The cache's key for ``path``: itself, or for a name that is not UTF-8 (sqlite takes only UTF-8
    text) its raw bytes in hex after a NUL, which no path contains."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "\0raw:" + os.fsencode(path).hex()
    return path


def cached_verdicts(paths: list[str], cache: Path | None) -> dict[str, Verdict]:
    """The cached verdicts on ``paths``, by ``_key`` (whether each still holds is the caller's to judge)."""
    cached: dict[str, Verdict] = {}
    if cache is not None:
        with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(cache, timeout=120)) as db:
            marks = ",".join("?" * len(paths))
            keys = [_key(p) for p in paths]
            cached = {
                row[0]: Verdict(*row[1:]) for row in db.execute(f"SELECT path, {_COLUMNS} FROM verdicts WHERE path IN ({marks})", keys)
            }
    return cached


def _check_chunk(paths: list[str], cache: Path | None) -> list[tuple[Verdict, bool]]:
    """Each file's verdict and whether it was checked now (False: its cached verdict still holds)."""
    cached = cached_verdicts(paths, cache)
    out = []
    for path in paths:
        old = cached.get(_key(path))
        if old is not None:
            try:
                st = os.stat(path)
                if st.st_size == old.size and st.st_mtime_ns == old.mtime_ns:
                    out.append((old, False))
                    continue
            except OSError:
                pass
        out.append((check_file(path), True))
    return out


# ------------------------------------------------------------------------------ checking a set

_KINDS = ("", "jpeg", "png", "other")


class Verdicts:
    """The verdicts on a split's files, by row, in columns (a million rows take ~20 MB); rows not checked are None."""

    def __init__(self, rows: int):
        self.problems: list[str] = [""]  # reason texts, each once
        self._ids: dict[str, int] = {"": 0}
        self.problem = np.zeros(rows, np.int32)
        self.kind = np.full(rows, -1, np.int8)  # index into _KINDS; -1: not checked
        self.width = np.zeros(rows, np.int32)
        self.height = np.zeros(rows, np.int32)
        self.dali_parses = np.full(rows, -1, np.int8)
        self.size = np.full(rows, -1, np.int64)

    def __len__(self) -> int:
        return len(self.kind)

    def set(self, row: int, v: Verdict) -> None:
        self.problem[row] = self._ids.setdefault(v.problem, len(self.problems))
        if self.problem[row] == len(self.problems):
            self.problems.append(v.problem)
        self.kind[row] = _KINDS.index(v.kind)
        self.width[row], self.height[row], self.dali_parses[row], self.size[row] = v.width, v.height, v.dali_parses, v.size

    def __getitem__(self, row: int) -> Verdict | None:
        if self.kind[row] < 0:
            return None
        return Verdict(
            self.problems[self.problem[row]],
            _KINDS[self.kind[row]],
            int(self.width[row]),
            int(self.height[row]),
            int(self.dali_parses[row]),
            int(self.size[row]),
            0,
        )


class CheckReport(NamedTuple):
    files: int
    checked: int  # checked now; the rest had a cached verdict that still holds
    seconds: float
    cached_at: Path | None  # None: not cached (none asked for, or a read-only home)

    @property
    def rate(self) -> float:
        """Files checked per second (the files whose cached verdict held count too when none was checked)."""
        return (self.checked or self.files) / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        where = f"cached in {self.cached_at}" if self.cached_at else "not cached"
        if not self.checked:
            return f"file checks: {self.files:,} files unchanged since their check ({self.seconds:.2f} s; {where})"
        return f"file checks: checked {self.checked:,} of {self.files:,} files in {self.seconds:.2f} s ({self.rate:,.0f} files/s; {where})"


def check_files(
    paths: Sequence[str],
    rows: Sequence[int] | np.ndarray,
    cache: Path | None,
    workers: int,
    log: Callable[[str], None] = lambda s: None,
    chunk: Callable[[list[str], Path | None], list[tuple[Verdict, bool]]] | None = None,
) -> tuple[Verdicts, CheckReport]:
    """The verdicts on ``paths[row]`` for each of ``rows``, from ``cache`` where they still hold, the rest checked on a pool.
    ``chunk``: what checks a list of them (default ``_check_chunk``, files; tar members: ``members.check_member_chunk``)."""
    chunk_check = chunk or _check_chunk
    start = time.perf_counter()
    if cache is not None:
        try:
            _connect(cache).close()
        except (sqlite3.Error, OSError) as e:
            log(f"file checks are not cached ({cache}: {e}); every file is checked")
            cache = None
    rows = [int(r) for r in rows]
    verdicts = Verdicts(len(paths))
    chunks = [rows[i : i + CHUNK] for i in range(0, len(rows), CHUNK)]
    checked, kept = 0, cache is not None
    db = _connect(cache) if cache is not None else None
    try:
        with _pool(workers, len(rows)) as pool:
            futures = [pool.submit(chunk_check, [paths[r] for r in part], cache) for part in chunks]
            for part, future in zip(chunks, futures):
                results = future.result()
                fresh = []
                for r, (v, new) in zip(part, results):
                    verdicts.set(r, v)
                    if new:
                        checked += 1
                        if v.size >= 0:
                            fresh.append((_key(paths[r]), *v))
                if fresh and db is not None and kept:
                    try:
                        db.execute("BEGIN IMMEDIATE")
                        db.executemany(f"INSERT OR REPLACE INTO verdicts (path, {_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", fresh)
                        db.execute("COMMIT")
                    except sqlite3.Error as e:
                        with contextlib.suppress(sqlite3.Error):
                            db.execute("ROLLBACK")
                        log(f"file checks could not be cached ({cache}: {e})")
                        kept = False
    finally:
        if db is not None:
            db.close()
    return verdicts, CheckReport(len(rows), checked, time.perf_counter() - start, cache if kept else None)


def _pool(workers: int, files: int) -> Executor:
    workers = max(1, workers)
    if files >= PROCESS_POOL_FROM and workers > 1:
        # spawn: the parent may hold CUDA, DALI and torch threads, which a fork would copy half-made
        return ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
    return ThreadPoolExecutor(workers, thread_name_prefix="featstore-check")
