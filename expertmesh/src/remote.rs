//! Clients of a router's `GenerateService`: `generate --router`, and the
//! `grpc` API of `bench`.

use anyhow::{Context, Result};
use expertmesh_proto::v1::generate_request::Prompt;
use expertmesh_proto::v1::generate_service_client::GenerateServiceClient;
use expertmesh_proto::v1::{FinishReason, GenerateRequest, SamplingParams};
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

pub async fn run_one(
    client: &mut GenerateServiceClient<Channel>,
    req: impl tonic::IntoRequest<GenerateRequest>,
) -> Result<Outcome> {
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
