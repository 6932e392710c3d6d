//! Clients of a router's `GenerateService`: `generate --router` and `bench`.

use anyhow::{Context, Result, bail};
use expertmesh_proto::v1::generate_request::Prompt;
use expertmesh_proto::v1::generate_service_client::GenerateServiceClient;
use expertmesh_proto::v1::{FinishReason, GenerateRequest, ModelInfoRequest, SamplingParams, TokenIds};
use serde_json::json;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

pub async fn connect(addr: &str) -> Result<GenerateServiceClient<Channel>> {
    let url = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    let client = GenerateServiceClient::connect(url.clone()).await.with_context(|| format!("connecting to {url}"))?;
    Ok(client.max_decoding_message_size(expertmesh_proto::MAX_MESSAGE_BYTES))
}

/// One finished generation, timed on the client.
pub struct Outcome {
    pub prompt_ids: Vec<u32>,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub text: String,
    pub finish_reason: &'static str,
    /// Arrival times of each token, from the request start.
    pub token_times: Vec<Duration>,
}

pub async fn run_one(client: &mut GenerateServiceClient<Channel>, req: GenerateRequest) -> Result<Outcome> {
    let t0 = Instant::now();
    let mut stream =
        client.generate(req).await.map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?.into_inner();
    let mut o = Outcome {
        prompt_ids: vec![],
        token_ids: vec![],
        logprobs: vec![],
        text: String::new(),
        finish_reason: "",
        token_times: vec![],
    };
    while let Some(m) = stream.message().await.map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))? {
        if !m.prompt_token_ids.is_empty() {
            o.prompt_ids = m.prompt_token_ids;
        }
        for _ in &m.token_ids {
            o.token_times.push(t0.elapsed());
        }
        o.token_ids.extend(m.token_ids);
        o.logprobs.extend(m.logprobs);
        o.text.push_str(&m.text);
        o.finish_reason = match FinishReason::try_from(m.finish_reason) {
            Ok(FinishReason::Stop) => "stop",
            Ok(FinishReason::Length) => "length",
            _ => o.finish_reason,
        };
    }
    Ok(o)
}

pub fn request(prompt: Prompt, chat: bool, max_tokens: usize, s: SamplingParams, ignore_eos: bool) -> GenerateRequest {
    GenerateRequest {
        prompt: Some(prompt),
        sampling: Some(s),
        max_tokens: max_tokens as u32,
        ignore_eos,
        chat,
        request_id: String::new(),
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// `bench`: `requests` random prompts of exactly `prompt_tokens` tokens,
/// `concurrency` at a time, each generating exactly `max_tokens` tokens.
pub async fn bench(
    addr: &str,
    concurrency: usize,
    requests: usize,
    prompt_tokens: usize,
    max_tokens: usize,
) -> Result<serde_json::Value> {
    if concurrency == 0 || requests == 0 || prompt_tokens == 0 || max_tokens == 0 {
        bail!("--concurrency, --requests, --prompt-tokens and --max-tokens must all be positive");
    }
    let mut client = connect(addr).await?;
    let vocab = client.model_info(ModelInfoRequest {}).await?.into_inner().vocab_size.max(3);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (next, mut client) = (next.clone(), client.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= requests {
                    return out;
                }
                // Deterministic pseudo-random ids, never the special ids 0 and 1.
                let ids = (0..prompt_tokens)
                    .map(|k| (((i * 7919 + k) as u64 * 2654435761) % (vocab as u64 - 2)) as u32 + 2)
                    .collect();
                let req =
                    request(Prompt::TokenIds(TokenIds { ids }), false, max_tokens, SamplingParams::default(), true);
                out.push(run_one(&mut client, req).await);
            }
        }));
    }
    let (mut ttft, mut itl, mut tokens, mut errors) = (vec![], vec![], 0usize, 0usize);
    for t in tasks {
        for r in t.await? {
            match r {
                Ok(o) if o.token_ids.len() == max_tokens => {
                    tokens += o.token_ids.len();
                    ttft.push(o.token_times[0].as_secs_f64());
                    itl.extend(o.token_times.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()));
                }
                Ok(_) | Err(_) => errors += 1,
            }
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    Ok(json!({
        "requests": requests,
        "errors": errors,
        "output_tokens_per_s": tokens as f64 / wall,
        "ttft_p50_s": percentile(&mut ttft, 0.5),
        "ttft_p99_s": percentile(&mut ttft, 0.99),
        "itl_p50_s": percentile(&mut itl, 0.5),
        "itl_p99_s": percentile(&mut itl, 0.99),
    }))
}
