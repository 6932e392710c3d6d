//! `expertmesh-gpu-check`: the device half of `tools/gpu_check.sh`, for a
//! machine with an NVIDIA GPU and no Rust. Each subcommand prints JSON lines.
//!
//! - `accuracy`: GPU against CPU (f32) expert outputs, on checkpoints and on
//!   a DeepSeek-V3-shaped layer of random weights.
//! - `speed`: one expert's GEMMs at 1…4096 tokens per batch: device seconds
//!   (CUDA events), host overhead, GFLOP/s.
//! - `nccl`: a world-size-1 exchange through the NCCL transport's code path,
//!   then its abort-on-deadline path.
//! - `placement`: a static placement putting every expert on one node.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use expertmesh_gpu::CudaExperts;
use expertmesh_gpu::nccl::comm::{Communicator, NcclLink, new_id};
use expertmesh_gpu::nccl::schedule::{Op, Schedule};
use expertmesh_model::config::ModelConfig;
use expertmesh_model::model::load_experts_into;
use expertmesh_model::moe::{ExpertBank, ExpertGroup, LocalExperts, Mlp, Routing, group_by_expert};
use expertmesh_model::tensor::{Matrix, Precision, f32_to_bf16};
use expertmesh_model::weights::WeightStore;
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "expertmesh-gpu-check", about = "ExpertMesh GPU checks (see tools/gpu_check.sh)")]
struct Cli {
    /// CUDA device ordinal.
    #[arg(long, env = "EXPERTMESH_GPU_CHECK_DEVICE", default_value_t = 0)]
    device: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Accuracy {
        /// Checkpoint directories to compare on.
        #[arg(long)]
        model: Vec<PathBuf>,
        /// Experts of the DeepSeek-V3-shaped layer (0 skips it).
        #[arg(long, default_value_t = 256)]
        experts: usize,
        #[arg(long, default_value_t = 64)]
        tokens: usize,
    },
    Speed {
        #[arg(long, value_delimiter = ',', default_value = "1,4,16,64,256,1024,2048,4096")]
        tokens: Vec<usize>,
        #[arg(long, default_value_t = 7168)]
        hidden: usize,
        #[arg(long, default_value_t = 2048)]
        inter: usize,
        #[arg(long, default_value_t = 20)]
        iters: usize,
    },
    Nccl {
        /// Seconds the hung exchange may take before it is aborted.
        #[arg(long, default_value_t = 2.0)]
        deadline: f64,
    },
    Placement {
        #[arg(long)]
        model: PathBuf,
        /// `host:port` of the one node.
        #[arg(long)]
        addr: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Accuracy { model, experts, tokens } => {
            for dir in model {
                accuracy_checkpoint(cli.device, &dir)?;
            }
            if experts > 0 {
                accuracy_v3_layer(cli.device, experts, tokens)?;
            }
            Ok(())
        }
        Cmd::Speed { tokens, hidden, inter, iters } => speed(cli.device, &tokens, hidden, inter, iters),
        Cmd::Nccl { deadline } => nccl(cli.device, Duration::from_secs_f64(deadline)),
        Cmd::Placement { model, addr } => {
            let cfg = ModelConfig::from_dir(&model)?;
            let p = expertmesh_spec::placement::Placement::round_robin(&cfg, &[("en-gpu".into(), addr)], 1)?;
            println!("{}", String::from_utf8_lossy(&p.to_json()));
            Ok(())
        }
    }
}

/// A cheap deterministic generator (xorshift64*), uniform in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

/// Random top-k routing of `tokens` over `experts`, weights summing to 1.
fn routing(rng: &mut Rng, tokens: usize, experts: usize, k: usize) -> Routing {
    let (mut ids, mut weights) = (Vec::new(), Vec::new());
    for _ in 0..tokens {
        let mut chosen: Vec<u32> = Vec::new();
        while chosen.len() < k.min(experts) {
            let e = ((rng.next() + 1.0) * 0.5 * experts as f32) as u32 % experts as u32;
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        let w: Vec<f32> = chosen.iter().map(|_| rng.next().abs() + 0.1).collect();
        let s: f32 = w.iter().sum();
        ids.extend(chosen);
        weights.extend(w.iter().map(|x| x / s));
    }
    Routing { top_k: k, ids, weights }
}

/// Max and mean |gpu − cpu|, and the max relative to the largest |cpu|.
fn compare(gpu: &[f32], cpu: &[f32]) -> serde_json::Value {
    let max = gpu.iter().zip(cpu).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let mean = gpu.iter().zip(cpu).map(|(a, b)| f64::from((a - b).abs())).sum::<f64>() / cpu.len().max(1) as f64;
    let scale = cpu.iter().map(|v| v.abs()).fold(0f32, f32::max);
    let rel = max / scale.max(f32::MIN_POSITIVE);
    json!({"max_abs_err": max, "mean_abs_err": mean, "max_abs_ref": scale, "max_rel_err": rel,
           "tolerance_rel": TOLERANCE, "pass": rel <= TOLERANCE && gpu.iter().all(|v| v.is_finite())})
}

/// Stated tolerance: the largest error relative to the largest reference
/// output. bf16 keeps 8 significant bits (unit roundoff 2⁻⁹ ≈ 2e-3); rows,
/// weights and the SwiGLU activations are each rounded once, accumulation is
/// f32, so errors of a few roundoffs of the output's scale are expected.
const TOLERANCE: f32 = 3e-2;

fn accuracy_checkpoint(device: usize, dir: &std::path::Path) -> Result<()> {
    let cfg = ModelConfig::from_dir(dir)?;
    let store = WeightStore::for_model(dir, &cfg, Precision::F32)?;
    let (h, i) = (cfg.hidden_size, cfg.moe.moe_intermediate_size);
    let mut cpu = LocalExperts::new(Vec::new());
    load_experts_into(&cfg, &store, |_, _| true, &mut |_, _| {}, &mut cpu)?;
    let mut gpu = CudaExperts::open(device, h, i)?;
    load_experts_into(&cfg, &store, |_, _| true, &mut |_, _| {}, &mut gpu)?;
    let mut rng = Rng(0x5eed);
    for layer in cfg.moe_layers() {
        let tokens = 37;
        let hidden = rng.vec(tokens * h, 1.0);
        let r = routing(&mut rng, tokens, cfg.moe.n_routed_experts, cfg.moe.experts_per_tok);
        let groups = group_by_expert(&r);
        let (want, _) = cpu.compute_timed(layer, &hidden, h, &groups)?;
        let (got, _) = gpu.compute_timed(layer, &hidden, h, &groups)?;
        let mut line = compare(&got, &want);
        line["check"] = json!("accuracy");
        line["model"] = json!(dir.display().to_string());
        line["layer"] = json!(layer);
        println!("{line}");
    }
    Ok(())
}

/// hidden 7168, expert width 2048, `experts` experts, 8 per token.
fn accuracy_v3_layer(device: usize, experts: usize, tokens: usize) -> Result<()> {
    let (h, i, k) = (7168, 2048, 8);
    let mut gpu = CudaExperts::open(device, h, i)?;
    let mut cpu = LocalExperts::new(Vec::new());
    let t0 = Instant::now();
    // Weights at nn.Linear's init scale (1/√fan_in), already bf16 so that
    // both sides see the same weights.
    let mk = |seed: u64, rows: usize, cols: usize| {
        let mut r = Rng(seed);
        let s = 1.0 / (cols as f32).sqrt();
        Matrix::from_bf16(rows, cols, (0..rows * cols).map(|_| f32_to_bf16(r.next() * s)).collect())
    };
    // Generated on every core (11 G weights for 256 experts), then uploaded.
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    let mlps: Vec<Mlp> = std::thread::scope(|s| {
        let chunks: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (t..experts)
                        .step_by(threads)
                        .map(|e| {
                            let seed = 1 + 3 * e as u64;
                            (e, Mlp::new(mk(seed, i, h), mk(seed + 1, i, h), mk(seed + 2, h, i), None))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<(usize, Mlp)> = chunks.into_iter().flat_map(|c| c.join().unwrap_or_default()).collect();
        all.sort_by_key(|(e, _)| *e);
        all.into_iter().map(|(_, m)| m).collect()
    });
    if mlps.len() != experts {
        bail!("generating the layer's weights failed");
    }
    for (e, m) in mlps.into_iter().enumerate() {
        let copy = Mlp { gate_up: m.gate_up.clone(), down: m.down.clone(), bias: None };
        gpu.insert(0, e, copy)?;
        cpu.insert(0, e, m);
    }
    let load_s = t0.elapsed().as_secs_f64();
    let mut rng = Rng(7);
    let hidden = rng.vec(tokens * h, 1.0);
    let r = routing(&mut rng, tokens, experts, k);
    let groups: Vec<ExpertGroup> = group_by_expert(&r);
    let (want, _) = cpu.compute_timed(0, &hidden, h, &groups)?;
    let (got, _) = gpu.compute_timed(0, &hidden, h, &groups)?;
    let mut line = compare(&got, &want);
    line["check"] = json!("accuracy");
    line["model"] =
        json!(format!("deepseek-v3 layer: hidden {h}, width {i}, {experts} experts, top-{k}, {tokens} tokens"));
    line["load_s"] = json!(load_s);
    line["gemm"] = json!(gpu.gemm_path());
    line["device_bytes"] = json!(gpu.size_bytes());
    println!("{line}");
    Ok(())
}

fn speed(device: usize, tokens: &[usize], h: usize, i: usize, iters: usize) -> Result<()> {
    let mut gpu = CudaExperts::open(device, h, i)?;
    let mut rng = Rng(11);
    let bf = |r: &mut Rng, rows: usize, cols: usize| {
        let s = 1.0 / (cols as f32).sqrt();
        Matrix::from_bf16(rows, cols, (0..rows * cols).map(|_| f32_to_bf16(r.next() * s)).collect())
    };
    let mlp = Mlp::new(bf(&mut rng, i, h), bf(&mut rng, i, h), bf(&mut rng, h, i), None);
    gpu.insert(0, 0, mlp)?;
    for &t in tokens {
        let hidden = rng.vec(t * h, 1.0);
        let groups = [ExpertGroup { expert: 0, rows: (0..t).collect(), weights: vec![1.0; t] }];
        for _ in 0..3 {
            gpu.compute_timed(0, &hidden, h, &groups)?;
        }
        let (mut device_s, t0) = (0.0, Instant::now());
        for _ in 0..iters {
            device_s += gpu.compute_timed(0, &hidden, h, &groups)?.1[0];
        }
        let wall = t0.elapsed().as_secs_f64() / iters as f64;
        let dev = device_s / iters as f64;
        let flops = 2.0 * t as f64 * 3.0 * h as f64 * i as f64;
        println!(
            "{}",
            json!({"check": "speed", "tokens": t, "hidden": h, "inter": i, "gemm": "cublasGemmEx (one expert)", "device_s": dev, "wall_s": wall,
                   "host_overhead_s": (wall - dev).max(0.0), "gflops": flops / dev / 1e9})
        );
    }
    Ok(())
}

fn nccl(device: usize, deadline: Duration) -> Result<()> {
    let dev = expertmesh_gpu::Device::open(device)?;
    let id = new_id()?;
    let comm = Communicator::init(dev.stream.clone(), 0, 1, &id, Duration::from_secs(30))?;
    let mut link = NcclLink::new(comm);
    let width = 7168;
    let rows: Vec<f32> = Rng(3).vec(5 * width, 1.0);
    let t0 = Instant::now();
    let back = link.exchange(std::slice::from_ref(&rows), &[5], width, Duration::from_secs(10))?;
    let ok = back.len() == 1 && back[0] == rows;
    println!(
        "{}",
        json!({"check": "nccl_send_recv", "world": 1, "rows": 5, "width": width, "exact": ok, "seconds": t0.elapsed().as_secs_f64()})
    );
    if !ok {
        bail!("the world-size-1 exchange did not return the rows sent");
    }
    // A receive nobody sends: it can only end by the deadline's abort.
    let hung = Schedule { ops: vec![Op::Recv { peer: 0, offset: 0, len: width }], send_len: 0, recv_len: width };
    let buf = dev.stream.alloc_zeros::<f32>(width).context("device buffer")?;
    let p = {
        use cudarc::driver::DevicePtr;
        buf.device_ptr(&dev.stream).0
    };
    let t0 = Instant::now();
    let r = link.comm.exchange(&hung, p, p, deadline);
    let took = t0.elapsed().as_secs_f64();
    let bounded = took <= deadline.as_secs_f64() + 1.0;
    println!(
        "{}",
        json!({"check": "nccl_abort_on_deadline", "deadline_s": deadline.as_secs_f64(), "seconds": took,
               "error": r.as_ref().err().map(|e| e.to_string()), "aborted": link.comm.is_aborted(), "bounded": bounded})
    );
    if r.is_ok() || !bounded {
        bail!("the hung exchange was not ended within its deadline");
    }
    Ok(())
}
