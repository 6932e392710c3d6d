#!/usr/bin/env bash
# Sets up and starts a local ExpertMesh cluster on the trained demo model
# (model/demo, committed; no downloads): a router plus 2 expert nodes, each
# expert on both nodes.
# Stop it with Ctrl-C. Extra arguments go to `expertmesh up`.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v cc >/dev/null || need+=(build-essential)
command -v protoc >/dev/null || need+=(protobuf-compiler)
command -v etcd >/dev/null || need+=(etcd-server)
# Not needed by the cluster, but by `cargo test --workspace` (the README's
# second command): a real Prometheus, and a venv for the real API clients.
command -v prometheus >/dev/null || need+=(prometheus)
python3 -c "import ensurepip" 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq "${need[@]}"; else sudo apt-get install -y "${need[@]}"; fi
fi
command -v cargo >/dev/null || { echo "error: Rust is missing: install rustup (https://rustup.rs), then re-run" >&2; exit 1; }
cargo build --release --workspace
exec "${CARGO_TARGET_DIR:-target}/release/expertmesh" up --demo --expert-nodes 2 --replicas 2 "$@"
