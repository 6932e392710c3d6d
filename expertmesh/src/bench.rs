//! `expertmesh bench`: a load generator with one report for every API.
//!
//! `requests` prompts, `concurrency` at a time, each generating exactly
//! `max_tokens` tokens (EOS ignored), streamed so every token's arrival is
//! timed (TTFT, inter-token latency). The APIs:
//! - `grpc`: the router's own `GenerateService` (token-id prompts);
//! - `openai`: `POST /v1/completions` with `stream: true` and token-id
//!   prompts (`return_token_ids` marks each token's chunk);
//! - `kserve`: `ModelStreamInfer` (text prompts of `prompt_tokens` words, as
//!   that protocol carries text only; one response per token).
//!
//! `text: true` sends every API the same text prompt of `prompt_tokens`
//! words instead, so the three APIs do the same work.

use crate::remote::{channel, connect, http_client, request, run_one};
use anyhow::{Context, Result, bail};
use expertmesh_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use expertmesh_proto::inference::model_infer_request::InferInputTensor;
use expertmesh_proto::inference::{ModelInferRequest, infer_parameter::ParameterChoice};
use expertmesh_proto::v1::generate_request::Prompt;
use expertmesh_proto::v1::{SamplingParams, TokenIds};
use serde_json::json;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Api {
    Grpc,
    Openai,
    Kserve,
}

pub struct Target {
    pub api: Api,
    /// `HOST:PORT` (gRPC) or `http://HOST:PORT` (OpenAI).
    pub addr: String,
    pub api_key: Option<String>,
    /// The served model (KServe requests name it).
    pub model_name: Option<String>,
    /// CA of the router's public TLS certificate: use TLS, trusting it.
    pub tls_ca: Option<std::path::PathBuf>,
}

/// One client task's connections, opened on first use and reused.
struct Conns {
    grpc: Option<expertmesh_proto::v1::generate_service_client::GenerateServiceClient<tonic::transport::Channel>>,
    kserve: Option<GrpcInferenceServiceClient<tonic::transport::Channel>>,
    http: reqwest::Client,
}

pub struct Load {
    pub concurrency: usize,
    pub requests: usize,
    pub prompt_tokens: usize,
    /// Leading token ids every request shares (token-id prompts only).
    pub shared_prefix: usize,
    /// Text prompts for every API (see the module doc).
    pub text: bool,
    pub max_tokens: usize,
    /// Run for this long instead of a number of requests (requests in
    /// flight at the end finish and count).
    pub duration: Option<Duration>,
}

/// Token ids that are valid in any byte-level BPE vocabulary (≥ 256 entries),
/// never the special ids 0 and 1, deterministic per request.
fn prompt_ids(i: usize, n: usize, shared: usize) -> Vec<u32> {
    let id = |i: usize, k: usize| (((i * 7919 + k) as u64).wrapping_mul(2654435761) % 254) as u32 + 2;
    // The shared part is a request number no run reaches, so no request's
    // own tail repeats it.
    (0..n).map(|k| if k < shared { id(1 << 40, k) } else { id(i, k) }).collect()
}

/// A text prompt of `n` words, varied per request.
fn prompt_text(i: usize, n: usize) -> String {
    (0..n).map(|k| if (i + k).is_multiple_of(2) { "hello" } else { "world" }).collect::<Vec<_>>().join(" ")
}

/// Arrival times of each generated token, from the request start.
async fn one(t: &Target, conns: &mut Conns, i: usize, load: &Load) -> Result<Vec<Duration>> {
    let ids = prompt_ids(i, load.prompt_tokens, load.shared_prefix);
    let text = prompt_text(i, load.prompt_tokens);
    match t.api {
        Api::Grpc => {
            if conns.grpc.is_none() {
                conns.grpc = Some(connect(&t.addr, t.tls_ca.as_deref()).await?);
            }
            let c = conns.grpc.as_mut().context("connection")?;
            let prompt = if load.text { Prompt::Text(text) } else { Prompt::TokenIds(TokenIds { ids }) };
            let req = request(prompt, false, load.max_tokens, SamplingParams::default(), true);
            let mut r = tonic::Request::new(req);
            authorize(&mut r, &t.api_key)?;
            Ok(run_one(c, r).await?.token_times)
        }
        Api::Openai => {
            let prompt = if load.text { json!(text) } else { json!(ids) };
            let body = json!({"prompt": prompt, "max_tokens": load.max_tokens, "temperature": 0, "ignore_eos": true,
                              "stream": true, "return_token_ids": true});
            let t0 = Instant::now();
            let mut req = conns.http.post(format!("{}/v1/completions", t.addr.trim_end_matches('/'))).json(&body);
            if let Some(k) = &t.api_key {
                req = req.bearer_auth(k);
            }
            let resp = req.send().await?.error_for_status()?;
            let mut times = Vec::new();
            let mut buf = String::new();
            let mut body = resp.bytes_stream();
            while let Some(chunk) = body.next().await {
                buf.push_str(&String::from_utf8_lossy(&chunk?));
                while let Some(end) = buf.find("\n\n") {
                    let event: String = buf.drain(..end + 2).collect();
                    let Some(data) = event.trim().strip_prefix("data: ") else { continue };
                    if data == "[DONE]" {
                        return Ok(times);
                    }
                    let v: serde_json::Value = serde_json::from_str(data)?;
                    let n = v["choices"][0]["token_ids"].as_array().map_or(0, Vec::len);
                    times.extend(std::iter::repeat_n(t0.elapsed(), n));
                }
            }
            Ok(times)
        }
        Api::Kserve => {
            if conns.kserve.is_none() {
                conns.kserve = Some(GrpcInferenceServiceClient::new(channel(&t.addr, t.tls_ca.as_deref()).await?));
            }
            let c = conns.kserve.as_mut().context("connection")?;
            let t0 = Instant::now();
            let params = json!({"max_tokens": load.max_tokens, "temperature": 0, "ignore_eos": true}).to_string();
            let bytes = |s: &str| {
                let mut v = (s.len() as u32).to_le_bytes().to_vec();
                v.extend_from_slice(s.as_bytes());
                v
            };
            let tensor = |name: &str, dt: &str| InferInputTensor {
                name: name.into(),
                datatype: dt.into(),
                shape: vec![1],
                ..Default::default()
            };
            let req = ModelInferRequest {
                model_name: t.model_name.clone().context("--api kserve needs --model-name")?,
                inputs: vec![
                    tensor("text_input", "BYTES"),
                    tensor("sampling_parameters", "BYTES"),
                    tensor("stream", "BOOL"),
                ],
                raw_input_contents: vec![bytes(&text).into(), bytes(&params).into(), vec![1u8].into()],
                ..Default::default()
            };
            let mut r = tonic::Request::new(tokio_stream::once(req));
            authorize(&mut r, &t.api_key)?;
            let mut s = c.model_stream_infer(r).await?.into_inner();
            let mut times = Vec::new();
            while let Some(m) = s.message().await? {
                if !m.error_message.is_empty() {
                    bail!("{}", m.error_message);
                }
                let Some(resp) = m.infer_response else { continue };
                let last = resp.parameters.get("triton_final_response").and_then(|p| p.parameter_choice.clone());
                if matches!(last, Some(ParameterChoice::BoolParam(true))) {
                    return Ok(times);
                }
                times.push(t0.elapsed());
            }
            Ok(times)
        }
    }
}

pub fn authorize<T>(r: &mut tonic::Request<T>, key: &Option<String>) -> Result<()> {
    if let Some(k) = key {
        r.metadata_mut().insert("authorization", format!("Bearer {k}").parse().context("--api-key")?);
    }
    Ok(())
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub async fn bench(t: Target, load: Load) -> Result<serde_json::Value> {
    if load.concurrency == 0 || load.requests == 0 || load.prompt_tokens == 0 || load.max_tokens == 0 {
        bail!("--concurrency, --requests, --prompt-tokens and --max-tokens must all be positive");
    }
    if load.shared_prefix > load.prompt_tokens || (load.shared_prefix > 0 && (load.text || t.api == Api::Kserve)) {
        bail!("--shared-prefix-tokens must be at most --prompt-tokens, with token-id prompts (grpc or openai)");
    }
    let (t, load) = (std::sync::Arc::new(t), std::sync::Arc::new(load));
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // One HTTP client: its clones share one connection pool.
    let http = http_client(t.tls_ca.as_deref())?;
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..load.concurrency)
        .map(|_| {
            let (t, load, next, http) = (t.clone(), load.clone(), next.clone(), http.clone());
            tokio::spawn(async move {
                let mut conns = Conns { grpc: None, kserve: None, http };
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let over = load.duration.is_some_and(|d| t0.elapsed() >= d);
                    if (load.duration.is_none() && i >= load.requests) || over {
                        return out;
                    }
                    out.push((i, one(&t, &mut conns, i, &load).await));
                }
            })
        })
        .collect();
    let (mut ttft, mut itl, mut tokens, mut errors, mut first_error) = (vec![], vec![], 0, 0, None);
    let (mut done, mut ttft_first) = (0, None);
    for task in tasks {
        for (i, r) in task.await? {
            done += 1;
            match r {
                Ok(times) if times.len() == load.max_tokens => {
                    tokens += times.len();
                    ttft.push(times[0].as_secs_f64());
                    if i == 0 {
                        ttft_first = Some(times[0].as_secs_f64());
                    }
                    itl.extend(times.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()));
                }
                Ok(times) => {
                    errors += 1;
                    first_error.get_or_insert(format!("{} tokens instead of {}", times.len(), load.max_tokens));
                }
                Err(e) => {
                    errors += 1;
                    first_error.get_or_insert(format!("{e:#}"));
                }
            }
        }
    }
    if let Some(e) = &first_error {
        eprintln!("bench: {errors} failed requests; the first: {e}");
    }
    let wall = t0.elapsed().as_secs_f64();
    Ok(json!({
        "requests": done,
        "errors": errors,
        "output_tokens_per_s": tokens as f64 / wall,
        // Request 0 is the first to arrive: with a shared prefix, the one
        // that computes it (compare with the median of the rest).
        "ttft_first_s": ttft_first,
        "ttft_p50_s": percentile(&mut ttft, 0.5),
        "ttft_p99_s": percentile(&mut ttft, 0.99),
        "itl_p50_s": percentile(&mut itl, 0.5),
        "itl_p99_s": percentile(&mut itl, 0.99),
        "itl_p999_s": percentile(&mut itl, 0.999),
        "itl_max_s": itl.iter().copied().fold(0.0, f64::max),
        "wall_s": wall,
    }))
}
