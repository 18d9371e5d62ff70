"""Does ``torchvision.io.decode_jpeg`` release the GIL while it decodes? (issue 22, item 3)

    .venv/bin/python benchmarks/gil_release.py --device cpu      # libjpeg-turbo
    python3 benchmarks/gil_release.py --device cuda              # nvJPEG (batched), on a GPU machine

A thread decodes a batch of real photos over and over, while the main thread counts how many
pure-Python steps it gets through in the same time. Three runs of the counter, each ``--seconds``:
beside an idle thread (the counter's full speed), beside the decoding thread, and beside a thread
that only runs Python (holds the GIL as much as the interpreter lets it: the floor). The share of
the full speed the counter keeps beside the decoder says whether a producer thread that decodes can
overlap the main thread's work: near 1 it can (the GIL is released during the decode), near the
floor it cannot. The decoder's own rate beside the counter is printed too.

On a machine with fewer cores than threads, a released GIL still shares the cores: read the share
against the core count (2 threads need 2 free cores for a share near 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import IMAGENETTE, OUT_DIR, fail, machine, write_json  # noqa: E402


def count_for(seconds: float) -> int:
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(1000):
            n += 1
    return n


def beside(work, seconds: float) -> tuple[int, int]:
    """(counter steps in ``seconds``, rounds ``work`` completed meanwhile in its thread)."""
    stop = threading.Event()
    rounds = [0]

    def loop():
        while not stop.is_set():
            work()
            rounds[0] += 1

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    time.sleep(0.2)  # the thread is running
    n = count_for(seconds)
    stop.set()
    t.join()
    return n, rounds[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=Path, default=IMAGENETTE)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=OUT_DIR / "gil_release.json")
    args = parser.parse_args()

    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    files = sorted(args.images.rglob("*.JPEG"))[: args.batch]
    if not files:
        fail(f"no JPEGs under {args.images}")
    data = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
    device = torch.device(args.device)

    def decode():
        decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def python_only():
        sum(i * i for i in range(20000))

    decode()  # warm-up (nvJPEG handles, libjpeg tables)
    idle, _ = beside(lambda: time.sleep(0.01), args.seconds)
    decoding, batches = beside(decode, args.seconds)
    holding, _ = beside(python_only, args.seconds)
    result = {
        "device": str(device),
        "batch": len(data),
        "counter_idle": idle,
        "counter_beside_decode": decoding,
        "counter_beside_python": holding,
        "share_beside_decode": decoding / idle,
        "share_beside_python": holding / idle,
        "decode_img_per_s_beside_counter": batches * len(data) / args.seconds,
        "releases_gil": decoding / idle > max(0.75, 1.5 * holding / idle),
    }
    print(json.dumps(result, indent=2))
    info = machine()
    write_json(args.out, {"machine": info, **result})


if __name__ == "__main__":
    main()
