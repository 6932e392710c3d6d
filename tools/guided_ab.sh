#!/usr/bin/env bash
# Two router builds side by side on MODEL, alternating PASSES times, each
# pass running tools/guided_bench.py for ROUNDS rounds (decode at 1 and 32
# concurrent, unconstrained and under a JSON schema). DIR_A and DIR_B hold a
# `router` binary each (see tools/router_ab.sh for building another commit).
# Usage: tools/guided_ab.sh DIR_A DIR_B MODEL [PASSES] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
A=$1 B=$2 MODEL=$3 PASSES=${4:-2} ROUNDS=${5:-2}
HTTP=127.0.0.1:8395 GRPC=127.0.0.1:50395
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
for pass in $(seq "$PASSES"); do
  for side in A B; do
    "${!side}/router" --model "$MODEL" --grpc $GRPC --http $HTTP --threads 2 --max-num-seqs 64 > /dev/null 2>&1 &
    pid=$!
    deadline=$((SECONDS + 120))
    until curl -sf "http://$HTTP/ready" > /dev/null; do
      kill -0 $pid 2>/dev/null || { echo "router $side exited before it was ready" >&2; exit 1; }
      [ $SECONDS -lt $deadline ] || { echo "router $side not ready in 120 s" >&2; exit 1; }
      sleep 0.5
    done
    echo "== $side (${!side}), pass $pass"
    python3 tools/guided_bench.py $HTTP "$ROUNDS" | grep decode
    kill $pid; wait $pid 2>/dev/null || true
  done
done
