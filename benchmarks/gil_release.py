"""Does ``torchvision.io.decode_jpeg`` release the GIL while it decodes? (issue 22, item 3)

    .venv/bin/python benchmarks/gil_release.py --device cpu      # libjpeg-turbo
    python3 benchmarks/gil_release.py --device cuda              # nvJPEG (batched), on a GPU machine

A thread makes long calls (a 4000×3000 JPEG decoded per call) while the main thread runs a
pure-Python loop and timestamps each round: a call that holds the GIL leaves no timestamp inside
it, one that releases it leaves many. Controls: ``time.sleep`` (releases) and one
backtracking ``re.search`` (holds). Counted per second inside the calls, so it does not depend on
how busy the machine is (a loaded machine only scales every count down alike).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import IMAGENETTE, OUT_DIR, fail, machine, write_json  # noqa: E402


def heartbeats_during(work, rounds: int) -> tuple[int, float]:
    """Run ``work`` ``rounds`` times on a thread while this thread beats; (beats inside the calls,
    seconds of calls). A call that holds the GIL leaves no beat inside it.

    "Inside" is the first 80% of the call's duration measured alone: the end a thread records itself
    comes late (it waits for the GIL after the call), so a holder would seem to let beats in."""
    alone = []
    for _ in range(3):
        t0 = time.perf_counter()
        work()
        alone.append(time.perf_counter() - t0)
    span = 0.8 * sorted(alone)[1]
    starts: list[float] = []
    done = threading.Event()

    def loop():
        for _ in range(rounds):
            starts.append(time.perf_counter())
            work()
        done.set()

    beats: list[float] = []
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    while not done.is_set():
        for _ in range(200):
            pass
        beats.append(time.perf_counter())
    t.join()
    margin = 0.002  # the GIL changes hands around a call's start (switch interval 0.5 ms: main)
    inside = sum(1 for b in beats for a in starts if a + margin < b < a + span)
    return inside, len(starts) * max(span - margin, 1e-9)


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

    def holds_gil():
        # one C call that never lets the GIL go (the regex engine keeps it; catastrophic backtracking, ~0.1 s)
        re.search(r"(x+x+)+y", "x" * 18)

    def pause():
        time.sleep(0.05)  # releases the GIL: the other control

    # one large photo per call (~0.1 s to decode on a CPU), so a call is long against time slices
    from PIL import Image

    big = Image.open(files[0]).convert("RGB").resize((4000, 3000))
    buf = __import__("io").BytesIO()
    big.save(buf, format="JPEG", quality=95)
    one = [torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)]

    def decode_big():
        # no synchronize here: waiting for the GPU releases the GIL whatever decode_jpeg does, so on
        # CUDA the call timed is decode_jpeg's own host work (nvJPEG's Huffman decode, its launches)
        decode_jpeg(one, mode=ImageReadMode.RGB, device=device)

    sys.setswitchinterval(0.0005)  # a thread waiting for the GIL gets it within 0.5 ms of a Python step
    decode()  # warm-up (nvJPEG handles, libjpeg tables)
    decode_big()
    rounds = max(3, int(args.seconds / 0.1))
    per_s = {}
    for name, work in (("sleep", pause), ("decode", decode_big), ("gil_holder", holds_gil)):
        inside, seconds = heartbeats_during(work, rounds)
        per_s[name] = inside / seconds if seconds else 0.0
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the decodes' GPU work, outside every timed call
    t0 = time.perf_counter()
    for _ in range(3):
        decode()
    rate = 3 * len(data) / (time.perf_counter() - t0)
    control = per_s["gil_holder"] < 0.35 * per_s["sleep"]  # the method sees a held GIL as held
    released = per_s["decode"] > 0.5 * per_s["sleep"]
    result = {
        "device": str(device),
        "heartbeats_per_s_inside_sleep": per_s["sleep"],
        "heartbeats_per_s_inside_decode": per_s["decode"],
        "heartbeats_per_s_inside_gil_holder": per_s["gil_holder"],
        "decode_img_per_s": rate,
        "batch": len(data),
        "method_detects_a_held_gil": control,
        "releases_gil": released if control else None,
    }
    print(json.dumps(result, indent=2))
    info = machine()
    write_json(args.out, {"machine": info, **result})


if __name__ == "__main__":
    main()
