//! The OpenAI-compatible HTTP API: `GET /v1/models`, `POST /v1/completions`,
//! `POST /v1/chat/completions`, streaming (SSE) or not, with API-key auth.
//! Request fields follow OpenAI's API reference plus vLLM's extensions
//! (`top_k`, `ignore_eos`, `return_token_ids`); unknown fields are ignored,
//! as OpenAI clients send many.

pub mod chat;
pub mod completions;
pub mod error;
pub mod generation;
pub mod text;

use crate::RouterState;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use error::ApiError;
use expertmesh_model::generate::{FinishReason, SamplingParams};
use serde::Deserialize;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::Arc;
use tokio_stream::Stream;

/// The `/v1` routes, behind the API-key check.
pub fn routes(state: Arc<RouterState>) -> axum::Router<Arc<RouterState>> {
    axum::Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions::handle))
        .route("/v1/chat/completions", post(chat::handle))
        .layer(axum::middleware::from_fn_with_state(state, require_key))
}

/// `Authorization: Bearer <key>` against `--api-key` (no keys: open).
pub async fn require_key(State(st): State<Arc<RouterState>>, req: Request, next: Next) -> Response {
    if st.api_keys.is_empty() {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if crate::auth::key_matches(&st.api_keys, given) {
        next.run(req).await
    } else {
        st.metrics.errors.with_label_values(&["unauthorized"]).inc();
        ApiError::unauthorized().into_response()
    }
}

async fn models(State(st): State<Arc<RouterState>>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": st.served_model_name,
            "object": "model",
            "created": st.started,
            "owned_by": "expertmesh",
            "max_model_len": st.limits.max_model_len,
        }],
    }))
    .into_response()
}

/// `Json<T>` whose rejections (malformed JSON, wrong types, oversized
/// bodies, wrong content type) are OpenAI-shaped errors.
pub struct ApiJson<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(r) => Err(rejection(r)),
        }
    }
}

/// Malformed JSON and wrong field types are both 400, as OpenAI answers
/// (axum says 422 for the latter); oversized bodies stay 413.
fn rejection(r: JsonRejection) -> ApiError {
    let status = match r.status() {
        axum::http::StatusCode::UNPROCESSABLE_ENTITY => axum::http::StatusCode::BAD_REQUEST,
        s => s,
    };
    ApiError::new(status, r.body_text())
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(s: Option<Stop>) -> Result<Vec<String>, ApiError> {
        let v = match s {
            None => vec![],
            Some(Stop::One(x)) => vec![x],
            Some(Stop::Many(v)) => v,
        };
        if v.len() > 16 {
            return Err(ApiError::param("stop", "at most 16 stop strings"));
        }
        Ok(v)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sampling {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    pub n: Option<i64>,
}

impl Sampling {
    /// OpenAI's defaults: temperature 1, top_p 1; `top_k` ≤ 0 is off.
    pub fn params(&self) -> Result<SamplingParams, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::param("n", "only n=1 is supported"));
        }
        let p = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            top_k: self.top_k.filter(|k| *k > 0).unwrap_or(0) as usize,
            seed: self.seed,
        };
        p.validate()?;
        Ok(p)
    }
}

/// The served model, or 404 for any other name.
pub fn check_model(st: &RouterState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != st.served_model_name => Err(ApiError::model_not_found(m)),
        _ => Ok(()),
    }
}

pub fn finish_str(r: FinishReason) -> &'static str {
    r.as_str()
}

/// The trace id of a W3C `traceparent` header, or a fresh one.
pub fn trace_id(headers: &axum::http::HeaderMap) -> String {
    expertmesh_dataplane::trace::of_request(headers.get("traceparent").and_then(|v| v.to_str().ok()))
}

/// Runs an endpoint under a `request` span with the request's trace id,
/// counting and rendering its error, if any.
pub async fn respond<F, Fut>(st: Arc<RouterState>, headers: &axum::http::HeaderMap, run: F) -> Response
where
    F: FnOnce(Arc<RouterState>, String) -> Fut,
    Fut: std::future::Future<Output = Result<Response, ApiError>>,
{
    let trace_id = trace_id(headers);
    let span = tracing::info_span!("request", trace_id = %trace_id);
    match tracing::Instrument::instrument(run(st.clone(), trace_id), span).await {
        Ok(r) => r,
        Err(e) => {
            st.metrics.errors.with_label_values(&[e.reason()]).inc();
            e.into_response()
        }
    }
}

/// A fresh response id with OpenAI's prefix.
pub fn response_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// Ends a stream: the chunk carrying `finish_reason`, then, with
/// `stream_options.include_usage`, one with `choices: []` and `usage`.
pub async fn send_finish(
    tx: &tokio::sync::mpsc::Sender<Value>,
    chunk: impl Fn(Value) -> Value,
    mut choice: Value,
    reason: FinishReason,
    usage_of: Option<(usize, usize)>,
) {
    choice["finish_reason"] = json!(finish_str(reason));
    let _ = tx.send(chunk(choice)).await;
    if let Some((prompt, completion)) = usage_of {
        let mut u = chunk(json!(null));
        u["choices"] = json!([]);
        u["usage"] = usage(prompt, completion);
        let _ = tx.send(u).await;
    }
}

/// One token as text, for logprobs.
pub fn token_text(st: &RouterState, id: u32) -> String {
    st.tokenizer.as_ref().and_then(|t| t.decode(&[id], false).ok()).unwrap_or_else(|| format!("<{id}>"))
}

/// Server-sent events: each JSON chunk as `data: {json}`, then, for
/// OpenAI clients, `data: [DONE]`.
pub fn sse(chunks: impl Stream<Item = Value> + Send + 'static, done_marker: bool) -> Response {
    use tokio_stream::StreamExt;
    let done = done_marker.then(|| SseEvent::default().data("[DONE]"));
    let events = chunks
        .map(|v| SseEvent::default().data(v.to_string()))
        .chain(tokio_stream::iter(done))
        .map(Ok::<_, Infallible>);
    Sse::new(events).into_response()
}
