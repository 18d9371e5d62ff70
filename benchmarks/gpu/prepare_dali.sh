#!/usr/bin/env bash
# NVIDIA DALI for the GPU machine, in parts that each fit one device call.
#
# The GPU image lacks DALI, and DALI with the libraries it needs is ~260 MB as wheels, over the 64 MiB
# one call carries. This script downloads the CPython $PYVER (3.12) wheels here, unpacks them, drops what the
# GPU machine's Python cannot use (extension modules for other CPython versions, C++ headers),
# packs the rest as one xz tarball (~165 MiB) and splits it into parts of PART_MB, one part per
# folder benchmarks/gpu/dali/<k>/ with the tarball's sha256 beside it.
#
# PYVER=3.11 makes the same for CPython 3.11 (used to check the parts here).
#
# Then, on one warm machine, calls back to back (the machine goes back 30 s after a call ends):
#   run(command="bash benchmarks/gpu/park_dali.sh 1", carry=["benchmarks/gpu/dali/1"], timeout_s=120)
#   ... the same for 2, 3 (as many as this script made), then
#   run(command="bash benchmarks/gpu/run_gpu.sh", carry=["benchmarks/gpu/wheels", "benchmarks/gpu/data"])
# park_dali.sh moves each part out of the checkout to /tmp/featstore-dali (kept while the machine is
# held); run_gpu.sh joins the parts, checks the sha256 and installs DALI into python3's site-packages.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="$here/dali"
PY=${PY:-"$here/../../.venv/bin/python"}
PART_MB=${PART_MB:-56}  # + the working tree (3.7 MiB on 2026-12-08): under the 64 MiB a call carries
# DALI and what it needs that the GPU image (torch 2.11 cu130, numpy, pyyaml, typing-extensions,
# packaging, six) does not have; versions are those DALI 2.4.0's metadata asks for
WHEELS=(nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43
        nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82 nvidia-libnvcomp-cu13==5.3.0.16
        nvtx==0.2.17 libcst==1.9.0 optree==0.20.0 gast==0.7.0 makefun==1.16.0 astunparse==1.6.3)
PYVER=${PYVER:-3.12}  # the GPU image's python3
PYTAG=cpython-${PYVER/./}

work="$(mktemp -d "${TMPDIR:-/tmp}/featstore-dali.XXXXXX")"
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --dest "$work/wheels" \
    --python-version "$PYVER" --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    "${WHEELS[@]}"
mkdir "$work/site"
for w in "$work"/wheels/*.whl; do
    "$PY" -m zipfile -e "$w" "$work/site"
done
# Extension modules for other Pythons and C++ headers are dead weight there. nvidia/__init__.py
# (shipped by one wheel) would turn the image's `nvidia` namespace package into a regular one.
find "$work/site" -name '*.cpython-*.so' ! -name "*.$PYTAG-*" -delete
rm -rf "$work"/site/nvidia/*/include "$work/site/nvidia/__init__.py"
echo "unpacked and pruned: $(du -sh "$work/site" | cut -f1)"
tar -C "$work/site" -cf - . | xz -T0 -9 >"$work/dali-site.tar.xz"
rm -rf "$dest"
mkdir -p "$dest"
split -b "${PART_MB}M" -d -a 1 "$work/dali-site.tar.xz" "$work/part-"
sum=$(sha256sum "$work/dali-site.tar.xz" | cut -d' ' -f1)
n=0
for p in "$work"/part-*; do
    n=$((n + 1))
    mkdir "$dest/$n"
    mv "$p" "$dest/$n/part-$(basename "$p" | cut -d- -f2)"
done
for k in $(seq 1 $n); do
    printf '%s  %s\n' "$sum" "parts=$n" >"$dest/$k/archive.sha256"
done
ls -l "$dest"/*
echo "dali: $(du -sh "$work/dali-site.tar.xz" | cut -f1) in $n parts under $dest (sha256 $sum)"
for k in $(seq 1 $n); do
    echo "  run(command=\"bash benchmarks/gpu/park_dali.sh $k\", carry=[\"benchmarks/gpu/dali/$k\"], timeout_s=120)"
done
