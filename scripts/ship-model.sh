#!/usr/bin/env bash
# Rebuilds the shipped model from scratch: `train all` with models/fer2013/recipe.json, then one
# warm-restart cycle of the supervised stage per models/fer2013/recipe-cycleN.json, in order of N
# (each starts from the previous model's encoder with a fresh head and a new cosine schedule; a
# cycle whose recipe has `classifier.distill` learns also from the previous model, `--teacher`;
# the first distilled cycle's teacher is TEACHER=DIR if given, else the model the recipe set
# names in RECIPES/teacher.rev (a git revision: the config.json and model.safetensors that
# RECIPES held then are extracted to RUN_DIR/teacher), else the previous model).
# From cycle SOUP_FROM (4) on, each cycle's f_phi is averaged with the model it started from
# (`fer-cam average`, a model soup: the two lie in one basin) and the mean, with a CARD head
# trained on its frozen encoder, is the model the next cycle starts from. Then the calibration
# on PublicTest under the shipped test-time views (flip: each face and its mirror image) and the
# f16 export. Everything is written under RUN_DIR (base/, cycle2/, ..., soup4/, ...,
# calibration/, export/); nothing in the repository is replaced. Compare RUN_DIR/export with
# models/fer2013, then copy it (and RUN_DIR/calibration/*) over by hand.
#
#   cargo build --release && scripts/ship-model.sh ../shared/data/fer2013/fer2013.csv.gz runs/fer2013
#
# Safe to run again on the same RUN_DIR after a kill: every stage that has begun is continued
# with --resume (kill-then-resume is bit-exact), and finished stages are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: scripts/ship-model.sh FER2013_CSV RUN_DIR"
data=${1:?$usage}
run=${2:?$usage}
bin=${FER_CAM_BIN:-./target/release/fer-cam}  # FER_CAM_BIN=PATH: another build
recipes=${RECIPES:-models/fer2013}  # RECIPES=DIR: another recipe set (tests use tiny ones)
tta=${TTA:-flip}  # the test-time views the temperatures are fitted under and the model runs with
soup_from=${SOUP_FROM:-4}  # the first cycle that is averaged with the model it started from
teacher_dir=${TEACHER:-}  # TEACHER=DIR: the first distilled cycle's teacher

# Runs `fer-cam train STAGE` in DIR unless DIR/done-STAGE exists; continues a begun stage.
train() {
  local stage=$1 dir=$2
  shift 2
  [ -e "$dir/done-$stage" ] && return 0
  local resume=() stages=("$stage")
  [ "$stage" = all ] && stages=(ssl classifier card)
  for s in "${stages[@]}"; do
    [ -e "$dir/$s" ] && resume=(--resume)
  done
  local start
  start=$(date +%s)
  $bin train "$stage" --data "$data" --run-dir "$dir" "${resume[@]}" "$@"
  echo "$dir: train $stage $(( $(date +%s) - start )) s (per-epoch seconds in $dir/metrics.jsonl)" >&2
  touch "$dir/done-$stage"
}

mkdir -p "$run"
if [ -z "$teacher_dir" ] && [ -e "$recipes/teacher.rev" ]; then
  # The earlier built-in model, from git history (it is not in the working tree any more).
  teacher_dir=$run/teacher
  if [ ! -e "$teacher_dir/model.safetensors" ]; then
    rev=$(tr -d '[:space:]' < "$recipes/teacher.rev")
    mkdir -p "$teacher_dir"
    for f in config.json model.safetensors; do
      git -C "$recipes" show "$rev:./$f" > "$teacher_dir/$f.part" || {
        echo "cannot read $recipes/$f at $rev from git: set TEACHER=DIR (see MODEL_CARD.md)" >&2
        exit 2
      }
      mv "$teacher_dir/$f.part" "$teacher_dir/$f"
    done
  fi
fi
train all "$run/base" --config "$recipes/recipe.json"
prev=$run/base
while read -r cycle; do
  name=$(basename "$cycle" .json)
  name=${name#recipe-}
  dir=$run/$name
  teacher=()
  if grep -q '"distill"' "$cycle"; then
    teacher=(--teacher "${teacher_dir:-$prev/card/model}")
    teacher_dir=
  fi
  train classifier "$dir" --config "$cycle" --init "$prev/classifier/model" "${teacher[@]}"
  n=${name#cycle}
  case $n in
    '' | *[!0-9]*) echo "$cycle: recipe names are recipe-cycleN.json, N a number" >&2; exit 2 ;;
  esac
  if [ "$n" -lt "$soup_from" ]; then
    # (--teacher again only so that the run's config.json keeps naming the teacher used.)
    train card "$dir" --config "$cycle" "${teacher[@]}"
    prev=$dir
    continue
  fi
  # The mean of this cycle's f_phi and the model it was fine-tuned from; its CARD head is
  # trained on the mean's frozen encoder as a cycle's is.
  soup=$run/soup$n
  if [ ! -e "$soup/classifier/model" ]; then
    mkdir -p "$soup/classifier"
    $bin average --model "$prev/classifier/model" --model "$dir/classifier/model" \
      --out "$soup/classifier/model"
    sed 's#"run_dir": *"[^"]*"#"run_dir": "'"$soup"'"#' "$dir/config.json" > "$soup/config.json"
  fi
  train card "$soup" --config "$soup/config.json"
  prev=$soup
done < <(ls "$recipes"/recipe-cycle*.json 2>/dev/null | sort -V)
if [ ! -e "$run/calibration/fer2013.json" ]; then
  $bin calibrate --model "$prev/card/model" --data "$data" --split PublicTest --tta "$tta" \
    --out "$run/calibration/fer2013.json"
fi
# The other test-time views get their own temperatures too (used when --tta picks them).
others=()
for views in none flip ten-crop; do
  [ "$views" = "$tta" ] && continue
  if [ ! -e "$run/calibration/fer2013-$views.json" ]; then
    $bin calibrate --model "$prev/card/model" --data "$data" --split PublicTest --tta "$views" \
      --out "$run/calibration/fer2013-$views.json"
  fi
  others+=(--calibration "$run/calibration/fer2013-$views.json")
done
if [ ! -e "$run/export" ]; then
  $bin export --model "$prev/card/model" --calibration "$run/calibration/fer2013.json" \
    "${others[@]}" --out "$run/export"
fi
