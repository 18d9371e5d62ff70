#!/usr/bin/env bash
# Everything the one GPU call needs, made here (with network and ../shared): the wheels, and a
# subset of Imagenette (../shared does not travel to the GPU machine). Checks that the working tree
# plus both folders stays under the device call's 64 MiB.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
src="$repo/../shared/data/imagenette"
subset="$here/data/imagenette"
COUNT=${COUNT:-2000}  # ~21 MB of 224-px JPEGs; the benchmark cycles through them for larger --limit
bash "$here/fetch_wheels.sh"
if [ ! -d "$src/train" ]; then
    echo "error: $src/train not found (Imagenette is expected next to the repository, see ../shared/data/README.md)" >&2
    exit 1
fi
rm -rf "$subset"
# every k-th file of the sorted listing: all ten classes, deterministic
find "$src/train" -name '*.JPEG' | sort | awk -v n="$(find "$src/train" -name '*.JPEG' | wc -l)" -v c="$COUNT" \
    'BEGIN{step=n/c} NR-1 >= next_pick {print; next_pick += step}' | while read -r f; do
    rel="${f#"$src"/}"
    mkdir -p "$subset/$(dirname "$rel")"
    cp "$f" "$subset/$rel"
done
echo "images: $(find "$subset" -name '*.JPEG' | wc -l) files, $(du -sh "$subset" | cut -f1) in $subset"
tree_kb=$(cd "$repo" && git ls-files -z --cached --others --exclude-standard | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
carry_kb=$(du -sk "$here/wheels" "$here/data" | awk '{s+=$1} END{print s}')
total_mb=$(( (tree_kb + carry_kb) / 1024 ))
echo "travels: working tree ${tree_kb} KiB + carried ${carry_kb} KiB = ${total_mb} MiB (limit 64 MiB)"
[ "$total_mb" -lt 64 ] || { echo "error: over the 64 MiB a device call carries; lower COUNT" >&2; exit 1; }
