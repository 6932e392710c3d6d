#!/usr/bin/env bash
# KV block size, measured: a router (experts in process) on MODEL with
# --kv-block-tokens 16, 32 and 64, alternating ROUNDS times; each decodes
# 64 tokens after a 2,048-token prompt (one request: attention over a long
# cache) and runs 8 requests at a time of 512 + 64 tokens.
# Usage: tools/kv_block_bench.sh [MODEL] [THREADS] [ROUNDS]   (release build first)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-target/bench-model} THREADS=${2:-2} ROUNDS=${3:-2}
BIN=target/release GRPC=127.0.0.1:50392 HTTP=127.0.0.1:8392
[ -f "$MODEL/config.json" ] || "$BIN/expertmesh" gen-model --preset bench --out "$MODEL"
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
for r in $(seq "$ROUNDS"); do
  for b in 16 32 64; do
    "$BIN/router" --model "$MODEL" --grpc $GRPC --http $HTTP --threads "$THREADS" --kv-block-tokens $b \
      --no-prefix-cache > /dev/null 2>&1 &
    pid=$!
    until curl -sf "http://$HTTP/ready" > /dev/null; do sleep 0.5; done
    long=$("$BIN/expertmesh" bench --router $GRPC --json --concurrency 1 --requests 2 --prompt-tokens 2048 --max-tokens 64)
    many=$("$BIN/expertmesh" bench --router $GRPC --json --concurrency 8 --requests 16 --prompt-tokens 512 --max-tokens 64)
    echo "block $b long $long"
    echo "block $b many $many"
    kill -INT $pid; wait $pid || true
  done
done
