#!/usr/bin/env bash
# The GPU checks in one device call (no network is touched): install zarr from carried wheels and the
# package with --no-deps, run the GPU tests (capped at 150 s), then the extraction benchmark (ResNet-50
# and DINOv2 ViT-S/14 at 224, on the upscaled 500×375 set first (the targets are set on it), then the
# 224-px set, with every loader featstore has there), then the ImageNet-size probe sweep (capped at
# 120 s). Measured on an H200 (2026-11-29, benchmarks/RESULTS.md): 220 s in all (17 s install, 16 s
# tests, 110 s extraction, then probe, k-NN and logreg); the caps (330 s for extraction, whose JSON is
# rewritten after each model × set) only matter when something hangs.
#
# Here, once:   bash benchmarks/gpu/prepare.sh        (wheels + an Imagenette subset, size check)
# Device call:  command "bash benchmarks/gpu/run_gpu.sh", carry ["benchmarks/gpu/wheels", "benchmarks/gpu/data"],
#               timeout_s 600. Logs and JSON land in $OUT (benchmarks/out when run elsewhere).
# With DALI:    prepare_dali.sh here, park its parts with the calls it prints (same warm machine), then
#               the call above: DALI is installed from the parts and benchmarked beside the others.
# Knobs:        LIMIT (images per set), LOADERS (e.g. "dali": only those), MODELS (resnet50,dino), DEVICE (cuda),
#               SKIP_TESTS=1, SKIP_PROBE=1 (for a second call that only adds a loader),
#               SKIP_EXTRACT=1 (with SKIP_TESTS=1: a call with only the probe and battery benchmarks;
#               with SKIP_PROBE=1 too: only the install, e.g. before profile_extract.py).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PY:-python3}
LIMIT=${LIMIT:-12288}  # images per set: ~3 s of steady e2e per measurement at H100 rates; the call stays under 8 minutes
out="${OUT:-benchmarks/out}"
mkdir -p "$out"
step() { printf '\n=== %s (%s)\n' "$*" "$(date +%T)"; }

step machine
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader || { echo "error: no GPU here" >&2; exit 1; }
echo "cpus: $(nproc); python: $($PY -V 2>&1)"

step install
[ -d benchmarks/gpu/wheels ] || { echo "error: benchmarks/gpu/wheels missing: run prepare.sh here and carry it" >&2; exit 1; }
$PY -m pip install -q --no-index --find-links benchmarks/gpu/wheels zarr numcodecs donfig google-crc32c || exit 1
if ! $PY -m pip install -q --no-index --no-deps --no-build-isolation -e .; then
    echo "editable install failed; using the checkout through PYTHONPATH" >&2
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if $PY benchmarks/gpu/install_dali.py; then
    $PY -c "import nvidia.dali as d; print('DALI', d.__version__)" || echo "DALI installed but does not import; going on without it"
fi
$PY -c "import featstore, zarr, torch, torchvision, timm; print('featstore', featstore.__version__, '| zarr', zarr.__version__, '| torch', torch.__version__, '| torchvision', torchvision.__version__, '| timm', timm.__version__)" || exit 1

if [ "${SKIP_TESTS:-0}" != 1 ]; then
step "pytest -m gpu"
timeout 150 $PY -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/pytest-gpu.log"
rc=${PIPESTATUS[0]}
case $rc in 0) ;; 5) echo "no GPU tests collected" ;; *) echo "GPU tests FAILED (exit $rc); benchmarking anyway" ;; esac
fi

rc=${rc:-0}
if [ "${SKIP_EXTRACT:-0}" != 1 ]; then
step "extraction benchmark"
images=../shared/data/imagenette
[ -d "$images" ] || images=benchmarks/gpu/data/imagenette
[ -d "$images" ] || { echo "error: no images: carry benchmarks/gpu/data (prepare.sh makes it)" >&2; exit 1; }
# torch always; nvjpeg and DALI when this featstore has them and they import here
loaders=${LOADERS:-$($PY -c "
from featstore.loaders import LOADERS, dali_available
names = ['torch'] + [n for n in ('nvjpeg',) if n in LOADERS] + (['dali'] if 'dali' in LOADERS and dali_available() else [])
print(','.join(names))")}
echo "images: $images; loaders: $loaders"
timeout 330 $PY benchmarks/bench_extract.py --model "${MODELS:-resnet50,dino}" --set upscaled,224 --loader "$loaders" --device "${DEVICE:-cuda}" \
    --batch-size 256 --workers "$(nproc)" --limit "$LIMIT" --images "$images" --dali-tune --out "$out/extract-gpu.json" 2>&1 \
    | tee "$out/extract-gpu.log"
rc=${PIPESTATUS[0]}
fi

if [ "${SKIP_PROBE:-0}" != 1 ]; then
step "probe benchmark: ImageNet-size 13-LR sweep (target < 30 s on an H100)"
timeout 120 $PY benchmarks/bench_probe.py --sizes imagenet --device "${DEVICE:-cuda}" --baseline-lrs 1 --out "$out" 2>&1 \
    | tee "$out/probe-gpu.log" || echo "probe benchmark FAILED or timed out; going on"
step "battery benchmark: ImageNet-size k-NN, 1.28 M × 50 k × 384, k = 10, 20, 100, 200 (target < 60 s)"
timeout 150 $PY benchmarks/bench_battery.py --parts knn --sizes imagenet --device "${DEVICE:-cuda}" --out "$out" 2>&1 \
    | tee "$out/battery-gpu.log" || echo "battery benchmark FAILED or timed out; going on"
step "battery benchmark: logreg 13-C path, 50 k × 512 × 10, on the GPU vs scikit-learn on the CPU (target >= 10x)"
timeout 120 $PY benchmarks/bench_battery.py --parts logreg --device "${DEVICE:-cuda}" --out "$out" 2>&1 \
    | tee "$out/logreg-gpu.log" || echo "logreg benchmark FAILED or timed out; going on"
fi
# a device call returns at most 8 files: drop the probe benchmark's duplicate, and repeat the test
# summary last, where the call's printed tail always shows it
[ -n "${OUT:-}" ] && rm -f "$out/bench_probe-latest.json"
if [ -f "$out/pytest-gpu.log" ]; then step summary; echo "pytest -m gpu: $(tail -n 1 "$out/pytest-gpu.log")"; fi
exit "$rc"
