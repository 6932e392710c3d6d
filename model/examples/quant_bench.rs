//! One weight format's speed and memory, in a process of its own so that
//! its peak resident memory is its own; `tools/llama_bench.sh` runs it per
//! format beside llama.cpp's `llama-bench` on the same checkpoint.
//!
//! `quant_bench MODEL_DIR THREADS FORMAT` with FORMAT `f32` (f32
//! activations), `bf16` (bf16 activations), `int8` or `int4` (every
//! quantizable weight: routed, shared and dense). Prints one JSON line:
//! decode tok/s at batch 1 over 128 tokens (as `llama-bench -n 128`), prompt
//! tok/s at 64 and 512 tokens (`-p 64`, `-p 512`; best of 3), and the peak
//! resident set (`VmHWM`).
//!
//! `quant_bench - THREADS read` measures the machine instead: the rate at
//! which THREADS threads stream-read 1 GiB (best of 5), the ceiling for
//! batch-1 decode, which reads every touched weight once per token.

use expertmesh_model::kernels::quant::QuantFormat;
use expertmesh_model::model::{Logits, Model, SeqChunk};
use expertmesh_model::options::{QuantTarget, WeightArgs};
use expertmesh_model::tensor::Precision;
use std::time::Instant;

fn tokens(seed: u32, n: usize, vocab: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed * 97)) % (vocab as u32 - 2) + 2).collect()
}

fn decode(m: &Model, n: usize) -> f64 {
    let mut c = m.new_cache();
    m.forward(&mut [SeqChunk { tokens: &[1], cache: &mut c }], Logits::Last).expect("first token");
    let toks = tokens(3, n, m.config().vocab_size);
    let t0 = Instant::now();
    for t in &toks {
        m.forward(&mut [SeqChunk { tokens: std::slice::from_ref(t), cache: &mut c }], Logits::Last).expect("decode");
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

fn prompt(m: &Model, n: usize) -> f64 {
    let p = tokens(7, n, m.config().vocab_size);
    let mut best = f64::MAX;
    for _ in 0..3 {
        let mut c = m.new_cache();
        let t0 = Instant::now();
        m.forward(&mut [SeqChunk { tokens: &p, cache: &mut c }], Logits::Last).expect("prompt");
        best = best.min(t0.elapsed().as_secs_f64());
    }
    n as f64 / best
}

/// GB/s at which the thread pool sums a buffer far larger than the caches.
fn read_gb_s() -> f64 {
    use rayon::prelude::*;
    let buf = vec![1.0f32; 1 << 28];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t0 = Instant::now();
        let s: f32 = buf
            .par_chunks(1 << 16)
            .map(|c| {
                // 16 independent sums, so the loop is bound by loads, not by
                // the latency of one chain of additions.
                let mut acc = [0f32; 16];
                for v in c.chunks_exact(16) {
                    for (a, x) in acc.iter_mut().zip(v) {
                        *a += x;
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        std::hint::black_box(s);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    (buf.len() * 4) as f64 / best / 1e9
}

/// This process's peak resident set, in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: quant_bench MODEL_DIR THREADS f32|bf16|int8|int4|read";
    let dir = std::path::PathBuf::from(args.next().expect(usage));
    let threads: usize = args.next().expect(usage).parse().expect("THREADS");
    let format = args.next().expect(usage);
    // The allocator settings of the shipped binaries, so that speed and
    // peak memory are theirs.
    expertmesh_plumbing::process::tune_allocator().expect("allocator");
    let all = [QuantTarget::Routed, QuantTarget::Shared, QuantTarget::Dense];
    let opts = match format.as_str() {
        "f32" => WeightArgs::from(Precision::F32),
        "bf16" => WeightArgs::from(Precision::Bf16),
        "int8" => WeightArgs::quantized(QuantFormat::Int8, &all),
        "int4" => WeightArgs::quantized(QuantFormat::Int4, &all),
        "read" => WeightArgs::default(),
        _ => panic!("{usage}"),
    };
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().expect("thread pool");
    if format == "read" {
        println!("{}", serde_json::json!({ "threads": threads, "read_gb_s": read_gb_s() }));
        return;
    }
    let t0 = Instant::now();
    let m = Model::load(&dir, opts, &mut |_, _| {}).expect("load");
    let load_s = t0.elapsed().as_secs_f64();
    let out = serde_json::json!({
        "engine": "expertmesh",
        "format": format,
        "threads": threads,
        "load_s": load_s,
        "decode_tok_s": decode(&m, 128),
        "prompt_64_tok_s": prompt(&m, 64),
        "prompt_512_tok_s": prompt(&m, 512),
        "peak_rss_bytes": peak_rss(),
    });
    println!("{out}");
}
