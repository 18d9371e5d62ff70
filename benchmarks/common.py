"""Helpers shared by the benchmarks: machine facts, the device's matmul rate, tables, JSON, data paths."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "benchmarks" / "out"
IMAGENETTE = REPO.parent / "shared" / "data" / "imagenette"
MB = 1e6  # throughput is reported in decimal MB/s


def machine() -> dict:
    """What a reader needs to compare two runs: when, where, how busy the machine was."""
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host_cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }
    info["git"] = _git_state()
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def _git_state() -> str:
    """The commit measured, and whether the package's code differed from it (others edit it in place)."""

    def git(*cmd):
        return subprocess.run(["git", *cmd], check=False, cwd=REPO, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "featstore")
    return git("rev-parse", "--short", "HEAD") + (" + uncommitted featstore/ changes" if dirty else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor()


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format spec). Missing values print as '-'."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


def sync(device) -> None:
    """Wait for the device's queued work, so that a timer read next includes it (no-op on CPU)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def matmul_rate(device, dtype, n: int = 4096, reps: int = 5) -> float:
    """Best-of-``reps`` FLOP/s of an n×n×n matmul in ``dtype`` on ``device``: the yardstick for
    "how close to the hardware" (a dense GEMM is about the best any model layer can do)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
