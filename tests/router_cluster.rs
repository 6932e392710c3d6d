//! A router process in front of expert-node processes, all on loopback:
//! the cluster generates exactly what transformers does, serves 32
//! concurrent requests with continuous batching, survives a node killed
//! mid-generation, answers UNAVAILABLE naming uncovered experts, and serves
//! /health, /ready and /metrics.

use expertmesh_model::generate::{SamplingParams as ModelSampling, generate as offline_generate};
use expertmesh_model::kernels::quant::QuantFormat;
use expertmesh_model::model::Model;
use expertmesh_model::options::{PrecisionChoice, QuantTarget, WeightArgs};
use expertmesh_model::tensor::Precision;
use expertmesh_proto::v1::generate_request::Prompt;
use expertmesh_proto::v1::generate_service_client::GenerateServiceClient;
use expertmesh_proto::v1::{FinishReason, GenerateRequest, SamplingParams, TokenIds};
use std::path::Path;
use std::time::Duration;

mod common;
use common::{Procs, field, fixture, http_get, reference, runtime, spawn, start_nodes_with};

/// Router + nodes; the router's gRPC and HTTP addresses.
struct Cluster {
    procs: Procs,
    node_metrics: std::collections::BTreeMap<String, String>,
    grpc: String,
    http: String,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn cluster(model: &Path, nodes: usize, replicas: usize, extra: &[&str]) -> Cluster {
    cluster_with(model, nodes, replicas, &[], extra)
}

/// [`cluster`], with flags for the nodes (`node_extra`) and the router.
fn cluster_with(model: &Path, nodes: usize, replicas: usize, node_extra: &[&str], extra: &[&str]) -> Cluster {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let (mut procs, placement, node_metrics) = start_nodes_with(model, nodes, replicas, node_extra);
    let dir = std::env::temp_dir().join(format!(
        "em-router-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let pfile = dir.join("placement.json");
    std::fs::write(&pfile, serde_json::to_string(&placement).unwrap()).unwrap();
    let mut cmd = common::command("router");
    cmd.args(["--model", model.to_str().unwrap(), "--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args(["--placement", pfile.to_str().unwrap(), "--threads", "1"])
        .args(extra);
    let (child, line) = spawn(cmd);
    let (grpc, http) = (field(&line, "grpc="), field(&line, "http="));
    procs.0.push(("router".into(), grpc.clone(), child));
    Cluster { procs, node_metrics, grpc, http, _dir: TempDir(dir) }
}

fn request(prompt: Vec<u32>, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids: prompt })),
        sampling: Some(SamplingParams::default()),
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

/// Runs one request to completion: (tokens, logprobs, finish reason).
async fn generate(addr: &str, req: GenerateRequest) -> Result<(Vec<u32>, Vec<f32>, i32), tonic::Status> {
    let mut c = GenerateServiceClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut s = c.generate(req).await?.into_inner();
    let (mut toks, mut lps, mut fin) = (vec![], vec![], 0);
    while let Some(m) = s.message().await? {
        toks.extend(m.token_ids);
        lps.extend(m.logprobs);
        if m.finish_reason != 0 {
            fin = m.finish_reason;
        }
    }
    Ok((toks, lps, fin))
}

#[test]
fn router_cluster_matches_transformers_and_serves_health_and_metrics() {
    let rt = runtime();
    for case in ["deepseek_v3_yarn_bf16", "qwen3_moe", "mixtral"] {
        let c = cluster(&fixture(case), 3, 2, &[]);
        let (prompt, want) = reference(case);
        let (toks, _, fin) = rt.block_on(generate(&c.grpc, request(prompt, want.len() as u32))).unwrap();
        assert_eq!(toks, want, "{case}");
        assert_eq!(fin, FinishReason::Length as i32);
        assert_eq!(http_get(&c.http, "/health").0, 200);
        assert_eq!(http_get(&c.http, "/ready").0, 200);
        let (code, body) = http_get(&c.http, "/metrics");
        assert_eq!(code, 200);
        assert!(body.contains(&format!("expertmesh_generation_tokens_total {}", want.len())), "{body}");
        assert!(body.contains("expertmesh_request_success_total{finish_reason=\"length\"} 1"), "{body}");
    }
}

/// Expert nodes started with `--quantize` serve what the same quantized
/// model computes in one process: the same greedy tokens and logprobs
/// (within 1e-4: only the combine order differs), which in turn differ from
/// the unquantized model's by more than 10× that, so quantization really ran on the nodes.
#[test]
fn quantized_experts_on_nodes_match_the_same_quantized_model_offline() {
    let rt = runtime();
    for (case, flag, format) in
        [("deepseek_v3_yarn_bf16", "int8", QuantFormat::Int8), ("qwen3_moe", "int4", QuantFormat::Int4)]
    {
        let model = fixture(case);
        let c = cluster_with(&model, 2, 1, &["--quantize", flag], &[]);
        let (prompt, _) = reference(case);
        let run = |opts: WeightArgs| {
            let m = Model::load(&model, opts, &mut |_, _| {}).unwrap();
            offline_generate(&m, &prompt, 8, ModelSampling::default(), true, |_, _| {}).unwrap()
        };
        // The nodes run f32 activations (`common::command`), so does this.
        let offline = run(WeightArgs {
            precision: PrecisionChoice::F32,
            ..WeightArgs::quantized(format, &[QuantTarget::Routed])
        });
        let exact = run(WeightArgs::from(PrecisionChoice::F32));
        let (toks, lps, _) = rt.block_on(generate(&c.grpc, request(prompt.clone(), 8))).unwrap();
        assert_eq!(toks, offline.token_ids, "{case} {flag}");
        let worst = lps.iter().zip(&offline.logprobs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "{case} {flag}: logprobs differ by {worst}");
        let moved = exact.logprobs.iter().zip(&offline.logprobs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(moved > 1e-3, "{case} {flag}: quantization moved the logprobs by only {moved}");
    }
}

#[test]
fn thirty_two_concurrent_requests_complete_identically() {
    let rt = runtime();
    let c = cluster(&fixture("deepseek_v3_qnull"), 3, 2, &["--max-num-seqs", "16", "--max-batch-tokens", "64"]);
    let (prompt, want) = reference("deepseek_v3_qnull");
    let results = rt.block_on(async {
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let addr = c.grpc.clone();
                // Half repeat the fixture prompt; half use shifted prompts of other lengths.
                let p = if i % 2 == 0 { prompt.clone() } else { prompt[..(i % 5) + 2].to_vec() };
                tokio::spawn(async move { generate(&addr, request(p, 8)).await })
            })
            .collect();
        let mut out = vec![];
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    for (i, r) in results.into_iter().enumerate() {
        let (toks, _, fin) = r.unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(toks.len(), 8);
        assert_eq!(fin, FinishReason::Length as i32);
        if i % 2 == 0 {
            assert_eq!(toks, want, "request {i} batched with others still matches transformers");
        }
    }
}

#[test]
fn a_killed_node_loses_no_request_and_uncovered_experts_are_named() {
    let rt = runtime();
    let model = fixture("deepseek_v2_lite");
    let timeout = Duration::from_secs(2);
    let mut c = cluster(&model, 3, 2, &["--dispatch-timeout", &timeout.as_secs().to_string()]);
    let (prompt, _) = reference("deepseek_v2_lite");
    let local = Model::load(&model, Precision::F32, &mut |_, _| {}).unwrap();
    let offline = offline_generate(&local, &prompt, 40, ModelSampling::default(), true, |_, _| {}).unwrap();
    let grpc = c.grpc.clone();
    rt.block_on(async {
        let mut client = GenerateServiceClient::connect(format!("http://{grpc}")).await.unwrap();
        let mut s = client.generate(request(prompt.clone(), 40)).await.unwrap().into_inner();
        let mut toks = s.message().await.unwrap().unwrap().token_ids;
        // SIGKILL after the first token: the remaining 39 steps must fail over.
        c.procs.kill("en-2");
        while let Some(m) = s.message().await.unwrap() {
            toks.extend(m.token_ids);
        }
        assert_eq!(toks, offline.token_ids, "generation continued identically on the surviving replicas");
        // With two of three nodes gone, some experts have no replica left.
        c.procs.kill("en-1");
        let t0 = std::time::Instant::now();
        let e = generate(&grpc, request(prompt.clone(), 4)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        assert!(e.message().contains("no live replica"), "{e:?}");
        // A killed node refuses at once; the dispatch timeout bounds it, with room.
        assert!(t0.elapsed() < timeout * 3, "took {:?}", t0.elapsed());
    });
}

#[test]
fn bad_requests_are_refused_without_harming_others() {
    let rt = runtime();
    let c = cluster(&fixture("mixtral"), 2, 1, &["--max-queue", "4"]);
    let (prompt, want) = reference("mixtral");
    rt.block_on(async {
        for (req, code) in [
            (request(vec![9999], 4), tonic::Code::InvalidArgument),
            (request(prompt.clone(), 0), tonic::Code::InvalidArgument),
            (request(prompt.clone(), 1000), tonic::Code::InvalidArgument),
            (GenerateRequest { prompt: None, ..request(vec![], 1) }, tonic::Code::InvalidArgument),
            (
                GenerateRequest { prompt: Some(Prompt::Text("hello".into())), ..request(vec![], 1) },
                tonic::Code::InvalidArgument,
            ),
        ] {
            let e = generate(&c.grpc, req).await.unwrap_err();
            assert_eq!(e.code(), code, "{e:?}");
        }
        let (toks, _, _) = generate(&c.grpc, request(prompt, want.len() as u32)).await.unwrap();
        assert_eq!(toks, want);
    });
}

/// `name{labels} value` lines of one metric, keyed by the label text.
fn series(body: &str, name: &str) -> std::collections::BTreeMap<String, f64> {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k[name.len()..].to_string(), v.parse().ok()?))
        })
        .collect()
}

#[test]
fn router_and_node_token_counts_agree_exactly() {
    let rt = runtime();
    let c = cluster(&fixture("deepseek_v3_qnull"), 3, 2, &[]);
    let (prompt, want) = reference("deepseek_v3_qnull");
    rt.block_on(async {
        for _ in 0..3 {
            generate(&c.grpc, request(prompt.clone(), want.len() as u32)).await.unwrap();
        }
    });
    let body = http_get(&c.http, "/metrics").1;
    let router = series(&body, "expertmesh_expert_tokens_total");
    assert!(!router.is_empty());
    let mut per_node_router = series(&body, "expertmesh_node_tokens_total");
    let mut nodes: std::collections::BTreeMap<String, f64> = Default::default();
    for (id, addr) in &c.node_metrics {
        let nbody = http_get(addr, "/metrics").1;
        let s = series(&nbody, "expertmesh_node_expert_tokens_total");
        let total: f64 = s.values().sum();
        let routed = per_node_router.remove(&format!("{{node=\"{id}\"}}")).unwrap_or(0.0);
        assert_eq!(total, routed, "node {id}: computed vs router-side count");
        assert!(!series(&nbody, "expertmesh_node_expert_compute_seconds_total").is_empty());
        for (k, v) in s {
            *nodes.entry(k).or_default() += v;
        }
    }
    assert_eq!(router, nodes, "per-expert token counts: router vs sum over nodes");
    let bytes = series(&body, "expertmesh_dispatch_bytes_total");
    assert!(bytes.keys().any(|k| k.contains("direction=\"tx\"")) && bytes.values().all(|v| *v > 0.0), "{bytes:?}");
    let bal = series(&body, "expertmesh_balancedness_ratio");
    assert!(!bal.is_empty() && bal.values().all(|v| *v > 0.0 && *v <= 1.0), "{bal:?}");
}

/// The value of an unlabelled metric.
fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")).and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| panic!("{name} missing"))
}

#[test]
fn a_client_that_goes_away_is_cancelled_and_its_kv_cache_freed() {
    let rt = runtime();
    let c = cluster(&fixture("qwen3_moe"), 2, 1, &["--kv-cache-bytes", "400000"]);
    let (prompt, _) = reference("qwen3_moe");
    rt.block_on(async {
        let mut client = GenerateServiceClient::connect(format!("http://{}", c.grpc)).await.unwrap();
        let mut s = client.generate(request(prompt.clone(), 50)).await.unwrap().into_inner();
        s.message().await.unwrap().unwrap();
        let body = http_get(&c.http, "/metrics").1;
        assert!(metric(&body, "expertmesh_kv_cache_usage_ratio") > 0.0);
        drop(s); // the client goes away mid-generation
        let t0 = std::time::Instant::now();
        loop {
            let body = http_get(&c.http, "/metrics").1;
            if metric(&body, "expertmesh_requests_running") == 0.0
                && metric(&body, "expertmesh_kv_cache_usage_ratio") == 0.0
            {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "request not cancelled: {body}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let body = http_get(&c.http, "/metrics").1;
        assert!(metric(&body, "expertmesh_generation_tokens_total") < 50.0, "generation stopped early");
        // The freed budget admits new work.
        let (toks, _, _) = generate(&c.grpc, request(prompt, 4)).await.unwrap();
        assert_eq!(toks.len(), 4);
    });
}

#[test]
fn two_micro_batches_give_the_same_tokens() {
    let rt = runtime();
    let c = cluster(&fixture("deepseek_v3_qnull"), 3, 2, &["--micro-batches", "2"]);
    let (prompt, want) = reference("deepseek_v3_qnull");
    let results = rt.block_on(async {
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (addr, p) = (c.grpc.clone(), prompt.clone());
                tokio::spawn(async move { generate(&addr, request(p, 8)).await })
            })
            .collect();
        let mut out = vec![];
        for t in tasks {
            out.push(t.await.unwrap().unwrap().0);
        }
        out
    });
    for toks in results {
        assert_eq!(toks, want);
    }
}

#[test]
fn the_tcp_transport_matches_transformers_and_fails_over() {
    let rt = runtime();
    for (case, dtype) in [("deepseek_v3_yarn_bf16", "f32"), ("mixtral", "f32"), ("qwen3_moe", "bf16")] {
        let c = cluster(&fixture(case), 3, 2, &["--transport", "tcp", "--dispatch-dtype", dtype]);
        let (prompt, want) = reference(case);
        let (toks, _, _) = rt.block_on(generate(&c.grpc, request(prompt, want.len() as u32))).unwrap();
        assert_eq!(toks, want, "{case} over tcp ({dtype})");
        let (_, body) = http_get(&c.http, "/metrics");
        let bytes = series(&body, "expertmesh_dispatch_bytes_total");
        assert!(!bytes.is_empty() && bytes.values().all(|&b| b > 0.0), "{body}");
    }
    // A node killed mid-generation: its share moves to the other replica.
    let model = fixture("deepseek_v2_lite");
    let mut c = cluster(&model, 3, 2, &["--transport", "tcp", "--dispatch-timeout", "2"]);
    let (prompt, _) = reference("deepseek_v2_lite");
    let local = Model::load(&model, Precision::F32, &mut |_, _| {}).unwrap();
    let offline = offline_generate(&local, &prompt, 24, ModelSampling::default(), true, |_, _| {}).unwrap();
    let grpc = c.grpc.clone();
    rt.block_on(async {
        let mut client = GenerateServiceClient::connect(format!("http://{grpc}")).await.unwrap();
        let mut s = client.generate(request(prompt.clone(), 24)).await.unwrap().into_inner();
        let mut toks = s.message().await.unwrap().unwrap().token_ids;
        c.procs.kill("en-0");
        while let Some(m) = s.message().await.unwrap() {
            toks.extend(m.token_ids);
        }
        assert_eq!(toks, offline.token_ids);
    });
}
