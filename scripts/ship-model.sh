#!/usr/bin/env bash
# Rebuilds the shipped model from scratch: `train all` with the recipe in models/fer2013/,
# temperature calibration on PublicTest, and the f16 export. Everything is written under RUN_DIR;
# nothing in the repository is replaced. Compare RUN_DIR/export with models/fer2013, then copy it
# (and RUN_DIR/calibration/*) over by hand.
#
#   cargo build --release && scripts/ship-model.sh ../shared/data/fer2013/fer2013.csv.gz runs/fer2013
#
# Pass --resume as a third argument to continue a killed run (kill-then-resume is bit-exact).
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?usage: scripts/ship-model.sh FER2013_CSV RUN_DIR [--resume]}
run=${2:?usage: scripts/ship-model.sh FER2013_CSV RUN_DIR [--resume]}
resume=${3:-}
bin=./target/release/fer-cam

start=$(date +%s)
$bin train all --config models/fer2013/recipe.json --data "$data" --run-dir "$run" $resume
echo "train all: $(( $(date +%s) - start )) s (per-epoch seconds in $run/metrics.jsonl)" >&2
$bin calibrate --model "$run/card/model" --data "$data" --split PublicTest \
  --out "$run/calibration/fer2013.json"
$bin export --model "$run/card/model" --calibration "$run/calibration/fer2013.json" \
  --out "$run/export"
