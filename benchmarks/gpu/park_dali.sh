#!/usr/bin/env bash
# On the GPU machine: move DALI part k (carried as benchmarks/gpu/dali/k, made by prepare_dali.sh)
# out of the checkout to /tmp/featstore-dali, where it stays while the machine is held, and say
# which parts are there. run_gpu.sh installs DALI once every part is parked.
set -euo pipefail
cd "$(dirname "$0")/../.."
k=${1:?usage: park_dali.sh PART_NUMBER}
src="benchmarks/gpu/dali/$k"
park=${DALI_PARK:-/tmp/featstore-dali}
compgen -G "$src/part-*" >/dev/null || { echo "error: no DALI part in $src: carry it in this call (carry=[\"$src\"]), after prepare_dali.sh" >&2; exit 1; }
mkdir -p "$park"
mv -f "$src"/part-* "$park/"
cp -f "$src/archive.sha256" "$park/archive.sha256"
read -r _ parts <"$park/archive.sha256"
echo "parked in $park: $(cd "$park" && ls part-* | tr '\n' ' ')(${parts#parts=} expected); $(du -sh "$park" | cut -f1)"
