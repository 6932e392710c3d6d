//! Clients of a router's `GenerateService`: `generate --router`, and the
//! `grpc` API of `bench`.

use anyhow::{Context, Result, bail};
use expertmesh_proto::v1::generate_request::Prompt;
use expertmesh_proto::v1::generate_service_client::GenerateServiceClient;
use expertmesh_proto::v1::{FinishReason, GenerateRequest, SamplingParams};
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// A channel to a router's public gRPC at `addr` (`HOST:PORT` or a URL):
/// TLS trusting `tls_ca` when given, plaintext otherwise.
pub async fn channel(addr: &str, tls_ca: Option<&Path>) -> Result<Channel> {
    let host = addr.split_once("://").map_or(addr, |(_, rest)| rest);
    let url = format!("{}://{host}", if tls_ca.is_some() { "https" } else { "http" });
    let mut ep = tonic::transport::Endpoint::from_shared(url.clone()).with_context(|| format!("address {addr:?}"))?;
    if let Some(ca) = tls_ca {
        let pem = std::fs::read(ca).with_context(|| format!("--tls-ca {}", ca.display()))?;
        ep = ep.tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))?;
    }
    ep.connect().await.with_context(|| format!("connecting to {url}"))
}

pub async fn connect(addr: &str, tls_ca: Option<&Path>) -> Result<GenerateServiceClient<Channel>> {
    let client = GenerateServiceClient::new(channel(addr, tls_ca).await?);
    Ok(client.max_decoding_message_size(expertmesh_proto::MAX_MESSAGE_BYTES))
}

/// An HTTP client for the router's HTTP APIs; with `tls_ca`, `https://`
/// URLs are verified against that CA alone.
pub fn http_client(tls_ca: Option<&Path>) -> Result<reqwest::Client> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    use tokio_rustls::rustls;
    let mut b = reqwest::Client::builder();
    if let Some(ca) = tls_ca {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("--tls-ca {}", ca.display()))? {
            roots.add(cert.with_context(|| format!("--tls-ca {}", ca.display()))?)?;
        }
        if roots.is_empty() {
            bail!("--tls-ca {}: no PEM certificate in the file", ca.display());
        }
        let cfg =
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
        b = b.tls_backend_preconfigured(cfg);
    }
    Ok(b.build()?)
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
