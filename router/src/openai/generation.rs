//! One generation behind the public APIs: limits checked, the request
//! queued on the engine, tokens decoded to text, stop strings applied, the
//! request timeout enforced. The first engine event is awaited before
//! returning, so a refusal (bad token ids, full queue, uncovered experts)
//! becomes a proper error status rather than a failed stream.

use super::error::ApiError;
use super::text::StopMatcher;
use crate::RouterState;
use crate::engine::{Event, Submit, event_channel};
use expertmesh_model::generate::{FinishReason, SamplingParams};
use expertmesh_model::tokenizer::IncrementalDecoder;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// `None`: as many as the context allows, up to `--max-tokens-limit`.
    pub max_tokens: Option<i64>,
    pub ignore_eos: bool,
    pub stop: Vec<String>,
    pub top_logprobs: usize,
    /// See `expertmesh_dataplane::trace`.
    pub trace_id: String,
}

/// Generation settings of the text protocols (KServe's `sampling_parameters`
/// and request parameters, Triton's generate extension), with the names
/// Triton's vLLM backend uses.
#[derive(Debug, serde::Deserialize)]
pub struct TextParams {
    max_tokens: Option<i64>,
    #[serde(flatten)]
    sampling: super::Sampling,
    stop: Option<super::Stop>,
    ignore_eos: Option<bool>,
}

impl TextParams {
    /// The request for `prompt`; `max_tokens` defaults to 16, as vLLM's.
    pub fn request(self, prompt: Vec<u32>, trace_id: String) -> Result<GenRequest, ApiError> {
        Ok(GenRequest {
            prompt,
            params: self.sampling.params()?,
            max_tokens: Some(self.max_tokens.unwrap_or(16)),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            stop: super::Stop::into_vec(self.stop)?,
            top_logprobs: 0,
            trace_id,
        })
    }
}

#[derive(Debug, Clone)]
pub struct TokenOut {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
    /// Text this token completes (may be empty: held for a stop string or
    /// an unfinished UTF-8 sequence).
    pub text: String,
}

#[derive(Debug, Clone)]
pub enum Piece {
    Token(TokenOut),
    /// Text released at the end (held back while it could become a stop).
    Tail(String),
    Done {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
}

/// The request's limits against the router's; returns `max_tokens`.
fn check_limits(st: &RouterState, prompt: usize, max_tokens: Option<i64>) -> Result<usize, ApiError> {
    let l = &st.limits;
    if prompt == 0 {
        return Err(ApiError::param("prompt", "the prompt is empty"));
    }
    if prompt >= l.max_model_len {
        return Err(ApiError::param(
            "prompt",
            format!(
                "This model's maximum context length is {} tokens; the prompt has {prompt} tokens.",
                l.max_model_len
            ),
        ));
    }
    let room = l.max_model_len - prompt;
    let m = match max_tokens {
        None => room.min(l.max_tokens_limit),
        Some(m) if m <= 0 => return Err(ApiError::param("max_tokens", "max_tokens must be at least 1")),
        Some(m) => m as usize,
    };
    if m > l.max_tokens_limit {
        return Err(ApiError::param(
            "max_tokens",
            format!("max_tokens is {m}; this server allows at most {}", l.max_tokens_limit),
        ));
    }
    if m > room {
        return Err(ApiError::param(
            "max_tokens",
            format!(
                "This model's maximum context length is {} tokens. However, you requested {} tokens ({prompt} in the prompt, {m} for the completion).",
                l.max_model_len,
                prompt + m
            ),
        ));
    }
    Ok(m)
}

/// Starts a generation; pieces arrive on the receiver, ending with `Done`
/// or an error. Dropping the receiver cancels the request.
pub async fn start(
    st: &Arc<RouterState>,
    req: GenRequest,
) -> Result<mpsc::Receiver<Result<Piece, ApiError>>, ApiError> {
    let arrived = Instant::now();
    let max_tokens = check_limits(st, req.prompt.len(), req.max_tokens)?;
    req.params.validate()?;
    let prompt_tokens = req.prompt.len();
    crate::log_prompt(st, &req.trace_id, &req.prompt);
    let (events, mut rx) = event_channel(max_tokens);
    st.submit(Submit {
        prompt: req.prompt,
        params: req.params,
        max_tokens,
        ignore_eos: req.ignore_eos,
        top_logprobs: req.top_logprobs,
        events,
        arrived,
        trace_id: req.trace_id,
    })?;
    let timeout = st.limits.request_timeout;
    let deadline = tokio::time::Instant::from_std(arrived + timeout.unwrap_or(Duration::from_secs(365 * 86400)));
    let first = match next_event(&mut rx, deadline, timeout).await? {
        Event::Failed(e) => return Err(e.into()),
        ev => ev,
    };
    let tok = st.tokenizer.clone();
    let (out, out_rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut decoder = IncrementalDecoder::default();
        let mut stops = StopMatcher::new(req.stop);
        let mut generated = 0;
        let mut ev = Ok(first);
        loop {
            let piece = match ev {
                Err(e) => Err(e),
                Ok(Event::Failed(e)) => Err(e.into()),
                Ok(Event::Token { id, logprob, top }) => {
                    generated += 1;
                    let raw = tok.as_ref().and_then(|t| decoder.push(t, id)).unwrap_or_default();
                    let (text, hit) = stops.push(&raw);
                    let t = Ok(Piece::Token(TokenOut { id, logprob, top, text }));
                    if hit {
                        // Dropping the engine's receiver cancels the rest.
                        let _ = out.send(t).await;
                        let done =
                            Piece::Done { reason: FinishReason::Stop, prompt_tokens, completion_tokens: generated };
                        let _ = out.send(Ok(done)).await;
                        return;
                    }
                    t
                }
                Ok(Event::Finished(reason)) => {
                    let tail = stops.flush();
                    if !tail.is_empty() && out.send(Ok(Piece::Tail(tail))).await.is_err() {
                        return;
                    }
                    let _ = out.send(Ok(Piece::Done { reason, prompt_tokens, completion_tokens: generated })).await;
                    return;
                }
            };
            let fatal = piece.is_err();
            if out.send(piece).await.is_err() || fatal {
                return;
            }
            ev = next_event(&mut rx, deadline, timeout).await;
        }
    });
    Ok(out_rx)
}

async fn next_event(
    rx: &mut mpsc::Receiver<Event>,
    deadline: tokio::time::Instant,
    timeout: Option<Duration>,
) -> Result<Event, ApiError> {
    match tokio::time::timeout_at(deadline, rx.recv()).await {
        Ok(Some(ev)) => Ok(ev),
        Ok(None) => Err(ApiError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, "the engine stopped")),
        Err(_) => Err(ApiError::timeout(timeout.map_or(0.0, |t| t.as_secs_f64()))),
    }
}
