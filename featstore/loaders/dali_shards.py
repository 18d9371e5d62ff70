"""DALI reading tar shards (WebDataset) with ``fn.readers.webdataset``: the DALI loader's pipeline,
checks, bisection and batch contract (``dali.py``), fed from shards instead of files.

DALI's reader takes tar paths and, per path, an index in its wds2idx v1.2 format (``v1.2 N``, then a
line per sample: ``ext offset size name`` per component). The shards' own layout is listed once and
cached (``tar_index``); for each run the loader writes index files that list exactly the planned
samples, in plan order, each with a single component of extension ``img`` (the sample's image,
chosen by exact extension when the shard was listed) named ``<row>.img``. So:

- every DALI batch is one planned batch, as with files: a short batch is padded from a one-sample
  tar of a tiny JPEG in the run's temporary folder, and a resumed run reads only the pending samples;
- consecutive samples of one shard share one (path, index) entry; DALI reads the entries in order
  (``random_shuffle=False``, one shard of the reader), and the same tar may appear in several;
- the row of each sample comes back through ``source_info`` (``<tar>:<offset>:<name>``), checked
  against the plan as the file reader's labels are;
- ``missing_component_behavior="error"``: every indexed sample has its ``img`` component by
  construction (samples without an image are invalid rows before DALI sees them), so a missing one
  would be a bug, never a silently empty image.

Members DALI must not see (refused by the checks, or of formats other than JPEG/PNG, decoded by PIL
into PNGs packed into a temporary tar) are handled as for files.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..manifest import member_ref, parse_member_ref
from ..tar_index import wds2idx_line, wds2idx_text
from .dali import _PAD, DaliLoader, _Feed, _tiny_jpeg
from .members import check_member_chunk, read_member, read_member_checked
from .verdicts import Verdict, Verdicts

EXT = "img"


class DaliShardLoader(DaliLoader):
    name = "dali"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.check_chunk = check_member_chunk

    def _pipeline(self, feed: _Feed, batch_size: int, windows: Callable[[int], np.ndarray] | None = None):
        if windows is not None:  # refused before extraction starts (job.refuse_unaugmentable): shards' views are torch's
            raise UsageError("DALI's shard reader cannot crop augmented views", "use --loader torch with --augment")
        from nvidia.dali import fn, pipeline_def

        @pipeline_def(
            batch_size=batch_size,
            num_threads=self.threads,
            device_id=(self.device.index or 0) if self.on_gpu else None,
            prefetch_queue_depth=self.prefetch,
            exec_dynamic=True,
        )
        def pipe():
            encoded = fn.readers.webdataset(
                paths=feed.files,
                index_paths=feed.index_paths,
                ext=[EXT],
                missing_component_behavior="error",
                case_sensitive_extensions=True,
                random_shuffle=False,
                prefetch_queue_depth=self.prefetch,
                name="files",
            )
            return self._preprocess(encoded, small=False), fn.get_property(encoded, key="source_info")

        p = pipe()
        p.build()
        return p

    def _row_ids(self, labels) -> np.ndarray:
        names = [bytes(np.asarray(labels.at(i))).decode("utf-8").rsplit(":", 1)[-1] for i in range(len(labels))]
        return np.asarray([int(n[: -len(EXT) - 1]) if n[0].isdigit() else _PAD for n in names], dtype=np.int64)

    def _encoded(self, source: str) -> bytes:
        data, _ = read_member(source)
        return data if data is not None else b""

    def _read_encoded(self, source: str) -> tuple[bytes | None, str]:
        data, problem, _ = read_member_checked(source)
        return data, problem

    def _read_verified(self, source: str, verdict: Verdict) -> tuple[bytes | None, str]:
        return self._read_encoded(source)  # a member of a shard: read (and checked) from its tar

    def _feed(self, paths: list[str], plan: list[np.ndarray], verdicts: Verdicts | None, tmp: Path) -> _Feed:
        rows = [r for p in plan for r in p.tolist()]
        problems, pngs = self._problems(paths, rows, verdicts, tmp)
        sources = _pack(pngs, tmp / "converted.tar")  # row → a member of a temporary tar
        pad = _pack({_PAD: _tiny_jpeg().tobytes()}, tmp / "pad.tar", raw=True)[_PAD]
        size = max(len(p) for p in plan)
        segments: list[tuple[str, list[str]]] = []  # (tar, its index lines), in reading order
        ok_rows: list[list[int]] = []
        errors: list[dict[int, str]] = []
        for p in plan:
            good = [r for r in p.tolist() if not problems[r]]
            for row, ref in [(r, sources.get(r, paths[r])) for r in good] + [(_PAD, pad)] * (size - len(good)):
                shard, offset, length, _ = parse_member_ref(ref)
                line = wds2idx_line([(EXT, offset, length, f"{row if row != _PAD else 'pad'}.{EXT}")])
                if segments and segments[-1][0] == shard:
                    segments[-1][1].append(line)
                else:
                    segments.append((shard, [line]))
            ok_rows.append(good)
            errors.append({r: problems[r] for r in p.tolist() if problems[r]})
        index_paths = []
        for i, (_, lines) in enumerate(segments):
            index = tmp / f"segment-{i}.idx"
            index.write_text(wds2idx_text(lines))
            index_paths.append(str(index))
        return _Feed([s for s, _ in segments], [], ok_rows, errors, sources, index_paths)


def _pack(items: dict, dest: Path, raw: bool = False) -> dict[int, str]:
    """A tar at ``dest`` of ``items`` (row → a PNG file's path, or with ``raw`` its bytes): row → member reference."""
    if not items:
        return {}
    out: dict[int, str] = {}
    with tarfile.open(dest, "w", format=tarfile.USTAR_FORMAT) as tar:
        for row, item in items.items():
            data = item if raw else Path(item).read_bytes()
            info = tarfile.TarInfo(f"{row}.{EXT}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(dest, "r:") as tar:
        for member in tar:
            out[int(member.name.split(".")[0])] = member_ref(str(dest), member.offset_data, member.size)
    return out
