#!/usr/bin/env bash
# The GPU check, in one go and inside ten minutes on one recent GPU: the parity tests of the
# CUDA kernels, CPU-vs-GPU benches, the daemon on a clip with --device cuda and --device cpu,
# and a short `train all` timing.
#
#   scripts/gpu-check.sh [BIN_DIR]
#
# BIN_DIR holds binaries built with `--features cuda` (see docs/kernels.md, "GPU"): fer-cam, gpu_bench,
# upscale_y4m and the test binary of tests/cuda.rs named cuda-tests. Without BIN_DIR they are
# built here with cargo (this needs the CUDA toolkit; `source scripts/cuda-env.sh` gives one).
# Environment:
#   CLIP   a .y4m (or .y4m.xz) clip with faces [tests/fixtures/faces.y4m is too short to time;
#          default: ../shared/media/woman_expressions_320x180_2fps.y4m]
#   DATA   FER2013 CSV (.csv or .csv.gz) for the training timing; unset: skipped
#   SCALE  DATA holds 1/SCALE of FER2013 (for the full-recipe estimate) [1]
#   OUT    folder for the logs [gpu-check-out]
#   TRAIN_TIMEOUT  seconds the training timing may take [900]
#   RUN_DEVICES    devices the daemon is timed on [cuda cpu]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
t0=$(date +%s)

if [ $# -ge 1 ]; then
  BIN=$1
else
  cargo build --release --features cuda --bin fer-cam --example gpu_bench --example upscale_y4m || exit 1
  test_bin=$(cargo test --release --features cuda --test cuda --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="cuda" and m.get("executable"): print(m["executable"])' | tail -1)
  BIN=$OUT/bin
  mkdir -p "$BIN"
  cp target/release/fer-cam target/release/examples/gpu_bench target/release/examples/upscale_y4m "$BIN/"
  cp "$test_bin" "$BIN/cuda-tests"
fi
for b in fer-cam gpu_bench upscale_y4m cuda-tests; do
  [ -x "$BIN/$b" ] || { echo "gpu-check: $BIN/$b is missing" >&2; exit 1; }
done

# The CUDA libraries the binary links (cuBLAS, cuRAND, the runtime; NVRTC for our kernels):
# from the system, or from a PyTorch / NVIDIA wheel install when the loader does not know them.
if ! ldconfig -p 2>/dev/null | grep -q 'libcublas.so.13'; then
  for py in python3 /opt/torch/.venv/bin/python3; do
    d=$($py -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null) || continue
    [ -e "$d/libcublas.so.13" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" && break
  done
  for d in "${CUDA_HOME:-/usr/local/cuda}/lib64" /usr/local/cuda/lib64; do
    [ -e "$d/libcublas.so.13" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
  done
fi
if ldd "$BIN/fer-cam" | grep -q 'not found'; then
  echo "gpu-check: libraries not found:" >&2
  ldd "$BIN/fer-cam" | grep 'not found' >&2
  exit 1
fi
log "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/summary.txt"

log "parity tests (tests/cuda.rs)"
"$BIN/cuda-tests" --test-threads=1 2>&1 | tee "$OUT/parity.txt" | grep -E '^test |SKIPPED|test result|panicked|assert' | tee -a "$OUT/summary.txt"

log "benches (examples/gpu_bench.rs)"
"$BIN/gpu_bench" 20 2>&1 | tee -a "$OUT/summary.txt"

CLIP=${CLIP:-../shared/media/woman_expressions_320x180_2fps.y4m}
if [ -f "$CLIP" ]; then
  case "$CLIP" in
    *.xz) python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$CLIP" "$OUT/clip.y4m"; CLIP=$OUT/clip.y4m ;;
  esac
  "$BIN/upscale_y4m" "$CLIP" "$OUT/clip640.y4m" 640 360 30 15 >/dev/null 2>&1
  for dev in ${RUN_DEVICES:-cuda cpu}; do
    log "fer-cam run --device $dev --realtime --stats (640x360, 30 fps)"
    "$BIN/fer-cam" run --input "$OUT/clip640.y4m" --device $dev --realtime --stats \
      > "$OUT/run-$dev.jsonl" 2> "$OUT/run-$dev.err"
    echo "rc $? · $(wc -l < "$OUT/run-$dev.jsonl") lines" | tee -a "$OUT/summary.txt"
    tail -4 "$OUT/run-$dev.err" | tee -a "$OUT/summary.txt"
  done
else
  log "no clip at $CLIP: daemon timing skipped"
fi

if [ -n "${DATA:-}" ]; then
  scale=${SCALE:-1}
  log "train all, one epoch per stage, on $DATA (1/$scale of FER2013)"
  rm -rf "$OUT/train"
  start=$(date +%s)
  timeout "${TRAIN_TIMEOUT:-900}" "$BIN/fer-cam" train all --data "$DATA" --run-dir "$OUT/train" --device cuda --cache-dir "$OUT/cache" \
    --ssl-epochs 1 --classifier-epochs 1 --card-epochs 1 --quiet > "$OUT/train.txt" 2> "$OUT/train.err"
  echo "rc $? · $(( $(date +%s) - start )) s in all" | tee -a "$OUT/summary.txt"
  tail -3 "$OUT/train.err" | tee -a "$OUT/summary.txt"
  # Seconds per epoch and stage, and the shipped recipe's epochs at full size.
  python3 - "$OUT/train/metrics.jsonl" models/fer2013/recipe.json "$scale" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
recipe, scale = json.load(open(sys.argv[2])), float(sys.argv[3])
total = 0.0
for stage in ("ssl", "classifier", "card"):
    secs = [r["seconds"] for r in rows if r.get("stage") == stage and "seconds" in r]
    if not secs:
        print(f"{stage}: no epoch timing found"); continue
    full = secs[-1] * scale * recipe[stage]["epochs"]
    total += full
    print(f"{stage}: {secs[-1]:.1f} s/epoch here; x{scale:g} size x {recipe[stage]['epochs']} epochs = {full/60:.1f} min")
print(f"train all, shipped recipe, full FER2013 (estimate from these epochs): {total/60:.1f} min")
PY
fi
log "gpu-check finished in $(( $(date +%s) - t0 )) s"
