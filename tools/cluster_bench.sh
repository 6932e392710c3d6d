#!/usr/bin/env bash
# Interleaved, one run: in-process engine (`bench --model`) vs loopback cluster
# (`up`: router + 2 expert nodes), for each dispatch transport (gRPC, framed
# TCP), 1 and 2 replicas, with and without two-micro-batch overlap.
# Usage: tools/cluster_bench.sh [MODEL_DIR]; TRANSPORTS, REPLICAS and
# MICRO_BATCHES narrow the grid (defaults: "grpc tcp", "1 2", "1 2").
set -euo pipefail
B=${B:-target/release}; M=${1:-target/bench-model}; ARGS="--concurrency 32 --requests 64 --prompt-tokens 64 --max-tokens 32 --json"
for rep in 1 2; do
  echo "single $($B/expertmesh bench --model $M $ARGS)"
  for tr in ${TRANSPORTS:-grpc tcp}; do
    for mb in ${MICRO_BATCHES:-1 2}; do
      for rp in ${REPLICAS:-1 2}; do
        st=$(mktemp -u)
        EXPERTMESH_TRANSPORT=$tr EXPERTMESH_MICRO_BATCHES=$mb $B/expertmesh up --model $M --expert-nodes 2 --replicas $rp --grpc-port 0 --http-port 0 --state-file $st >/dev/null 2>&1 & up=$!
        for i in $(seq 1 300); do [ -f $st ] && break; sleep 0.1; done; sleep 0.2
        g=$(python3 -c "import json;print(json.load(open('$st'))['router']['grpc'])")
        echo "cluster-$tr-replicas$rp-microbatches$mb $($B/expertmesh bench --router $g $ARGS)"
        kill -INT $up; wait $up || true
      done
    done
  done
done
