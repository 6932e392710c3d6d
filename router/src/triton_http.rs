//! Triton's HTTP generate extension and KServe v2 HTTP health:
//! `POST /v2/models/{model}/generate` (one JSON answer) and
//! `/generate_stream` (server-sent events, one per token), and
//! `GET /v2/health/live|ready`. The request is a JSON object with
//! `text_input` and sampling fields, at the top level or under
//! `parameters`; errors are Triton's `{"error": "message"}`.

use crate::RouterState;
use crate::openai::completions::async_stream;
use crate::openai::error::ApiError;
use crate::openai::generation::{Piece, TextParams, start};
use crate::openai::{ApiJson, sse};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Generate routes (behind the API key) and health routes (open).
pub fn routes(state: Arc<RouterState>) -> (axum::Router<Arc<RouterState>>, axum::Router<Arc<RouterState>>) {
    let generate = axum::Router::new()
        .route("/v2/models/{model}/generate", post(generate))
        .route("/v2/models/{model}/generate_stream", post(generate_stream))
        .layer(axum::middleware::from_fn_with_state(state, crate::openai::require_key));
    let health = axum::Router::new()
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(ready));
    (generate, health)
}

async fn ready(State(st): State<Arc<RouterState>>) -> StatusCode {
    if st.ready.load(Ordering::Acquire) && st.covered.load(Ordering::Acquire) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

fn triton_error(e: ApiError) -> Response {
    (e.status, Json(json!({"error": e.message}))).into_response()
}

async fn begin(
    st: &Arc<RouterState>,
    model: &str,
    headers: &axum::http::HeaderMap,
    body: Map<String, Value>,
) -> Result<tokio::sync::mpsc::Receiver<Result<Piece, ApiError>>, ApiError> {
    crate::openai::check_model(st, Some(model))?;
    let trace_id = crate::openai::trace_id(headers);
    let mut body = body;
    let text = match body.remove("text_input") {
        Some(Value::String(s)) => s,
        _ => return Err(ApiError::param("text_input", "text_input (a string) is required")),
    };
    let mut fields = match body.remove("parameters") {
        Some(Value::Object(p)) => p,
        None => Map::new(),
        Some(_) => return Err(ApiError::param("parameters", "parameters must be an object")),
    };
    body.remove("stream");
    fields.extend(body);
    let p: TextParams =
        serde_json::from_value(Value::Object(fields)).map_err(|e| ApiError::bad(format!("parameters: {e}")))?;
    let tok = st.tokenizer.as_ref().ok_or_else(|| ApiError::bad("this model has no tokenizer.json"))?;
    start(st, p.request(tok.encode(&text)?, trace_id)?).await
}

fn answer(st: &RouterState, fields: Value) -> Value {
    let mut v = json!({"model_name": st.served_model_name, "model_version": "1"});
    if let (Some(o), Some(f)) = (v.as_object_mut(), fields.as_object()) {
        o.extend(f.clone());
    }
    v
}

async fn generate(
    State(st): State<Arc<RouterState>>,
    Path(model): Path<String>,
    headers: axum::http::HeaderMap,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> Response {
    let mut rx = match begin(&st, &model, &headers, body).await {
        Ok(rx) => rx,
        Err(e) => return triton_error(e),
    };
    let mut text = String::new();
    while let Some(p) = rx.recv().await {
        match p {
            Ok(Piece::Token(t)) => text += &t.text,
            Ok(Piece::Tail(t)) => text += &t,
            Ok(Piece::Done { reason, prompt_tokens, completion_tokens }) => {
                let f = json!({"text_output": text, "finish_reason": reason.as_str(), "num_input_tokens": prompt_tokens, "num_output_tokens": completion_tokens});
                return Json(answer(&st, f)).into_response();
            }
            Err(e) => return triton_error(e),
        }
    }
    triton_error(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the generation ended early"))
}

async fn generate_stream(
    State(st): State<Arc<RouterState>>,
    Path(model): Path<String>,
    headers: axum::http::HeaderMap,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> Response {
    let mut rx = match begin(&st, &model, &headers, body).await {
        Ok(rx) => rx,
        Err(e) => return triton_error(e),
    };
    let stream = async_stream(move |tx| async move {
        while let Some(p) = rx.recv().await {
            let (msg, last) = match p {
                Ok(Piece::Token(t)) => (answer(&st, json!({"text_output": t.text})), false),
                Ok(Piece::Tail(t)) => (answer(&st, json!({"text_output": t})), false),
                Ok(Piece::Done { reason, prompt_tokens, completion_tokens }) => {
                    let f = json!({"text_output": "", "finish_reason": reason.as_str(), "num_input_tokens": prompt_tokens, "num_output_tokens": completion_tokens});
                    (answer(&st, f), true)
                }
                Err(e) => (json!({"error": e.message}), true),
            };
            if tx.send(msg).await.is_err() || last {
                return;
            }
        }
    });
    sse(stream, false)
}
