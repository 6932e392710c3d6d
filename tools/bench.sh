#!/usr/bin/env bash
# Engine benchmark, side by side in one run: ExpertMesh (both precision
# modes) against transformers (bf16 and float32) and torch, same checkpoint,
# same thread count. Prints a markdown table of values and ratios.
#
#   tools/bench.sh [THREADS] [PYTHON]
# PYTHON must have torch + transformers (dev-only venv).
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
py=${2:-python3}
model=${BENCH_MODEL:-target/bench-model}
cargo build --release -q -p expertmesh -p expertmesh-model --example bench
[ -f "$model/config.json" ] || target/release/expertmesh gen-model --preset bench --out "$model"
out=$(mktemp -d)
target/release/examples/bench "$model" "$threads" > "$out/em.json"
"$py" tools/bench_reference.py "$model" "$threads" bfloat16 2>/dev/null > "$out/tf_bf16.json"
"$py" tools/bench_reference.py "$model" "$threads" float32 2>/dev/null > "$out/tf_f32.json"
python3 - "$out" <<'PY'
import json, sys, os
d = sys.argv[1]
em = json.load(open(os.path.join(d, "em.json")))
bf = json.load(open(os.path.join(d, "tf_bf16.json")))
f3 = json.load(open(os.path.join(d, "tf_f32.json")))
rows = [
    ("decode tok/s, batch 1", "decode_b1_tok_s", "decode_b1_tok_s"),
    ("decode tok/s, batch 16", "decode_b16_tok_s", "decode_b16_tok_s"),
    ("prefill tok/s, 512-token prompt", "prefill_512_tok_s", "prefill_512_tok_s"),
    ("expert FFN GFLOP/s, 1 token", "expert_ffn_gflops_t1", "expert_ffn_gflops_t1"),
    ("expert FFN GFLOP/s, 64 tokens", "expert_ffn_gflops_t64", "expert_ffn_gflops_t64"),
    ("expert FFN GFLOP/s, 256 tokens", "expert_ffn_gflops_t256", "expert_ffn_gflops_t256"),
]
print(f"threads {em['threads']}; reference {bf['engine']} / {f3['engine']}\n")
print("| metric | ExpertMesh f32-act | transformers/torch f32 | ratio | ExpertMesh bf16-act | transformers/torch bf16 | ratio |")
print("|---|---|---|---|---|---|---|")
for name, k, rk in rows:
    e32 = em[k]; e16 = em.get("bf16act_" + k)
    r32 = f3[rk] if not k.startswith("expert") else f3.get("expert_ffn_f32_gflops_t256" if k.endswith("t256") else rk)
    r16 = bf[rk]
    def fmt(v): return "–" if v is None else f"{v:.1f}"
    def ratio(a, b): return "–" if a is None or b is None else f"{a / b:.2f}×"
    # torch's f32 expert FFN is measured at 256 tokens only.
    if k.startswith("expert") and not k.endswith("t256"):
        r32 = None
    print(f"| {name} | {fmt(e32)} | {fmt(r32)} | {ratio(e32, r32)} | {fmt(e16)} | {fmt(r16)} | {ratio(e16, r16)} |")
print(f"\nbatch-1 matvec weight stream: {em['matvec_bf16_gb_s']:.1f} GB/s")
PY
rm -rf "$out"
