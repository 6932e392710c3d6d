#!/usr/bin/env bash
# Two router builds side by side, alternating ROUNDS times on MODEL (experts
# in process, 2 threads): one 2,048-token prompt decoding 64 tokens, then 16
# requests of 512 + 64 tokens, 8 at a time. DIR_A and DIR_B hold a `router`
# binary each (build the other commit with, for example,
#   git worktree add ../old REV && (cd ../old && CARGO_TARGET_DIR=../old-target \
#     cargo build --release -p expertmesh-router)).
# Usage: tools/router_ab.sh DIR_A DIR_B [ROUNDS] [MODEL] [-- extra router flags for B]
set -euo pipefail
cd "$(dirname "$0")/.."
A=$1 B=$2 ROUNDS=${3:-3} MODEL=${4:-target/bench-model}
shift $(( $# < 4 ? $# : 4 )); [ "${1:-}" = "--" ] && shift
GRPC=127.0.0.1:50394 HTTP=127.0.0.1:8394
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
for _ in $(seq "$ROUNDS"); do
  for side in A B; do
    extra=(); [ $side = B ] && extra=("$@")
    "${!side}/router" --model "$MODEL" --grpc $GRPC --http $HTTP --threads 2 "${extra[@]}" > /dev/null 2>&1 &
    pid=$!
    until curl -sf "http://$HTTP/ready" > /dev/null; do sleep 0.5; done
    echo "$side long $(target/release/expertmesh bench --router $GRPC --json --concurrency 1 --requests 2 \
      --prompt-tokens 2048 --max-tokens 64)"
    echo "$side many $(target/release/expertmesh bench --router $GRPC --json --concurrency 8 --requests 16 \
      --prompt-tokens 512 --max-tokens 64)"
    kill -INT $pid; wait $pid || true
  done
done
