#!/usr/bin/env bash
# MTP speculative decoding through the router, side by side with plain
# decoding: a router with `--speculative mtp` and one without, alternating
# ROUNDS times on MODEL (experts in process, THREADS compute threads), each
# serving 4 rounds of C concurrent requests of 16 prompt tokens and 128
# generated (greedy, EOS ignored) for C = 1 and 16. Prints one line per
# run: side, concurrency, output tok/s, and the router's draft counters.
# Usage: tools/spec_bench.sh [MODEL] [ROUNDS] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-model/demo} ROUNDS=${2:-3} THREADS=${3:-2}
BIN=${CARGO_TARGET_DIR:-target}/release
cargo build --release -q -p expertmesh -p expertmesh-router
GRPC=127.0.0.1:50395 HTTP=127.0.0.1:8395
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
counter() { curl -s "http://$HTTP/metrics" | awk -v k="expertmesh_spec_decode_$1_total" '$1 == k { print $2 }'; }
for _ in $(seq "$ROUNDS"); do
  for side in plain mtp; do
    flags=(); [ $side = mtp ] && flags=(--speculative mtp)
    "$BIN/router" --model "$MODEL" --grpc $GRPC --http $HTTP --threads "$THREADS" "${flags[@]}" > /dev/null 2>&1 &
    pid=$!
    for _ in $(seq 300); do curl -sf "http://$HTTP/ready" > /dev/null && break; kill -0 $pid || exit 1; sleep 0.2; done
    curl -sf "http://$HTTP/ready" > /dev/null || { echo "router not ready after 60 s" >&2; exit 1; }
    for c in 1 16; do
      before=("$(counter draft_tokens)" "$(counter accepted_tokens)")
      tps=$("$BIN/expertmesh" bench --router $GRPC --json --concurrency $c --requests $((4 * c)) \
        --prompt-tokens 16 --max-tokens 128 | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["output_tokens_per_s"], 1))')
      drafted=$(( $(counter draft_tokens) - before[0] )) accepted=$(( $(counter accepted_tokens) - before[1] ))
      echo "$side c=$c tok/s=$tps drafted=$drafted accepted=$accepted"
    done
    kill -INT $pid; wait $pid || true
  done
done
