//! Data-plane transport benchmark (`docs/benchmarks.md`).
//!
//! `cargo run --release -p expertmesh-expert-node --example transport_bench -- MODEL_DIR FIXTURES_DIR`
//!
//! 1. Round trip of one dispatch batch through a real expert node (in this
//!    process, over loopback gRPC and over the framed-TCP transport) against
//!    a raw-TCP echo of the same bytes, for 1, 4 and 16 MiB of f32 rows. The batches name no expert, so the
//!    node decodes the rows and encodes an all-zero combined result without
//!    computing: what is timed is transport plus codec.
//! 2. Bytes per row and the accuracy cost of bf16 / fp8 dispatch: every
//!    fixture's greedy continuation is recomputed with rows and results
//!    passed through the wire codec, and compared with f32 dispatch.

// Linked for its process allocator, as in the service binaries.
use expertmesh_cluster as _;
use expertmesh_dataplane::codec;
use expertmesh_dataplane::grpc_transport::GrpcTransport;
use expertmesh_dataplane::tcp_transport::TcpTransport;
use expertmesh_dataplane::transport::{InProcess, NodeBatch, Replies, Transport, reply};
use expertmesh_model::config::ModelConfig;
use expertmesh_model::generate::{SamplingParams, generate};
use expertmesh_model::model::{Model, load_experts};
use expertmesh_model::tensor::Precision;
use expertmesh_model::weights::WeightStore;
use expertmesh_proto::v1::Dtype;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn raw_tcp_round_trip(bytes: usize, reps: usize) -> f64 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_nodelay(true).ok();
        let mut buf = vec![0u8; bytes];
        for _ in 0..reps + 1 {
            s.read_exact(&mut buf).expect("read");
            s.write_all(&buf).expect("write");
        }
    });
    let mut c = std::net::TcpStream::connect(addr).expect("connect");
    c.set_nodelay(true).ok();
    let out = vec![7u8; bytes];
    let mut back = vec![0u8; bytes];
    c.write_all(&out).expect("w");
    c.read_exact(&mut back).expect("r");
    let t0 = Instant::now();
    for _ in 0..reps {
        c.write_all(&out).expect("w");
        c.read_exact(&mut back).expect("r");
    }
    let dt = t0.elapsed().as_secs_f64() / reps as f64;
    server.join().expect("server");
    dt
}

/// Rows and results through the wire codec, experts computed in process.
struct CodecTransport {
    inner: InProcess,
    dtype: Dtype,
}

impl Transport for CodecTransport {
    fn send(&self, step: u64, layer: usize, h: usize, batches: &[NodeBatch], first: usize, to: &Replies) {
        for (i, r) in self.round_trip(step, layer, h, batches).into_iter().enumerate() {
            reply(to, first + i, r);
        }
    }
}

impl CodecTransport {
    fn round_trip(
        &self,
        step: u64,
        layer: usize,
        h: usize,
        batches: &[NodeBatch],
    ) -> Vec<expertmesh_dataplane::Result<Vec<f32>>> {
        let wire: Vec<NodeBatch> = batches
            .iter()
            .map(|b| NodeBatch {
                rows: Arc::new(codec::decode(&codec::encode(Arc::clone(&b.rows), h, self.dtype), h).expect("codec")),
                ..b.clone()
            })
            .collect();
        self.inner
            .exchange(step, layer, h, &wire)
            .into_iter()
            .map(|r| r.and_then(|c| codec::decode(&codec::encode(c, h, codec::combine_dtype(self.dtype)), h)))
            .collect()
    }
}

fn main() {
    // The shipped binaries' allocator settings (their batch buffers are reused).
    expertmesh_plumbing::process::tune_allocator().expect("allocator");
    let mut args = std::env::args().skip(1);
    let model = std::path::PathBuf::from(args.next().expect("usage: transport_bench MODEL_DIR FIXTURES_DIR"));
    let fixtures = std::path::PathBuf::from(args.next().expect("FIXTURES_DIR"));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let cfg = ModelConfig::from_dir(&model).expect("config");
    let layer = cfg.moe_layers().next().expect("moe layer");
    let h = cfg.hidden_size;
    let node_cfg = <expertmesh_expert_node::Config as clap::Parser>::parse_from([
        "expert-node",
        "--model",
        model.to_str().expect("utf-8 path"),
        "--listen",
        "127.0.0.1:0",
        "--experts",
        &format!("{layer}:0"),
    ]);
    let stop = tokio_util::sync::CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let server = rt.spawn(expertmesh_expert_node::run(node_cfg, stop.clone(), Some(tx)));
    let addr = rt.block_on(rx).expect("node started").grpc;
    println!(
        "| batch | dtype | transport | round trip (min / median of 5) | raw TCP echo (min / median) | ÷ raw bytes/s, min vs min (f32) |"
    );
    println!("|---|---|---|---|---|---|");
    let sizes: Vec<usize> = std::env::var("SIZES_KIB")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or(vec![1024, 4096, 16384]);
    let book = || -> std::collections::BTreeMap<String, String> { [("n".to_string(), addr.to_string())].into() };
    let dtypes = [Dtype::F32, Dtype::Bf16, Dtype::Fp8E4m3];
    let stats = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[0], v[v.len() / 2])
    };
    for kib in sizes {
        let mib = kib as f64 / 1024.0;
        let rows = (kib * 1024 / (4 * h)).max(1);
        let batch = [NodeBatch {
            node: "n".into(),
            rows: Arc::new((0..rows * h).map(|i| (i % 97) as f32 / 97.0).collect()),
            groups: vec![],
        }];
        // Five interleaved rounds (raw echo, then every transport and dtype)
        // of 20 round trips each: this VM's noise hits all alike.
        let transports: Vec<(&str, Dtype, Box<dyn Transport>)> = dtypes
            .iter()
            .flat_map(|&d| {
                let grpc = GrpcTransport::new(rt.handle().clone(), book(), Duration::from_secs(30), d);
                let tcp = TcpTransport::new(book(), Duration::from_secs(30), d);
                [("gRPC", d, Box::new(grpc) as Box<dyn Transport>), ("TCP", d, Box::new(tcp) as Box<dyn Transport>)]
            })
            .collect();
        let mut raw = Vec::new();
        let mut times = vec![Vec::new(); transports.len()];
        for _round in 0..5 {
            raw.push(raw_tcp_round_trip(rows * h * 4, 20));
            for ((_, _, t), out) in transports.iter().zip(&mut times) {
                t.exchange(0, layer, h, &batch)[0].as_ref().expect("warm-up");
                let t0 = Instant::now();
                for s in 0..20 {
                    t.exchange(s, layer, h, &batch)[0].as_ref().expect("exchange");
                }
                out.push(t0.elapsed().as_secs_f64() / 20.0);
            }
        }
        let (raw_min, raw_med) = stats(&mut raw);
        for ((name, dtype, _), mut v) in transports.iter().zip(times) {
            let (min, med) = stats(&mut v);
            let ratio = if *dtype == Dtype::F32 { format!("{:.2}×", raw_min / min) } else { "–".into() };
            println!(
                "| {mib} MiB f32 ({rows} rows × {h}) | {dtype:?} | {name} | {:.2} / {:.2} ms | {:.2} / {:.2} ms | {ratio} |",
                min * 1e3,
                med * 1e3,
                raw_min * 1e3,
                raw_med * 1e3
            );
        }
    }
    stop.cancel();
    let _ = rt.block_on(server);

    println!("\n| fixture | dispatch dtype | dispatch bytes/row | greedy tokens equal | max |Δlogprob| vs f32 |");
    println!("|---|---|---|---|---|");
    let mut cases: Vec<_> = std::fs::read_dir(&fixtures).expect("fixtures").flatten().map(|e| e.path()).collect();
    cases.sort();
    for dir in cases {
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).expect("reference"))
                .expect("json");
        // A fixture of a model committed elsewhere names it in `checkpoint`.
        let model = match std::fs::read_to_string(dir.join("checkpoint")) {
            Ok(rel) => dir.join(rel.trim()),
            Err(_) => dir.clone(),
        };
        let prompt: Vec<u32> =
            r["prompt_ids"].as_array().expect("ids").iter().map(|v| v.as_u64().expect("id") as u32).collect();
        let run = |dtype: Dtype| {
            let cfg = ModelConfig::from_dir(&model).expect("config");
            let ws = WeightStore::for_model(&model, &cfg, Precision::F32).expect("weights");
            let inner = InProcess::default();
            inner.add("n", Arc::new(load_experts(&cfg, &ws, |_, _| true, &mut |_, _| {}).expect("experts")));
            let p = expertmesh_dataplane::placement::Placement::round_robin(&cfg, &[("n".into(), String::new())], 1)
                .expect("placement");
            let ex = expertmesh_dataplane::executor::RemoteExecutor::new(
                Arc::new(p),
                Arc::new(CodecTransport { inner, dtype }),
            );
            let m = Model::load_dense(cfg, &ws, Arc::new(ex), &mut |_, _| {}).expect("model");
            generate(&m, &prompt, 8, SamplingParams::default(), true, |_, _| {}).expect("generate")
        };
        let base = run(Dtype::F32);
        for dtype in [Dtype::Bf16, Dtype::Fp8E4m3] {
            let g = run(dtype);
            let d = g.logprobs.iter().zip(&base.logprobs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let hidden = ModelConfig::from_dir(&model).expect("config").hidden_size;
            let bytes = codec::wire_bytes(&codec::encode(vec![0.5; hidden], hidden, dtype));
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            println!(
                "| {name} | {dtype:?} | {bytes} (f32: {}) | {} | {d:.1e} |",
                hidden * 4,
                g.token_ids == base.token_ids
            );
        }
    }
}
