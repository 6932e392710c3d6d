//! `POST /v1/completions`: a prompt as text or token ids, streamed or not.

use super::error::ApiError;
use super::generation::{GenRequest, Piece, TokenOut, start};
use super::{
    ApiJson, Sampling, Stop, StreamOptions, check_model, finish_str, now_secs, response_id, send_finish, sse, usage,
};
use crate::RouterState;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::sync::Arc;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: PromptInput,
    /// OpenAI's default for completions is 16.
    pub max_tokens: Option<i64>,
    #[serde(flatten)]
    pub sampling: Sampling,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Alternatives per token (0–20); the chosen token's logprob is always given.
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
    #[serde(default)]
    pub return_token_ids: bool,
    #[serde(default)]
    pub ignore_eos: bool,
}

fn prompt_ids(st: &RouterState, p: PromptInput) -> Result<Vec<u32>, ApiError> {
    let text = match p {
        PromptInput::Ids(ids) => return Ok(ids),
        PromptInput::IdLists(mut v) if v.len() == 1 => return Ok(v.remove(0)),
        PromptInput::Text(t) => t,
        PromptInput::Texts(mut v) if v.len() == 1 => v.remove(0),
        _ => return Err(ApiError::param("prompt", "exactly one prompt per request is supported")),
    };
    let tok = st
        .tokenizer
        .as_ref()
        .ok_or_else(|| ApiError::param("prompt", "this model has no tokenizer.json; send the prompt as token ids"))?;
    Ok(tok.encode(&text)?)
}

/// OpenAI's legacy completion logprobs, built token by token.
#[derive(Default)]
struct Logprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<f32>,
    top: Vec<Map<String, Value>>,
    offsets: Vec<usize>,
}

impl Logprobs {
    fn add(&mut self, st: &RouterState, t: &TokenOut, offset: usize) {
        self.tokens.push(super::token_text(st, t.id));
        self.token_logprobs.push(t.logprob);
        // Keyed by text, as OpenAI's format is: two tokens that decode alike
        // (partial UTF-8) share a key, and the likelier one keeps it.
        let mut top = Map::new();
        for (id, lp) in &t.top {
            top.entry(super::token_text(st, *id)).or_insert(json!(lp));
        }
        self.top.push(top);
        self.offsets.push(offset);
    }

    fn json(self) -> Value {
        json!({"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top, "text_offset": self.offsets})
    }
}

pub async fn handle(
    State(st): State<Arc<RouterState>>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Response {
    super::respond(st, &headers, |st, trace_id| run(st, req, trace_id)).await
}

async fn run(st: Arc<RouterState>, req: CompletionRequest, trace_id: String) -> Result<Response, ApiError> {
    check_model(&st, req.model.as_deref())?;
    if req.echo {
        return Err(ApiError::param("echo", "echo is not supported"));
    }
    let logprobs = match req.logprobs {
        None => None,
        Some(n @ 0..=20) => Some(n as usize),
        Some(_) => return Err(ApiError::param("logprobs", "logprobs must be between 0 and 20")),
    };
    let prompt = prompt_ids(&st, req.prompt)?;
    let request = GenRequest {
        prompt: prompt.clone(),
        params: req.sampling.params()?,
        max_tokens: Some(req.max_tokens.unwrap_or(16)),
        ignore_eos: req.ignore_eos,
        stop: Stop::into_vec(req.stop)?,
        top_logprobs: logprobs.unwrap_or(0),
        trace_id,
    };
    let mut rx = start(&st, request).await?;
    let (id, created, model) = (response_id("cmpl"), now_secs(), st.served_model_name.clone());
    let with_ids = req.return_token_ids;
    if req.stream {
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        let chunk = move |choice: Value| json!({"id": id, "object": "text_completion", "created": created, "model": model, "choices": [choice]});
        let stream = async_stream(move |tx| async move {
            let mut first = Some(prompt);
            let mut offset = 0;
            while let Some(p) = rx.recv().await {
                let mut choice = json!({"index": 0, "text": "", "logprobs": null, "finish_reason": null});
                match p {
                    Ok(Piece::Token(t)) => {
                        if t.text.is_empty() && logprobs.is_none() && !with_ids {
                            continue;
                        }
                        if logprobs.is_some() {
                            let mut lp = Logprobs::default();
                            lp.add(&st, &t, offset);
                            choice["logprobs"] = lp.json();
                        }
                        if with_ids {
                            choice["token_ids"] = json!([t.id]);
                            if let Some(p) = first.take() {
                                choice["prompt_token_ids"] = json!(p);
                            }
                        }
                        offset += t.text.len();
                        choice["text"] = json!(t.text);
                    }
                    Ok(Piece::Tail(text)) => choice["text"] = json!(text),
                    Ok(Piece::Done { reason, prompt_tokens, completion_tokens }) => {
                        let usage_of = include_usage.then_some((prompt_tokens, completion_tokens));
                        send_finish(&tx, &chunk, choice, reason, usage_of).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(e.body()).await;
                        return;
                    }
                }
                if tx.send(chunk(choice)).await.is_err() {
                    return;
                }
            }
        });
        return Ok(sse(stream, true));
    }
    let (mut text, mut ids, mut lp) = (String::new(), Vec::new(), Logprobs::default());
    while let Some(p) = rx.recv().await {
        match p? {
            Piece::Token(t) => {
                if logprobs.is_some() {
                    lp.add(&st, &t, text.len());
                }
                ids.push(t.id);
                text += &t.text;
            }
            Piece::Tail(t) => text += &t,
            Piece::Done { reason, prompt_tokens, completion_tokens } => {
                let mut choice =
                    json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish_str(reason)});
                if logprobs.is_some() {
                    choice["logprobs"] = lp.json();
                }
                if with_ids {
                    choice["prompt_token_ids"] = json!(prompt);
                    choice["token_ids"] = json!(ids);
                }
                let body = json!({
                    "id": id, "object": "text_completion", "created": created, "model": model,
                    "choices": [choice], "usage": usage(prompt_tokens, completion_tokens),
                });
                return Ok(axum::Json(body).into_response());
            }
        }
    }
    Err(ApiError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, "the generation ended early"))
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
