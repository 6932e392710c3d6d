#!/usr/bin/env bash
# ExpertMesh against llama.cpp, side by side in one run, on one checkpoint
# and the same threads: decode at batch 1 (128 tokens), prompt processing at
# 64 and 512 tokens, and peak resident memory, at bf16, 8-bit (Q8_0) and
# 4-bit (Q4_0, and Q4_K_M for reference). Prints a markdown table, then
# the bandwidth ceiling of batch-1 decode at bf16 and what each engine reaches.
#
#   tools/llama_bench.sh [MODEL_DIR] [THREADS]
#
# With AVX2_ONLY=1 both engines are held to AVX2+FMA on a CPU that has
# AVX-512: llama.cpp is built without its AVX-512 paths (a build of its
# own), and ExpertMesh runs with EXPERTMESH_NO_AVX512=1.
#
# A dev-time reference like transformers, never needed by the tests. It
# builds llama.cpp (once, into target/llama.cpp) from the sources in
# llama-cpp-python's PyPI sdist with Debian's cmake, and converts the
# checkpoint with llama.cpp's own convert_hf_to_gguf.py, in a venv of its
# own (torch, numpy, sentencepiece, transformers; target/llama-venv, or
# $LLAMA_PYTHON). The converter refuses a BPE pre-tokenizer it does not
# know, which the generated checkpoints' tokenizers are; speed does not
# depend on it, so the converter is told it is GPT-2's.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-target/bench-model}
threads=${2:-2}
version=0.3.36
root=target/llama.cpp
src=$root/llama_cpp_python-$version/vendor/llama.cpp
build=$src/build
ggml=(-DGGML_NATIVE=ON)
if [ "${AVX2_ONLY:-0}" = 1 ]; then
  build=$src/build-avx2
  ggml=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF)
  export EXPERTMESH_NO_AVX512=1
fi
bin=$build/bin
py=${LLAMA_PYTHON:-target/llama-venv/bin/python}
if [ ! -x "$py" ]; then
  python3 -m venv target/llama-venv >&2
  target/llama-venv/bin/pip install -q --disable-pip-version-check torch numpy sentencepiece safetensors transformers >&2
  py=target/llama-venv/bin/python
fi
if [ ! -x "$bin/llama-bench" ]; then
  mkdir -p "$root"
  [ -d "$src" ] || "$py" -m pip download -q --disable-pip-version-check --no-binary :all: --no-deps \
    "llama-cpp-python==$version" -d "$root" >&2
  [ -d "$src" ] || tar xzf "$root/llama_cpp_python-$version.tar.gz" -C "$root"
  cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release "${ggml[@]}" -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >&2
  cmake --build "$build" -j "$(nproc)" --target llama-bench llama-quantize >&2
fi
cargo build --release -q -p expertmesh-model --example quant_bench
[ -f "$model/config.json" ] || target/release/expertmesh gen-model --preset bench --out "$model"
gguf=$root/gguf/$(basename "$model")
mkdir -p "$gguf"
if [ ! -f "$gguf/bf16.gguf" ]; then
  "$py" - "$src" "$model" "$gguf/bf16.gguf" <<'PY' >&2
import runpy, sys
src, model, out = sys.argv[1:]
sys.path[:0] = [src, f"{src}/gguf-py"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", model, "--outtype", "bf16", "--outfile", out]
runpy.run_path(f"{src}/convert_hf_to_gguf.py", run_name="__main__")
PY
fi
for q in Q8_0 Q4_0 Q4_K_M; do
  [ -f "$gguf/$q.gguf" ] || "$bin/llama-quantize" "$gguf/bf16.gguf" "$gguf/$q.gguf" "$q" "$threads" >&2
done
out=$(mktemp -d)
# Peak resident memory of a child, in bytes (ru_maxrss is in KiB).
rss() { python3 -c 'import resource, subprocess, sys
r = subprocess.run(sys.argv[2:], stdout=open(sys.argv[1], "w"))
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
sys.exit(r.returncode)' "$@"; }
for f in bf16 int8 int4; do
  rss "$out/em_$f.json" target/release/examples/quant_bench "$model" "$threads" "$f" > "$out/em_$f.rss"
done
target/release/examples/quant_bench - "$threads" read > "$out/read.json"
# --repack 0: with the CPU's repacked weight buffers (the default) this
# version aborts on the deepseek2 graph before the first token
# (GGML_ASSERT(*cur_backend_id != -1) in ggml_backend_sched_split_graph).
for q in bf16 Q8_0 Q4_0 Q4_K_M; do
  rss "$out/ll_$q.json" "$bin/llama-bench" -m "$gguf/$q.gguf" -t "$threads" -p 64,512 -n 128 -r 3 --repack 0 -o json \
    > "$out/ll_$q.rss"
done
python3 - "$out" "$model" "$gguf" "$threads" <<'PY'
import json, os, sys
d, model, gguf, threads = sys.argv[1:]
def em(f):
    j = json.load(open(f"{d}/em_{f}.json"))
    return j["decode_tok_s"], j["prompt_64_tok_s"], j["prompt_512_tok_s"], int(open(f"{d}/em_{f}.rss").read())
def ll(q):
    runs = json.load(open(f"{d}/ll_{q}.json"))
    tg = next(r["avg_ts"] for r in runs if r["n_gen"] > 0)
    pp = {r["n_prompt"]: r["avg_ts"] for r in runs if r["n_prompt"] > 0}
    return tg, pp[64], pp[512], int(open(f"{d}/ll_{q}.rss").read())
gb = lambda b: f"{b / 1e9:.2f}"
print(f"checkpoint {model}, {threads} threads; llama.cpp GGUFs in {gguf}\n")
print("| width | engine | decode tok/s | prompt 64 tok/s | prompt 512 tok/s | peak RSS GB | decode ratio | prompt 64 ratio | prompt 512 ratio | RSS ratio |")
print("|---|---|---|---|---|---|---|---|---|---|")
for f, qs in [("bf16", ["bf16"]), ("int8", ["Q8_0"]), ("int4", ["Q4_0", "Q4_K_M"])]:
    e = em(f)
    print(f"| {f} | ExpertMesh | {e[0]:.1f} | {e[1]:.1f} | {e[2]:.1f} | {gb(e[3])} | | | | |")
    for q in qs:
        l = ll(q)
        r = [e[i] / l[i] for i in range(3)] + [e[3] / l[3]]
        print(f"| {f} | llama.cpp {q} | {l[0]:.1f} | {l[1]:.1f} | {l[2]:.1f} | {gb(l[3])} | "
              f"{r[0]:.2f}× | {r[1]:.2f}× | {r[2]:.2f}× | {r[3]:.2f}× |")
# Batch-1 decode reads every dense weight and k of n routed experts per
# token (one embedding row): against the machine's read rate, that bounds
# what any engine can reach at bf16.
import struct
cfg = json.load(open(f"{model}/config.json"))
n = cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg.get("num_local_experts")
k = cfg["num_experts_per_tok"]
with open(f"{model}/model.safetensors", "rb") as fh:
    hdr = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
hdr.pop("__metadata__", None)
size = lambda t: t["data_offsets"][1] - t["data_offsets"][0]
routed = sum(size(t) for name, t in hdr.items() if ".mlp.experts." in name)
embed = sum(size(t) for name, t in hdr.items() if "embed_tokens" in name)
per_token = sum(size(t) for t in hdr.values()) - routed - embed + routed * k / n
read = json.load(open(f"{d}/read.json"))["read_gb_s"]
e, l = em("bf16")[0], ll("bf16")[0]
print(f"\nbf16 decode reads {per_token / 1e6:.1f} MB per token; {threads} threads stream-read {read:.1f} GB/s, "
      f"a ceiling of {read * 1e9 / per_token:.0f} tok/s. ExpertMesh {e * per_token / 1e9:.1f} GB/s "
      f"({e * per_token / 1e9 / read:.0%} of it), llama.cpp {l * per_token / 1e9:.1f} GB/s ({l * per_token / 1e9 / read:.0%}).")
PY
rm -rf "$out"
