#!/usr/bin/env bash
# Sets up and runs ExpertMesh on a generated demo model (no downloads).
# Usage: scripts/demo.sh ["prompt"]
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v cc >/dev/null || need+=(build-essential)
command -v protoc >/dev/null || need+=(protobuf-compiler)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq "${need[@]}"; else sudo apt-get install -y "${need[@]}"; fi
fi
command -v cargo >/dev/null || { echo "error: Rust is missing: install rustup (https://rustup.rs), then re-run" >&2; exit 1; }
cargo build --release -p expertmesh
bin=target/release/expertmesh
[ -f demo-model/config.json ] || "$bin" gen-model --arch deepseek-v3 --out demo-model
"$bin" generate --model demo-model --chat --prompt "${1:-Hello! What can you do?}" --max-tokens 32 --temperature 0.7 --seed 1
