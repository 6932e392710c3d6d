#!/usr/bin/env bash
# Perplexity of one checkpoint under every precision option, with
# `expertmesh eval` (windows of CONTEXT from BOS, stride CONTEXT/2):
# offline at f32 and bf16 activations, int8/int4 routed experts and
# int8/int4 everywhere, DeepSeek's FP8 layout (tools/fp8_checkpoint.py,
# needs the torch venv), and through a 2-node cluster (`expertmesh up`)
# with f32, bf16 and fp8 dispatch on the wire.
# Usage: tools/ppl_bench.sh [MODEL] [TEXT] [CONTEXT]   (release build first)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-model/demo}
TEXT=${2:-$MODEL/heldout.txt}
CONTEXT=${3:-256}
BIN=target/release
PY=${PYTHON:-target/llama-venv/bin/python}
OUT=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$OUT"' EXIT
eval_() { # label, extra eval flags...
  local label=$1; shift
  local r
  r=$("$BIN/expertmesh" eval --model "$MODEL" --text "$TEXT" --context "$CONTEXT" --json "$@")
  printf '%-34s %s\n' "$label" "$(echo "$r" | python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.4f  (%d tokens)" % (d["perplexity"], d["tokens"]))')"
}
eval_ "f32 activations" --precision f32
eval_ "bf16 activations" --precision bf16
for q in int8 int4; do
  eval_ "$q routed experts" --precision f32 --quantize $q
  eval_ "$q routed+shared+dense" --precision f32 --quantize $q --quantize-targets routed,shared,dense
done
if "$PY" -c "import torch" 2>/dev/null; then
  "$PY" tools/fp8_checkpoint.py "$MODEL" "$OUT/fp8" > /dev/null 2>&1
  MODEL="$OUT/fp8" eval_ "FP8 e4m3 checkpoint (128x128)" --precision f32
fi
for d in f32 bf16 fp8; do
  EXPERTMESH_PRECISION=f32 EXPERTMESH_DISPATCH_DTYPE=$d "$BIN/expertmesh" up --model "$MODEL" --expert-nodes 2 --replicas 2 \
    --grpc-port 0 --http-port 0 --state-file "$OUT/up.json" > "$OUT/up-$d.log" 2>&1 &
  UP=$!
  for _ in $(seq 240); do [ -f "$OUT/up.json" ] && break; sleep 0.5; done
  HTTP=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["router"]["http"])' "$OUT/up.json")
  eval_ "cluster, $d dispatch" --url "http://$HTTP"
  kill -INT $UP; wait $UP || true; rm -f "$OUT/up.json"
done
