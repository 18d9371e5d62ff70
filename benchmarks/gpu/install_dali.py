"""Install DALI from the parts park_dali.sh left in the park folder (see prepare_dali.sh).

Joins the parts in order, checks the archive's sha256, and unpacks it into this Python's
site-packages (merging into the image's ``nvidia`` namespace), or into ``--target`` when given.
Exit 0: installed; 3: nothing parked (DALI is simply not there this time); 1: parts missing or
damaged (said in one line).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import sysconfig
import tarfile
from pathlib import Path


class Joined(io.RawIOBase):
    """The parts read back to back as one stream."""

    def __init__(self, parts: list[Path]):
        self.files = [p.open("rb") for p in parts]

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while self.files:
            n = self.files[0].readinto(buf)
            if n:
                return n
            self.files.pop(0).close()
        return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--park", default="/tmp/featstore-dali")
    ap.add_argument("--target", default=None, help="folder to unpack into (default: this Python's site-packages)")
    args = ap.parse_args()
    park = Path(args.park)
    manifest = park / "archive.sha256"
    if not manifest.exists():
        print(f"DALI: nothing parked in {park}; skipping it")
        return 3
    expected, parts_field = manifest.read_text().split()
    count = int(parts_field.removeprefix("parts="))
    parts = [park / f"part-{k}" for k in range(count)]
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        print(f"error: DALI parts missing in {park}: {', '.join(missing)}; park them with park_dali.sh first", file=sys.stderr)
        return 1
    digest = hashlib.sha256()
    with io.BufferedReader(Joined(parts), buffer_size=1 << 20) as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        print(
            f"error: DALI archive sha256 {digest.hexdigest()[:12]}… is not {expected[:12]}…: re-park the parts of one prepare_dali.sh run",
            file=sys.stderr,
        )
        return 1
    target = Path(args.target or sysconfig.get_paths()["purelib"])
    target.mkdir(parents=True, exist_ok=True)
    with io.BufferedReader(Joined(parts), buffer_size=1 << 20) as stream, tarfile.open(fileobj=stream, mode="r|xz") as tar:
        tar.extractall(target, filter="data")
    print(f"DALI: installed into {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
