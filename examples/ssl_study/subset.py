"""A subset of an ImageFolder dataset as a tree of symlinks: the first N files of every class
of each split (sorted by name, so the choice is deterministic; "all" keeps every file).

    python subset.py SRC DST N_TRAIN N_VAL        # e.g. imagenette ssl-study/data 200 all

``run.sh --quick`` and the CI-scale test (tests/test_ssl_study.py) both build their data with it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def make_subset(src: Path, dst: Path, per_class: dict[str, int | None]) -> Path:
    """``dst``/split/class/file → ``src``/split/class/file for the first ``per_class[split]`` files
    of every class (None: all); ``dst`` is replaced if it exists."""
    src, dst = Path(src), Path(dst)
    shutil.rmtree(dst, ignore_errors=True)
    for split, n in per_class.items():
        for cls in sorted(p.name for p in (src / split).iterdir() if p.is_dir()):
            (dst / split / cls).mkdir(parents=True)
            for f in sorted(p for p in (src / split / cls).iterdir() if p.is_file())[:n]:
                (dst / split / cls / f.name).symlink_to(f.resolve())
    return dst


def main(argv: list[str]) -> None:
    if len(argv) != 4:
        sys.exit("usage: subset.py SRC DST N_TRAIN N_VAL   (N: a count per class, or 'all')")
    src, dst, n_train, n_val = argv
    counts = [None if n == "all" else int(n) for n in (n_train, n_val)]
    make_subset(Path(src), Path(dst), dict(zip(("train", "val"), counts)))


if __name__ == "__main__":
    main(sys.argv[1:])
