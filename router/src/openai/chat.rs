//! `POST /v1/chat/completions`: messages rendered with the model's chat
//! template, streamed or not, with the DeepSeek-R1 reasoning split when the
//! router runs `--reasoning-parser deepseek_r1`.

use super::tools::{ToolChoice, ToolDef, call_json};
use super::{ApiJson, Chunks, StreamOptions, async_stream, finish_str, now_secs, response_id, sse};
use crate::RouterState;
use crate::generation::guide::Guided;
use crate::generation::tools::ToolCall;
use crate::generation::{self, GenerationError, GenerationRequest, Piece, Prompt, Sampling, Stop, TokenOut};
use axum::extract::State;
use axum::response::Response;
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
    /// An assistant turn's calls, as the API returned them.
    pub tool_calls: Option<Vec<Value>>,
    /// A `tool` turn: the call it answers.
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<Message>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    #[serde(flatten)]
    pub sampling: Sampling,
    /// `response_format` and vLLM's `guided_*`.
    #[serde(flatten)]
    pub guided: Guided,
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
    pub tools: Option<Vec<ToolDef>>,
    pub tool_choice: Option<ToolChoice>,
    /// Default true; false: at most one call.
    pub parallel_tool_calls: Option<bool>,
}

fn messages(v: Vec<Message>) -> Result<Vec<ChatMessage>, GenerationError> {
    v.into_iter()
        .map(|m| {
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => parts
                    .into_iter()
                    .map(|p| match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => Ok(t),
                        (k, _) => Err(GenerationError::invalid(
                            "messages",
                            format!("content part type {k:?} is not supported"),
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(""),
            };
            Ok(ChatMessage {
                role: m.role,
                content,
                tool_calls: m.tool_calls.unwrap_or_default(),
                tool_call_id: m.tool_call_id,
            })
        })
        .collect()
}

fn translate(st: &RouterState, req: ChatRequest, trace_id: String) -> Result<GenerationRequest, GenerationError> {
    let top = match (req.logprobs, req.top_logprobs) {
        (_, Some(n)) if !(0..=20).contains(&n) => {
            return Err(GenerationError::invalid("top_logprobs", "top_logprobs must be between 0 and 20"));
        }
        (false, Some(n)) if n > 0 => {
            return Err(GenerationError::invalid("top_logprobs", "top_logprobs needs logprobs: true"));
        }
        (_, n) => n.unwrap_or(0) as usize,
    };
    let tools = super::tools::plan(st, req.tools, req.tool_choice, req.parallel_tool_calls.unwrap_or(true))?;
    let guide = match (req.guided.guide()?, tools.guide) {
        (Some(_), Some(_)) => {
            return Err(GenerationError::invalid(
                "tool_choice",
                "tool_choice required or a named function constrains the output; drop response_format",
            ));
        }
        (a, b) => a.or(b),
    };
    Ok(GenerationRequest {
        model: req.model,
        sampling: req.sampling,
        max_tokens: req.max_completion_tokens.or(req.max_tokens),
        stop: Stop::into_vec(req.stop),
        ignore_eos: req.ignore_eos,
        top_logprobs: top,
        // A structured output is constrained from its first token, so it
        // is not split (vLLM starts the grammar after `</think>` instead).
        reasoning: st.reasoning_parser && guide.is_none(),
        guide,
        tools: tools.defs,
        tool_parser: tools.parser,
        ..GenerationRequest::new(Prompt::Chat(messages(req.messages)?), trace_id)
    })
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

/// A delta with whatever reasoning, content and calls the piece carries;
/// `calls` counts the calls streamed so far (their `index`).
fn delta(reasoning: &str, content: &str, new_calls: &[ToolCall], calls: &mut usize) -> Value {
    let mut d = json!({});
    if !reasoning.is_empty() {
        d["reasoning_content"] = json!(reasoning);
    }
    if !content.is_empty() {
        d["content"] = json!(content);
    }
    if !new_calls.is_empty() {
        d["tool_calls"] = new_calls.iter().enumerate().map(|(i, c)| call_json(c, Some(*calls + i))).collect();
        *calls += new_calls.len();
    }
    d
}

/// OpenAI's reason: `tool_calls` when the model called a tool and stopped,
/// `length` when it was cut off (a later call may be lost).
fn finish(reason: expertmesh_model::generate::FinishReason, called: bool) -> &'static str {
    match reason {
        expertmesh_model::generate::FinishReason::Stop if called => "tool_calls",
        _ => finish_str(reason),
    }
}

async fn run(st: Arc<RouterState>, req: ChatRequest, trace_id: String) -> Result<Response, GenerationError> {
    let (stream, logprobs, with_ids) = (req.stream, req.logprobs, req.return_token_ids);
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let request = translate(&st, req, trace_id).map_err(|e| st.refused(e))?;
    let reasoning = request.reasoning;
    let mut g = generation::start(&st, request).await?;
    let (id, created, model) = (response_id("chatcmpl"), now_secs(), st.served_model_name.clone());
    if !stream {
        let c = g.collect().await?;
        let mut message = json!({"role": "assistant", "content": c.text});
        if reasoning {
            message["reasoning_content"] = if c.reasoning.is_empty() { json!(null) } else { json!(c.reasoning) };
        }
        if !c.tool_calls.is_empty() {
            message["tool_calls"] = c.tool_calls.iter().map(|t| call_json(t, None)).collect();
            if c.text.is_empty() {
                message["content"] = json!(null);
            }
        }
        let reason = finish(c.reason, !c.tool_calls.is_empty());
        let mut choice = json!({"index": 0, "message": message, "logprobs": null, "finish_reason": reason});
        if logprobs {
            choice["logprobs"] = json!({"content": c.tokens.iter().map(|t| logprob_entry(&st, t)).collect::<Vec<_>>()});
        }
        if with_ids {
            super::add_token_ids(&mut choice, &c);
        }
        return Ok(super::whole(&id, "chat.completion", created, &model, choice, &c));
    }
    let chunk = move |choice: Value| json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]});
    let chunks = Chunks { chunk, include_usage };
    let stream = async_stream(move |tx| async move {
        let role =
            json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
        if tx.send((chunks.chunk)(role)).await.is_err() {
            return;
        }
        let mut first = Some(std::mem::take(&mut g.prompt));
        let mut calls = 0;
        while let Some(p) = g.next().await {
            let mut choice = json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": null});
            match p {
                Ok(Piece::Token(t)) => {
                    choice["delta"] = delta(&t.reasoning, &t.text, &t.calls, &mut calls);
                    let quiet = t.reasoning.is_empty() && t.text.is_empty() && t.calls.is_empty();
                    let empty = quiet && !logprobs && !with_ids;
                    if logprobs {
                        choice["logprobs"] = json!({"content": [logprob_entry(&st, &t)]});
                    }
                    if with_ids {
                        choice["token_ids"] = json!([t.id]);
                        if let Some(p) = first.take() {
                            choice["prompt_token_ids"] = json!(p);
                        }
                    }
                    if empty {
                        continue;
                    }
                }
                Ok(Piece::Tail { text, reasoning, calls: new }) => {
                    choice["delta"] = delta(&reasoning, &text, &new, &mut calls);
                }
                Ok(done @ Piece::Done { reason, .. }) => {
                    choice["finish_reason"] = json!(finish(reason, calls > 0));
                    chunks.finish(&tx, choice, &done).await;
                    return;
                }
                Err(e) => return super::send_error(&tx, e).await,
            }
            if tx.send((chunks.chunk)(choice)).await.is_err() {
                return;
            }
        }
    });
    Ok(sse(stream, true))
}
