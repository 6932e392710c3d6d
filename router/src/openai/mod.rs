//! The OpenAI-compatible HTTP API: `GET /v1/models`, `POST /v1/completions`,
//! `POST /v1/chat/completions`, streaming (SSE) or not. Request fields
//! follow OpenAI's API reference plus vLLM's extensions (`top_k`,
//! `ignore_eos`, `return_token_ids`); unknown fields are ignored, as OpenAI
//! clients send many. The handlers translate shapes only: checks, limits
//! and the generation itself are [`crate::generation`]'s.

pub mod chat;
pub mod completions;
pub mod error;
pub mod tools;

use crate::RouterState;
use crate::generation::{GenerationError, Piece};
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use error::ApiError;
use expertmesh_model::generate::FinishReason;
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

/// The `Authorization` header's value.
pub fn authorization(req: &Request) -> Option<&str> {
    req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
}

/// `--api-key`, with OpenAI's error shape.
async fn require_key(State(st): State<Arc<RouterState>>, req: Request, next: Next) -> Response {
    match crate::generation::auth::authorize(&st, authorization(&req)) {
        Ok(()) => next.run(req).await,
        Err(e) => ApiError::from(e).into_response(),
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

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The trace id of a W3C `traceparent` header, or a fresh one.
pub fn trace_id(headers: &axum::http::HeaderMap) -> String {
    expertmesh_dataplane::trace::of_request(headers.get("traceparent").and_then(|v| v.to_str().ok()))
}

/// Runs an endpoint under a `request` span with the request's trace id,
/// rendering its error, if any (the core has counted it).
pub async fn respond<F, Fut>(st: Arc<RouterState>, headers: &axum::http::HeaderMap, run: F) -> Response
where
    F: FnOnce(Arc<RouterState>, String) -> Fut,
    Fut: std::future::Future<Output = Result<Response, GenerationError>>,
{
    let trace_id = trace_id(headers);
    let span = tracing::info_span!("request", trace_id = %trace_id);
    match tracing::Instrument::instrument(run(st, trace_id), span).await {
        Ok(r) => r,
        Err(e) => ApiError::from(e).into_response(),
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

/// How a streamed OpenAI response turns pieces into chunks.
pub struct Chunks<C: Fn(Value) -> Value> {
    /// Wraps a choice into a whole chunk.
    pub chunk: C,
    pub include_usage: bool,
}

impl<C: Fn(Value) -> Value> Chunks<C> {
    /// Ends a stream: the chunk carrying `finish_reason`, then, with
    /// `stream_options.include_usage`, one with `choices: []` and `usage`.
    /// Returns false once the client is gone.
    pub async fn finish(&self, tx: &tokio::sync::mpsc::Sender<Value>, mut choice: Value, p: &Piece) -> bool {
        let Piece::Done { reason, prompt_tokens, completion_tokens } = p else { return true };
        // The API may have set its own reason (chat's `tool_calls`).
        if choice["finish_reason"].is_null() {
            choice["finish_reason"] = json!(finish_str(*reason));
        }
        if tx.send((self.chunk)(choice)).await.is_err() {
            return false;
        }
        if self.include_usage {
            let mut u = (self.chunk)(json!(null));
            u["choices"] = json!([]);
            u["usage"] = usage(*prompt_tokens, *completion_tokens);
            return tx.send(u).await.is_ok();
        }
        true
    }
}

pub fn finish_str(r: FinishReason) -> &'static str {
    r.as_str()
}

/// `return_token_ids` on a whole response: the prompt's and the completion's ids.
pub fn add_token_ids(choice: &mut Value, c: &crate::generation::Completion) {
    choice["prompt_token_ids"] = json!(c.prompt);
    choice["token_ids"] = json!(c.tokens.iter().map(|t| t.id).collect::<Vec<_>>());
}

/// A whole (not streamed) response of `object` with one choice and usage.
pub fn whole(
    id: &str,
    object: &str,
    created: u64,
    model: &str,
    choice: Value,
    c: &crate::generation::Completion,
) -> Response {
    let body = json!({
        "id": id, "object": object, "created": created, "model": model,
        "choices": [choice], "usage": usage(c.prompt_tokens, c.completion_tokens),
    });
    axum::Json(body).into_response()
}

/// Ends a stream with an OpenAI error chunk.
pub async fn send_error(tx: &tokio::sync::mpsc::Sender<Value>, e: GenerationError) {
    if tx.send(ApiError::from(e).body()).await.is_err() {
        tracing::debug!("the client left before the error");
    }
}

/// One token as text, for logprobs.
pub fn token_text(st: &RouterState, id: u32) -> String {
    st.tokenizer.as_ref().and_then(|t| t.decode(&[id], false).ok()).unwrap_or_else(|| format!("<{id}>"))
}

/// A stream fed by `f` through a bounded channel: when the client goes away
/// the sends fail, `f` returns, and the generation is cancelled with it.
pub fn async_stream<F, Fut>(f: F) -> tokio_stream::wrappers::ReceiverStream<Value>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Value>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
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
