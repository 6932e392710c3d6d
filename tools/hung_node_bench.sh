#!/usr/bin/env bash
# A hung expert node under streaming load (docs/benchmarks.md, "A hung node").
#
# `expertmesh up` with 3 expert nodes, every expert on 2 of them, and
# `expertmesh bench` with 8 streaming clients for DURATION seconds (default
# 25). Each pass runs three clusters back to back: healthy; one node
# SIGSTOPped STOP_AT seconds in for STOP_FOR seconds (defaults 5 and 15),
# then SIGCONT; and the same stop with hedging off (--hedge-multiple 0: the
# behaviour before per-node deadlines, every stall lasting the dispatch
# timeout). PROMPT_TOKENS (default 64) sets the prompt length. Prints one
# JSON report per run.
# Usage: tools/hung_node_bench.sh [MODEL_DIR]   (after cargo build --release --workspace)
set -euo pipefail
B=${B:-target/release}; M=${1:-target/bench-model}
DURATION=${DURATION:-25}; STOP_AT=${STOP_AT:-5}; STOP_FOR=${STOP_FOR:-15}; PASSES=${PASSES:-2}
ARGS="--concurrency 8 --duration $DURATION --prompt-tokens ${PROMPT_TOKENS:-64} --max-tokens 32 --json"
[ -f "$M/config.json" ] || $B/expertmesh gen-model --preset bench --out "$M"

run() { # $1: label, $2: stop|healthy, $3: extra router environment
  local st; st=$(mktemp -u)
  env $3 $B/expertmesh up --model "$M" --expert-nodes 3 --replicas 2 --grpc-port 0 --http-port 0 --state-file "$st" >/dev/null 2>&1 &
  local up=$!
  for _ in $(seq 1 600); do [ -f "$st" ] && break; sleep 0.1; done
  local grpc pid
  grpc=$(python3 -c "import json;print(json.load(open('$st'))['router']['grpc'])")
  pid=$(python3 -c "import json;print([n['pid'] for n in json.load(open('$st'))['expert_nodes'] if n['id']=='en-1'][0])")
  local stopper=""
  if [ "$2" = stop ]; then (sleep "$STOP_AT"; kill -STOP "$pid"; sleep "$STOP_FOR"; kill -CONT "$pid") & stopper=$!; fi
  echo "$1 $($B/expertmesh bench --router "$grpc" $ARGS)"
  [ -z "$stopper" ] || wait "$stopper"
  kill -INT "$up"; wait "$up" || true
}

for _ in $(seq 1 "$PASSES"); do
  run healthy healthy ""
  run stopped-hedged stop ""
  run stopped-unhedged stop "EXPERTMESH_HEDGE_MULTIPLE=0"
done
