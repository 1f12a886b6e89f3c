#!/usr/bin/env bash
# Times `phigen report` on a mock corpus of 100,000 stories (the README's benchmark line).
#
#   benches/report_bench.sh [--bin PATH] [--n N] [--work DIR]
#
# The corpus is written by `phigen stories` against `phigen mock-server` (loopback, no key), kept
# in DIR (default: a temporary directory, removed afterwards) so a second run reuses it. The
# report runs with its defaults (2,000 records sampled, 128 embedded with all-MiniLM-L6-v2 when
# PHIGEN_MINILM or --embed-model finds it). Prints the load, the corpus size and the wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${CARGO_TARGET_DIR:-target}/debug/phigen"
N=100000
WORK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) BIN=$2; shift 2 ;;
    --n) N=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    *) echo "unknown argument $1; see the comment at the top of $0" >&2; exit 2 ;;
  esac
done
[ -x "$BIN" ] || { echo "$BIN: no phigen binary; build it (cargo build --locked) or pass --bin" >&2; exit 2; }
if [ -z "$WORK" ]; then
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK"

if [ ! -f "$WORK/stories/stats.json" ]; then
  LOG="$WORK/mock.log"
  "$BIN" mock-server --addr 127.0.0.1:0 >"$LOG" 2>&1 &
  MOCK=$!
  for _ in $(seq 50); do grep -q listening "$LOG" && break; sleep 0.1; done
  URL=$(grep -o 'http://[0-9.:]*/v1' "$LOG" | head -1)
  echo "writing $N mock stories into $WORK/stories ($URL)"
  start=$(date +%s.%N)
  "$BIN" --quiet stories --base-url "$URL" --model mock --out "$WORK/stories" --n "$N" \
    --concurrency 64 --max-attempts 20
  kill "$MOCK"
  echo "generated in $(echo "$(date +%s.%N) - $start" | bc) s"
fi

echo "load: $(uptime)"
echo "corpus: $(du -sh "$WORK/stories" | cut -f1), $(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['records'])" "$WORK/stories/stats.json") records"
start=$(date +%s.%N)
"$BIN" report "$WORK/stories" --out "$WORK/report.html"
echo "phigen report: $(echo "$(date +%s.%N) - $start" | bc) s, page $(du -h "$WORK/report.html" | cut -f1)"
