#!/usr/bin/env bash
# Fill benchmarks/gpu/wheels/ with what the GPU image lacks (zarr and its small dependencies), for
# CPython 3.11 and 3.12 on manylinux x86_64, and report the size. The GPU machine has no network:
# run_gpu.sh installs from this folder only. Versions match this repository's development venv.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="$here/wheels"
PY=${PY:-"$here/../../.venv/bin/python"}
PACKAGES=(zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 typing-extensions==4.16.0 packaging==26.3)
mkdir -p "$dest"
for pyver in 3.11 3.12; do
    # --no-deps: the image already has numpy and pyyaml; everything else zarr needs is listed above
    "$PY" -m pip download -q --no-deps --only-binary=:all: --dest "$dest" \
        --python-version "$pyver" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        "${PACKAGES[@]}"
done
ls -l "$dest"
echo "wheels: $(du -sh "$dest" | cut -f1) in $dest"
