"""``--save-predictions`` without holding the predictions: the chosen head's maps at target resolution
are appended batch by batch to a raw file beside the output, then copied into the .npz (a zip of .npy
files, as numpy.savez_compressed writes it) in 1 MiB pieces. Memory stays one batch whatever N is."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np


class PredictionFile:
    """An (N, H, W) array written in row order, batch by batch, to ``path`` (raw, C order)."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: Any) -> None:
        self.path, self.shape, self.dtype = path, tuple(int(s) for s in shape), np.dtype(dtype)
        self.rows = 0
        self._file = open(path, "wb")  # noqa: SIM115 (closed by close(), after the last batch)

    def append(self, values: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(values, self.dtype).tobytes())
        self.rows += len(values)

    def close(self) -> None:
        self._file.close()
        if self.rows != self.shape[0]:
            raise RuntimeError(f"{self.path}: {self.rows} rows written, {self.shape[0]} expected")

    def load(self) -> np.ndarray:
        """The whole array (tests; small runs)."""
        return np.fromfile(self.path, self.dtype).reshape(self.shape)


def write_npz(path: Path, arrays: dict[str, Any]) -> None:
    """``np.savez_compressed(path, **arrays)`` where an array may be a closed :class:`PredictionFile`,
    streamed from its file (np.load reads the result as any .npz)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        for name, value in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as out:
                if isinstance(value, PredictionFile):
                    header = np.lib.format.header_data_from_array_1_0(np.empty((0, *value.shape[1:]), value.dtype))
                    header["shape"] = value.shape
                    np.lib.format.write_array_header_2_0(out, header)
                    with open(value.path, "rb") as raw:
                        shutil.copyfileobj(raw, out, 1 << 20)
                else:
                    np.lib.format.write_array(out, np.asanyarray(value), allow_pickle=False)
