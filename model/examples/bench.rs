//! Engine speed benchmark; `tools/bench.sh` runs it beside the transformers
//! reference (`tools/bench_reference.py`) on the same checkpoint and threads.
//!
//! `cargo run --release -p expertmesh-model --example bench -- MODEL_DIR [THREADS]`
//! prints one JSON line: decode tok/s at batch 1 and 16, prefill tok/s for a
//! 512-token prompt, and expert FFN GFLOP/s on the checkpoint's expert shape,
//! in the exact f32-activation mode and (`bf16act_*`) the bf16-activation mode.

use expertmesh_model::model::{Logits, Model, SeqChunk};
use expertmesh_model::moe::Mlp;
use expertmesh_model::tensor::{Matrix, Precision, f32_to_bf16};
use expertmesh_model::weights::WeightStore;
use std::time::Instant;

const DECODE_STEPS: usize = 32;
const PROMPT: usize = 16;

fn prompt(seed: u32, n: usize, vocab: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed * 97)) % (vocab as u32 - 2) + 2).collect()
}

/// Decode tokens/s for `batch` sequences decoded together (prefill excluded).
fn decode(m: &Model, batch: usize) -> f64 {
    let v = m.config().vocab_size;
    let mut caches: Vec<_> = (0..batch).map(|_| m.new_cache()).collect();
    let prompts: Vec<Vec<u32>> = (0..batch).map(|b| prompt(b as u32, PROMPT, v)).collect();
    let mut chunks: Vec<SeqChunk<'_>> =
        caches.iter_mut().zip(&prompts).map(|(c, p)| SeqChunk { tokens: p, cache: c }).collect();
    m.forward(&mut chunks, Logits::Last).expect("prefill");
    let toks: Vec<[u32; 1]> = (0..batch).map(|b| [(b as u32 % 50) + 2]).collect();
    let t0 = Instant::now();
    for _ in 0..DECODE_STEPS {
        let mut chunks: Vec<SeqChunk<'_>> =
            caches.iter_mut().zip(&toks).map(|(c, t)| SeqChunk { tokens: t, cache: c }).collect();
        m.forward(&mut chunks, Logits::Last).expect("decode");
    }
    (batch * DECODE_STEPS) as f64 / t0.elapsed().as_secs_f64()
}

fn prefill(m: &Model, n: usize) -> f64 {
    let p = prompt(7, n, m.config().vocab_size);
    let mut best = f64::MAX;
    for _ in 0..2 {
        let mut c = m.new_cache();
        let t0 = Instant::now();
        m.forward(&mut [SeqChunk { tokens: &p, cache: &mut c }], Logits::Last).expect("prefill");
        best = best.min(t0.elapsed().as_secs_f64());
    }
    n as f64 / best
}

/// GFLOP/s of one expert (gate+up, SwiGLU, down) over `tokens` rows.
fn expert_ffn(dir: &std::path::Path, tokens: usize, p: Precision) -> f64 {
    let cfg = expertmesh_model::config::ModelConfig::from_dir(dir).expect("config");
    let ws = WeightStore::for_model(dir, &cfg, p).expect("weights");
    let layer = cfg.moe_layers().next().expect("a MoE layer");
    let [g, u, d] = expertmesh_model::model::expert_tensor_names(&cfg, layer, 0);
    let (h, i) = (cfg.hidden_size, cfg.moe.moe_intermediate_size);
    let mlp = Mlp::new(ws.matrix(&g, i, h).unwrap(), ws.matrix(&u, i, h).unwrap(), ws.matrix(&d, h, i).unwrap(), None);
    let x: Vec<f32> = (0..tokens * h).map(|k| ((k * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    mlp.forward(&x, tokens);
    let reps = 20;
    let t0 = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(mlp.forward(&x, tokens));
    }
    let flops = (2 * tokens * h * 3 * i * reps) as f64;
    flops / t0.elapsed().as_secs_f64() / 1e9
}

/// Weight-streaming rate of the matrix-vector kernel (batch-1 decode's
/// bottleneck) on a bf16 matrix far larger than the caches.
fn matvec_gb_s() -> f64 {
    use expertmesh_model::kernels::matmul;
    let (n, k) = (32768, 2048);
    let w: Vec<f32> = (0..n * k).map(|i| ((i % 251) as f32 - 125.0) / 256.0).collect();
    let m = Matrix::from_bf16(n, k, w.iter().map(|&v| f32_to_bf16(v)).collect()).packed();
    let x: Vec<f32> = (0..k).map(|i| i as f32 / k as f32).collect();
    std::hint::black_box(matmul(&x, 1, m.view(), n, k));
    let reps = 10;
    let t0 = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(matmul(&x, 1, m.view(), n, k));
    }
    (reps * n * k * 2) as f64 / t0.elapsed().as_secs_f64() / 1e9
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("usage: bench MODEL_DIR [THREADS]"));
    let threads: usize = args.next().map(|t| t.parse().expect("THREADS")).unwrap_or(2);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().expect("thread pool");
    let t0 = Instant::now();
    let m = Model::load(&dir, Precision::F32, &mut |_, _| {}).expect("load");
    let load_s = t0.elapsed().as_secs_f64();
    let mb = Model::load(&dir, Precision::Bf16, &mut |_, _| {}).expect("load");
    let out = serde_json::json!({
        "engine": "expertmesh",
        "threads": threads,
        "load_s": load_s,
        "matvec_bf16_gb_s": matvec_gb_s(),
        "decode_b1_tok_s": decode(&m, 1),
        "decode_b16_tok_s": decode(&m, 16),
        "prefill_512_tok_s": prefill(&m, 512),
        "expert_ffn_gflops_t1": expert_ffn(&dir, 1, Precision::F32),
        "expert_ffn_gflops_t64": expert_ffn(&dir, 64, Precision::F32),
        "expert_ffn_gflops_t256": expert_ffn(&dir, 256, Precision::F32),
        "bf16act_decode_b1_tok_s": decode(&mb, 1),
        "bf16act_decode_b16_tok_s": decode(&mb, 16),
        "bf16act_prefill_512_tok_s": prefill(&mb, 512),
        "bf16act_expert_ffn_gflops_t1": expert_ffn(&dir, 1, Precision::Bf16),
        "bf16act_expert_ffn_gflops_t64": expert_ffn(&dir, 64, Precision::Bf16),
        "bf16act_expert_ffn_gflops_t256": expert_ffn(&dir, 256, Precision::Bf16),
    });
    println!("{out}");
}
