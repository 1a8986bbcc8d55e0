#!/usr/bin/env bash
# Prints every number of models/fer2013/MODEL_CARD.md: PublicTest and PrivateTest reports of the
# shipped (embedded) model, f32 against f16 storage, and the samples x steps trade-off.
#
#   scripts/model-card-numbers.sh ../shared/data/fer2013/fer2013.csv.gz RUN_DIR OUT_DIR
#
# RUN_DIR is the `train all` run the model came from (its card/model holds the f32 weights).
# PrivateTest is read once, for the report; nothing is chosen on it.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?usage: scripts/model-card-numbers.sh FER2013_CSV RUN_DIR OUT_DIR}
run=${2:?usage: scripts/model-card-numbers.sh FER2013_CSV RUN_DIR OUT_DIR}
out=${3:?usage: scripts/model-card-numbers.sh FER2013_CSV RUN_DIR OUT_DIR}
bin=./target/release/fer-cam
mkdir -p "$out"
ev() { $bin eval --data "$data" --quiet "$@"; }

# Stored f32 (as trained, calibrated temperature applied) against the shipped f16 export.
$bin export --model "$run/card/model" --weights f32 \
  --calibration calibration/fer2013.json --out "$out/f32-model" >/dev/null
ev --model "$out/f32-model" --split PublicTest --json "$out/public_f32.json" > "$out/public_f32.txt"
ev --split PublicTest --json "$out/public.json" > "$out/public.txt"
# The samples x steps trade-off that sets the daemon's defaults (PublicTest only).
for ss in "8 10" "16 10" "32 5" "64 10"; do
  set -- $ss
  ev --split PublicTest --samples "$1" --steps "$2" --json "$out/public_s$1_t$2.json" \
    > "$out/public_s$1_t$2.txt"
done
# Other test-time views: none (half the encoder work per face) and ten-crop.
ev --split PublicTest --tta none --json "$out/public_notta.json" > "$out/public_notta.txt"
ev --split PublicTest --tta ten-crop --json "$out/public_tencrop.json" > "$out/public_tencrop.txt"
# The report: PrivateTest, once.
ev --split PrivateTest --json "$out/private.json" > "$out/private.txt"
cat "$out/public.txt" "$out/private.txt"
