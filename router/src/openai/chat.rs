//! `POST /v1/chat/completions`: messages rendered with the model's chat
//! template, streamed or not, with the DeepSeek-R1 reasoning split when the
//! router runs `--reasoning-parser deepseek_r1`.

use super::completions::async_stream;
use super::error::ApiError;
use super::generation::{GenRequest, Piece, TokenOut, start};
use super::text::ReasoningSplitter;
use super::{
    ApiJson, Sampling, Stop, StreamOptions, check_model, finish_str, now_secs, response_id, send_finish, sse, usage,
};
use crate::RouterState;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use expertmesh_model::tokenizer::ChatMessage;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<Message>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    #[serde(flatten)]
    pub sampling: Sampling,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    #[serde(default)]
    pub return_token_ids: bool,
    #[serde(default)]
    pub ignore_eos: bool,
}

fn messages(v: Vec<Message>) -> Result<Vec<ChatMessage>, ApiError> {
    if v.is_empty() {
        return Err(ApiError::param("messages", "messages must not be empty"));
    }
    v.into_iter()
        .map(|m| {
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => parts
                    .into_iter()
                    .map(|p| match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => Ok(t),
                        (k, _) => Err(ApiError::param("messages", format!("content part type {k:?} is not supported"))),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(""),
            };
            Ok(ChatMessage { role: m.role, content })
        })
        .collect()
}

/// One token's chat logprobs entry.
fn logprob_entry(st: &RouterState, t: &TokenOut) -> Value {
    let entry = |id: u32, lp: f32| {
        let s = super::token_text(st, id);
        json!({"token": s, "logprob": lp, "bytes": s.as_bytes()})
    };
    let mut e = entry(t.id, t.logprob);
    e["top_logprobs"] = t.top.iter().map(|(id, lp)| entry(*id, *lp)).collect();
    e
}

pub async fn handle(
    State(st): State<Arc<RouterState>>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<ChatRequest>,
) -> Response {
    super::respond(st, &headers, |st, trace_id| run(st, req, trace_id)).await
}

async fn run(st: Arc<RouterState>, req: ChatRequest, trace_id: String) -> Result<Response, ApiError> {
    check_model(&st, req.model.as_deref())?;
    let top = match (req.logprobs, req.top_logprobs) {
        (_, Some(n)) if !(0..=20).contains(&n) => {
            return Err(ApiError::param("top_logprobs", "top_logprobs must be between 0 and 20"));
        }
        (false, Some(n)) if n > 0 => return Err(ApiError::param("top_logprobs", "top_logprobs needs logprobs: true")),
        (_, n) => n.unwrap_or(0) as usize,
    };
    let tok = st.tokenizer.clone().ok_or_else(|| ApiError::bad("this model has no tokenizer.json for chat"))?;
    let text = tok.apply_chat_template(&messages(req.messages)?, true)?;
    let prompt = tok.encode(&text)?;
    let request = GenRequest {
        prompt: prompt.clone(),
        params: req.sampling.params()?,
        max_tokens: req.max_completion_tokens.or(req.max_tokens),
        ignore_eos: req.ignore_eos,
        stop: Stop::into_vec(req.stop)?,
        top_logprobs: top,
        trace_id,
    };
    let mut rx = start(&st, request).await?;
    let (id, created, model) = (response_id("chatcmpl"), now_secs(), st.served_model_name.clone());
    let (logprobs, with_ids, reasoning) = (req.logprobs, req.return_token_ids, st.reasoning_parser);
    let mut splitter = reasoning.then(ReasoningSplitter::default);
    // (reasoning, content) of a piece of text.
    let mut route = move |text: &str, end: bool| match &mut splitter {
        None => (String::new(), text.to_string()),
        Some(s) => {
            let (mut r, c) = s.push(text);
            if end {
                r += &s.flush();
            }
            (r, c)
        }
    };
    if req.stream {
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        let chunk = move |choice: Value| json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]});
        let stream = async_stream(move |tx| async move {
            let role = json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
            if tx.send(chunk(role)).await.is_err() {
                return;
            }
            let mut first = Some(prompt);
            while let Some(p) = rx.recv().await {
                let mut choice = json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": null});
                let (text, token, end) = match p {
                    Ok(Piece::Token(t)) => (t.text.clone(), Some(t), false),
                    Ok(Piece::Tail(text)) => (text, None, false),
                    Ok(Piece::Done { reason, prompt_tokens, completion_tokens }) => {
                        let (r, c) = route("", true);
                        if !r.is_empty() || !c.is_empty() {
                            let delta = json!({"index": 0, "delta": {"reasoning_content": r, "content": c}, "logprobs": null, "finish_reason": null});
                            let _ = tx.send(chunk(delta)).await;
                        }
                        let usage_of = include_usage.then_some((prompt_tokens, completion_tokens));
                        send_finish(&tx, &chunk, choice, reason, usage_of).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(e.body()).await;
                        return;
                    }
                };
                let (r, c) = route(&text, end);
                if !r.is_empty() {
                    choice["delta"]["reasoning_content"] = json!(r);
                }
                if !c.is_empty() {
                    choice["delta"]["content"] = json!(c);
                }
                if let Some(t) = &token {
                    if logprobs {
                        choice["logprobs"] = json!({"content": [logprob_entry(&st, t)]});
                    }
                    if with_ids {
                        choice["token_ids"] = json!([t.id]);
                        if let Some(p) = first.take() {
                            choice["prompt_token_ids"] = json!(p);
                        }
                    }
                }
                let empty = r.is_empty() && c.is_empty() && !logprobs && !with_ids;
                if !empty && tx.send(chunk(choice)).await.is_err() {
                    return;
                }
            }
        });
        return Ok(sse(stream, true));
    }
    let (mut text, mut ids, mut entries) = (String::new(), Vec::new(), Vec::new());
    while let Some(p) = rx.recv().await {
        match p? {
            Piece::Token(t) => {
                if logprobs {
                    entries.push(logprob_entry(&st, &t));
                }
                ids.push(t.id);
                text += &t.text;
            }
            Piece::Tail(t) => text += &t,
            Piece::Done { reason, prompt_tokens, completion_tokens } => {
                let (r, c) = route(&text, true);
                let mut message = json!({"role": "assistant", "content": c});
                if reasoning {
                    message["reasoning_content"] = if r.is_empty() { json!(null) } else { json!(r) };
                }
                let mut choice =
                    json!({"index": 0, "message": message, "logprobs": null, "finish_reason": finish_str(reason)});
                if logprobs {
                    choice["logprobs"] = json!({"content": entries});
                }
                if with_ids {
                    choice["prompt_token_ids"] = json!(prompt);
                    choice["token_ids"] = json!(ids);
                }
                let body = json!({
                    "id": id, "object": "chat.completion", "created": created, "model": model,
                    "choices": [choice], "usage": usage(prompt_tokens, completion_tokens),
                });
                return Ok(axum::Json(body).into_response());
            }
        }
    }
    Err(ApiError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, "the generation ended early"))
}
