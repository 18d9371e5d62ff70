#!/usr/bin/env bash
# The whole study: pretrain SimCLR, autoencoder and jigsaw, extract them and a random-init
# baseline, probe all four under one protocol, and compare each with random init (probe compare).
# Every store holds three views (encoder.py: `features`, the last stage, and `layer1`, `layer2`);
# probe fit probes each and probe compare pairs each encoder's view with random init's same view.
#
#   examples/ssl_study/run.sh [--quick] [--data IMAGENETTE_DIR] [--out DIR] [--device auto|cpu|cuda] [--epochs N] [--seed N] [--permutations N]
#
# --quick: 200 training images per class, all of val, a few epochs per method; under 15 minutes
# on a 2-core CPU. Without it: all of Imagenette and 100 epochs per method (meant for a GPU).
# --epochs N sets every method's epochs; --seed N is the pretraining seed (default 0); --permutations N
# is jigsaw's permutation set (default 10; the paper's 100 or 1000 for a long GPU run).
# Imagenette has train and val only: `probe fit` selects the learning rate on a seeded holdout of
# train and reports on val, on which no choice was made.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
DATA="$REPO/../shared/data/imagenette"
OUT="ssl-study"
DEVICE="auto"
QUICK=0
EPOCHS=""
SEED=0
PERMUTATIONS=10
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --data) DATA="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --device) DEVICE="$2"; shift ;;
    --epochs) EPOCHS="$2"; shift ;;
    --seed) SEED="$2"; shift ;;
    --permutations) PERMUTATIONS="$2"; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed -E 's/^# ?//'; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -d "$DATA/train" ] && [ -d "$DATA/val" ] || { echo "error: no train/ and val/ under '$DATA' (pass --data IMAGENETTE_DIR)" >&2; exit 2; }
PY="${PYTHON:-python}"
FEATSTORE="${FEATSTORE:-featstore}"
PROBE="${PROBE:-probe}"

if [ "$QUICK" = 1 ]; then
  # all of val (3,925 images; seconds more extraction than 1,000) halves the width of the paired
  # interval of each encoder's difference from random init; jigsaw's 16 epochs (8 gave a linear
  # gain of +2.2 [+0.6, +4.0] with seed 1) separate it on both probes with seeds 0 and 1 (docs/ssl_study.md)
  TRAIN_PER_CLASS=200; VAL_PER_CLASS=all
  EPOCHS_simclr=3; EPOCHS_autoencoder=10; EPOCHS_jigsaw=16
else
  EPOCHS_simclr=100; EPOCHS_autoencoder=100; EPOCHS_jigsaw=100
fi
# jigsaw cuts its puzzle from images 1.5x the probe's 64 px, so that its tiles are nearer the
# scale of what the probe shows the encoder (the paper: 64-px tiles of 225-px crops, evaluated at 224)
SIZE_simclr=64; SIZE_autoencoder=64; SIZE_jigsaw=96
if [ -n "$EPOCHS" ]; then EPOCHS_simclr=$EPOCHS; EPOCHS_autoencoder=$EPOCHS; EPOCHS_jigsaw=$EPOCHS; fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
start=$(date +%s)
echo "ssl study: data $DATA, out $OUT, quick=$QUICK, started $(date -u '+%Y-%m-%d %H:%M UTC')"

# --quick: a subset as an ImageFolder of symlinks, the first N files of every class (sorted; all: every file)
if [ "$QUICK" = 1 ]; then
  "$PY" "$HERE/subset.py" "$DATA" "$OUT/data" "$TRAIN_PER_CLASS" "$VAL_PER_CLASS"
  DATA="$OUT/data"
fi

for method in simclr autoencoder jigsaw; do
  epochs_var="EPOCHS_$method"; size_var="SIZE_$method"
  nice -n 10 "$PY" "$HERE/pretrain.py" --method "$method" --data "$DATA/train" --epochs "${!epochs_var}" --size "${!size_var}" \
    --out "$OUT/checkpoints/$method.pth" --threads "${THREADS:-1}" --device "$DEVICE" --permutations "$PERMUTATIONS" --seed "$SEED" | tee "$OUT/pretrain-$method.log"
done

extract() {  # name, then --weights FILE or --random-init
  local name="$1"; shift
  nice -n 10 "$FEATSTORE" extract --model "$HERE/encoder.py:build" "$@" --dataset "$DATA" --out "$OUT/stores/$name.zarr" \
    --image-size 64 --resize 72 --interpolation bilinear --loader torch --device "$DEVICE" --overwrite --no-progress 2>&1 | tee "$OUT/extract-$name.log"
}
for method in simclr autoencoder jigsaw; do extract "$method" --weights "$OUT/checkpoints/$method.pth"; done
extract random --random-init

nice -n 10 "$PROBE" fit --store "simclr=$OUT/stores/simclr.zarr" --store "autoencoder=$OUT/stores/autoencoder.zarr" \
  --store "jigsaw=$OUT/stores/jigsaw.zarr" --store "random-init=$OUT/stores/random.zarr" --lr-grid 1e-4:10:11 \
  --method linear,knn --device "$DEVICE" --out "$OUT/probe" --overwrite 2>&1 | tee "$OUT/probe.log"
# each encoder against random init on the same val images: paired bootstrap interval of the difference, McNemar
"$PROBE" compare "$OUT/probe" --reference random-init | tee "$OUT/compare.md"
# the same comparison as a leaderboard and one self-contained HTML page (forest plot, per-class differences)
"$PROBE" report "$OUT/probe" --reference random-init --out "$OUT/report" | tail -1
"$PY" "$HERE/plot_losses.py" "$OUT"/checkpoints/*.pth --out "$OUT/pretrain_loss.png"
echo "ssl study: done in $(( $(date +%s) - start )) s; results in $OUT/probe, comparison in $OUT/compare.md and $OUT/report/report.html, loss curves in $OUT/pretrain_loss.png"
