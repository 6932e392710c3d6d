#!/usr/bin/env bash
# The public API layer's cost, on one cluster (`up`: router + 2 expert nodes):
# the same load (the same 64-word text prompts, 32 tokens out) through the
# router's own gRPC GenerateService, the OpenAI HTTP API (SSE) and KServe gRPC
# streaming, interleaved, at concurrency 1, 8, 32 and 64.
# Usage: tools/api_bench.sh [MODEL_DIR] [REPS]
set -euo pipefail
B=${B:-target/release}; M=${1:-target/bench-model}; REPS=${2:-2}
st=$(mktemp -u)
$B/expertmesh up --model "$M" --expert-nodes 2 --replicas 1 --grpc-port 0 --http-port 0 --state-file "$st" >/dev/null 2>&1 & up=$!
trap 'kill -INT $up; wait $up || true' EXIT
for _ in $(seq 1 600); do [ -f "$st" ] && break; sleep 0.1; done; sleep 0.2
g=$(python3 -c "import json;print(json.load(open('$st'))['router']['grpc'])")
h=$(python3 -c "import json;print(json.load(open('$st'))['router']['http'])")
name=$(basename "$M")
for rep in $(seq 1 "$REPS"); do
  for c in 1 8 32 64; do
    n=$(( c < 4 ? 8 : c * 2 ))
    load="--concurrency $c --requests $n --prompt-tokens 64 --max-tokens 32 --text-prompts --json"
    echo "rep$rep c$c grpc   $($B/expertmesh bench --router "$g" $load)"
    echo "rep$rep c$c openai $($B/expertmesh bench --url "http://$h" --api openai $load)"
    echo "rep$rep c$c kserve $($B/expertmesh bench --url "$g" --api kserve --model-name "$name" $load)"
  done
done
