#!/usr/bin/env bash
# The prefix cache, measured: one router (experts in process) on MODEL,
# started with the cache and then with --no-prefix-cache, each taking:
#   ttft    5 requests one at a time, 1,500 shared prompt tokens + 32 own:
#           the first computes the prefix, the rest find it cached;
#   chat    a 10-turn conversation replayed turn by turn (tools/chat_replay.py);
#   shared  64 requests, 32 at a time, 1,024 shared tokens + 64 own, 32 out;
#   unique  32 requests, 8 at a time, 256 tokens sharing nothing, 32 out
#           (run ROUNDS times per mode, alternating, for the no-sharing cost).
# Usage: tools/prefix_bench.sh [MODEL] [THREADS] [ROUNDS]   (release build first)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-target/bench-model}
THREADS=${2:-2}
ROUNDS=${3:-3}
BIN=target/release
[ -f "$MODEL/config.json" ] || "$BIN/expertmesh" gen-model --preset bench --out "$MODEL"
GRPC=127.0.0.1:50391 HTTP=127.0.0.1:8391
OUT=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$OUT"' EXIT

start() { # extra router flags...
  "$BIN/router" --model "$MODEL" --grpc $GRPC --http $HTTP --threads "$THREADS" "$@" > "$OUT/router.log" 2>&1 &
  PID=$!
  for _ in $(seq 600); do
    curl -sf "http://$HTTP/ready" > /dev/null && return
    kill -0 $PID 2>/dev/null || { cat "$OUT/router.log"; exit 1; }
    sleep 0.5
  done
  echo "router did not become ready"; exit 1
}
stop() { kill -INT $PID; wait $PID || true; }
bench() { "$BIN/expertmesh" bench --router $GRPC --json "$@"; }

for mode in cache nocache; do
  flags=(); [ $mode = nocache ] && flags=(--no-prefix-cache)
  start "${flags[@]}"
  echo "$mode ttft   $(bench --concurrency 1 --requests 5 --prompt-tokens 1532 --shared-prefix-tokens 1500 --max-tokens 1)"
  echo "$mode chat   $(python3 tools/chat_replay.py $HTTP 10)"
  echo "$mode shared $(bench --concurrency 32 --requests 64 --prompt-tokens 1088 --shared-prefix-tokens 1024 --max-tokens 32)"
  stop
done
for r in $(seq "$ROUNDS"); do
  for mode in cache nocache; do
    flags=(); [ $mode = nocache ] && flags=(--no-prefix-cache)
    start "${flags[@]}"
    echo "$mode unique $(bench --concurrency 8 --requests 32 --prompt-tokens 256 --max-tokens 32)"
    stop
  done
done
