//! Triton's HTTP generate extension and KServe v2 HTTP health:
//! `POST /v2/models/{model}/generate` (one JSON answer) and
//! `/generate_stream` (server-sent events, one per token), and
//! `GET /v2/health/live|ready`. The request is a JSON object with
//! `text_input` and sampling fields, at the top level or under
//! `parameters`; errors are Triton's `{"error": "message"}`.

use crate::RouterState;
use crate::generation::{self, Generation, GenerationError, Piece};
use crate::openai::{ApiJson, async_stream, sse};
use crate::triton_params::TextParams;
use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use expertmesh_model::generate::FinishReason;
use serde_json::{Map, Value, json};
use std::sync::Arc;

/// Generate routes (behind the API key) and health routes (open).
pub fn routes(state: Arc<RouterState>) -> (axum::Router<Arc<RouterState>>, axum::Router<Arc<RouterState>>) {
    let generate = axum::Router::new()
        .route("/v2/models/{model}/generate", post(generate))
        .route("/v2/models/{model}/generate_stream", post(generate_stream))
        .layer(axum::middleware::from_fn_with_state(state, require_key));
    let health = axum::Router::new()
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(ready));
    (generate, health)
}

/// `--api-key`, with Triton's error shape.
async fn require_key(State(st): State<Arc<RouterState>>, req: Request, next: Next) -> Response {
    match generation::auth::authorize(&st, crate::openai::authorization(&req)) {
        Ok(()) => next.run(req).await,
        Err(e) => triton_error(e),
    }
}

async fn ready(State(st): State<Arc<RouterState>>) -> StatusCode {
    if st.is_ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }
}

fn triton_error(e: GenerationError) -> Response {
    (e.http_status(), Json(json!({"error": e.to_string()}))).into_response()
}

/// The body's parameters, top level and under `parameters`, as the core's request.
fn translate(
    model: &str,
    trace_id: String,
    mut body: Map<String, Value>,
) -> Result<generation::GenerationRequest, GenerationError> {
    let text = match body.remove("text_input") {
        Some(Value::String(s)) => s,
        _ => return Err(GenerationError::invalid("text_input", "text_input (a string) is required")),
    };
    let mut fields = match body.remove("parameters") {
        Some(Value::Object(p)) => p,
        None => Map::new(),
        Some(_) => return Err(GenerationError::invalid("parameters", "parameters must be an object")),
    };
    body.remove("stream");
    fields.extend(body);
    TextParams::parse(fields, "parameters")?.request(model, text, trace_id)
}

async fn begin(
    st: &Arc<RouterState>,
    model: &str,
    headers: &axum::http::HeaderMap,
    body: Map<String, Value>,
) -> Result<Generation, GenerationError> {
    let trace_id = crate::openai::trace_id(headers);
    let request = translate(model, trace_id, body).map_err(|e| st.refused(e))?;
    generation::start(st, request).await
}

fn answer(st: &RouterState, fields: Value) -> Value {
    let mut v = json!({"model_name": st.served_model_name, "model_version": "1"});
    if let (Some(o), Some(f)) = (v.as_object_mut(), fields.as_object()) {
        o.extend(f.clone());
    }
    v
}

/// The last answer's fields: the text (whole, or empty when streamed),
/// why it ended, and the token counts.
fn done_fields(text: String, reason: FinishReason, prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "text_output": text, "finish_reason": reason.as_str(),
        "num_input_tokens": prompt_tokens, "num_output_tokens": completion_tokens,
    })
}

async fn generate(
    State(st): State<Arc<RouterState>>,
    Path(model): Path<String>,
    headers: axum::http::HeaderMap,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> Response {
    let collected = async {
        let c = begin(&st, &model, &headers, body).await?.collect().await?;
        Ok::<_, GenerationError>(done_fields(c.text, c.reason, c.prompt_tokens, c.completion_tokens))
    };
    match collected.await {
        Ok(f) => Json(answer(&st, f)).into_response(),
        Err(e) => triton_error(e),
    }
}

async fn generate_stream(
    State(st): State<Arc<RouterState>>,
    Path(model): Path<String>,
    headers: axum::http::HeaderMap,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> Response {
    let mut g = match begin(&st, &model, &headers, body).await {
        Ok(g) => g,
        Err(e) => return triton_error(e),
    };
    let stream = async_stream(move |tx| async move {
        while let Some(p) = g.next().await {
            let (msg, last) = match p {
                Ok(Piece::Token(t)) => (answer(&st, json!({"text_output": t.text})), false),
                Ok(Piece::Tail { text, .. }) => (answer(&st, json!({"text_output": text})), false),
                Ok(Piece::Done { reason, prompt_tokens, completion_tokens }) => {
                    (answer(&st, done_fields(String::new(), reason, prompt_tokens, completion_tokens)), true)
                }
                Err(e) => (json!({"error": e.to_string()}), true),
            };
            if tx.send(msg).await.is_err() || last {
                return;
            }
        }
    });
    sse(stream, false)
}
