#!/usr/bin/env bash
# Opens fer-cam reports in headless Chromium at a phone's width (390 px) and a laptop's (1280 px),
# saves a screenshot of each, and fails when the page itself scrolls sideways (only tables may
# scroll, inside their own box) or when a plot is wider than the page.
#
#   scripts/report-browser-check.sh OUT_DIR REPORT_DIR...
#
# Needs Debian's chromium (apt install chromium). Screenshots go to OUT_DIR as
# NAME-390.png / NAME-1280.png.
set -euo pipefail
out=$1
shift
command -v chromium >/dev/null || { echo "chromium not found (apt install chromium)" >&2; exit 2; }
mkdir -p "$out"
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run
  --disable-background-networking --disable-component-update --disable-sync
  --hide-scrollbars --user-data-dir="$profile")
fail=0
for dir in "$@"; do
  name=$(basename "$dir")
  # A copy of the page that writes what it measured into the DOM once laid out.
  probe="$profile/$name-probe.html"
  sed 's#</body></html>#<script>addEventListener("load",()=>{const w=innerWidth,d=document.documentElement.scrollWidth;const wide=[...document.querySelectorAll("svg")].filter(s=>s.getBoundingClientRect().width>w).length;document.body.setAttribute("data-check","viewport="+w+" page="+d+" wide_svgs="+wide);});</script></body></html>#' \
    "$dir/index.html" > "$probe"
  for width in 390 1280; do
    chromium "${flags[@]}" --window-size=$width,2400 --screenshot="$out/$name-$width.png" \
      "file://$(realpath "$dir")/index.html" >/dev/null 2>&1
    check=$(chromium "${flags[@]}" --window-size=$width,2400 --virtual-time-budget=2000 \
      --dump-dom "file://$probe" 2>/dev/null | grep -o 'data-check="[^"]*"' || true)
    echo "$name @ ${width}px: ${check:-no measurement}"
    vw=$(sed -n 's/.*viewport=\([0-9]*\).*/\1/p' <<<"$check")
    pw=$(sed -n 's/.*page=\([0-9]*\).*/\1/p' <<<"$check")
    wide=$(sed -n 's/.*wide_svgs=\([0-9]*\).*/\1/p' <<<"$check")
    if [ -z "$vw" ] || [ "$pw" -gt "$vw" ] || [ "$wide" -ne 0 ]; then
      echo "FAIL: $name at ${width}px scrolls sideways or has a plot wider than the page" >&2
      fail=1
    fi
  done
done
exit $fail
