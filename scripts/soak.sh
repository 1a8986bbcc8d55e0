#!/usr/bin/env bash
# Soak: SECONDS of 640x360 video at 30 fps through stdin (`--input - --realtime`, a live source)
# into `fer-cam run`, with a JSON reader slower than the frames (SLOW_LINES_PER_S lines a second).
# Prints RSS at start and end (sampled every 10 s) and checks that every frame fed is accounted
# for in the summary: frames + dropped + skipped = fed.
#
#   cargo build --release --examples && scripts/soak.sh ../shared/media/woman_expressions_320x180_2fps.y4m 600
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:?usage: scripts/soak.sh CLIP.y4m SECONDS [SLOW_LINES_PER_S]}
secs=${2:?usage: scripts/soak.sh CLIP.y4m SECONDS [SLOW_LINES_PER_S]}
slow=${3:-10}
bin=${FER_CAM_BIN:-./target/release/fer-cam}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# One 20-s copy of the clip at 640x360, 30 fps (each source frame shown 15 times).
./target/release/examples/upscale_y4m "$src" "$work/clip.y4m" 640 360 30 15
hdr=$(head -1 "$work/clip.y4m" | wc -c)
per_copy=$(( ($(stat -c %s "$work/clip.y4m") - hdr) / (6 + 640 * 360 * 3 / 2) ))
copies=$(( (secs * 30 + per_copy - 1) / per_copy ))
fed=$(( copies * per_copy ))
{ cat "$work/clip.y4m"; for _ in $(seq 2 "$copies"); do tail -c +$((hdr + 1)) "$work/clip.y4m"; done; } \
  | "$bin" run --input - --realtime --status-every 10 2> "$work/stderr" \
  | python3 -c "
import sys, time
last = None
for line in sys.stdin:
    last = line
    time.sleep(1.0 / $slow)
open('$work/last.json', 'w').write(last or '')
" &
reader=$!
sleep 2
pid=$(pgrep -n -f "$bin run --input - --realtime")
: > "$work/rss"
while kill -0 "$pid" 2>/dev/null; do
  awk '/VmRSS/ {print $2}' "/proc/$pid/status" >> "$work/rss" 2>/dev/null || true
  sleep 10
done
wait "$reader"
python3 - "$work/last.json" "$work/rss" "$fed" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
rss = [int(x) for x in open(sys.argv[2]).read().split()]
fed = int(sys.argv[3])
total = s["frames"] + s["dropped"] + s["skipped"]
print(f"fed {fed} frames in {s['seconds']} s: emitted {s['frames']}, dropped {s['dropped']}, "
      f"skipped {s['skipped']} -> {'all accounted for' if total == fed else f'MISSING {fed - total}'}")
print(f"RSS start {rss[0] / 1024:.0f} MiB, end {rss[-1] / 1024:.0f} MiB, max {max(rss) / 1024:.0f} MiB "
      f"({len(rss)} samples); capture-to-emit p50 {s['latency_ms']['p50']} ms, p99 {s['latency_ms']['p99']} ms")
print("RSS MiB every 10 s:", " ".join(f"{r / 1024:.0f}" for r in rss))
sys.exit(0 if total == fed else 1)
PY
