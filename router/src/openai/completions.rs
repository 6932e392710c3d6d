//! `POST /v1/completions`: a prompt as text or token ids, streamed or not.
//! `echo` returns the prompt before the completion and, with `logprobs`,
//! the prompt tokens' log-probabilities (the first has none: `null`), as
//! OpenAI's legacy API and vLLM do; with `max_tokens: 0` it only scores
//! the prompt, which is how lm-evaluation-harness and `expertmesh eval
//! --url` measure log-likelihood and perplexity.

use super::{ApiJson, Chunks, StreamOptions, async_stream, finish_str, now_secs, response_id, sse};
use crate::RouterState;
use crate::engine::Scored;
use crate::generation::guide::Guided;
use crate::generation::{self, GenerationError, GenerationRequest, Piece, Prompt, Sampling, Stop, TokenOut};
use axum::extract::State;
use axum::response::Response;
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
    /// `response_format` and vLLM's `guided_*`.
    #[serde(flatten)]
    pub guided: Guided,
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

fn prompt(p: PromptInput) -> Result<Prompt, GenerationError> {
    match p {
        PromptInput::Ids(ids) => Ok(Prompt::TokenIds(ids)),
        PromptInput::IdLists(mut v) if v.len() == 1 => Ok(Prompt::TokenIds(v.remove(0))),
        PromptInput::Text(t) => Ok(Prompt::Text(t)),
        PromptInput::Texts(mut v) if v.len() == 1 => Ok(Prompt::Text(v.remove(0))),
        _ => Err(GenerationError::invalid("prompt", "exactly one prompt per request is supported")),
    }
}

/// The wire request as the core's, with the `logprobs` count asked for.
fn translate(req: CompletionRequest, trace_id: String) -> Result<(GenerationRequest, Option<usize>), GenerationError> {
    let logprobs = match req.logprobs {
        None => None,
        Some(n @ 0..=20) => Some(n as usize),
        Some(_) => return Err(GenerationError::invalid("logprobs", "logprobs must be between 0 and 20")),
    };
    let g = GenerationRequest {
        model: req.model,
        sampling: req.sampling,
        max_tokens: Some(req.max_tokens.unwrap_or(16)),
        stop: Stop::into_vec(req.stop),
        ignore_eos: req.ignore_eos,
        top_logprobs: logprobs.unwrap_or(0),
        // Only a scored echo needs the prompt's logits: a plain echo is the
        // prompt's text, and scoring would bypass the prefix cache. An echo
        // of `max_tokens: 0` is a scoring-only request either way.
        prompt_logprobs: logprobs.or((req.max_tokens == Some(0)).then_some(0)).filter(|_| req.echo),
        guide: req.guided.guide()?,
        ..GenerationRequest::new(prompt(req.prompt)?, trace_id)
    };
    Ok((g, logprobs))
}

/// OpenAI's legacy completion logprobs, built token by token.
#[derive(Default)]
struct Logprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<Option<f32>>,
    top: Vec<Option<Map<String, Value>>>,
    offsets: Vec<usize>,
}

impl Logprobs {
    fn add(&mut self, st: &RouterState, t: &TokenOut, offset: usize) {
        self.push(st, t.id, Some((t.logprob, &t.top)), offset);
    }

    /// One token; `scored` is `None` for the prompt's first (no context).
    fn push(&mut self, st: &RouterState, id: u32, scored: Option<(f32, &[(u32, f32)])>, offset: usize) {
        self.tokens.push(super::token_text(st, id));
        self.token_logprobs.push(scored.map(|(lp, _)| lp));
        // Keyed by text, as OpenAI's format is: two tokens that decode alike
        // (partial UTF-8) share a key, and the likelier one keeps it.
        self.top.push(scored.map(|(_, alts)| {
            let mut top = Map::new();
            for (id, lp) in alts {
                top.entry(super::token_text(st, *id)).or_insert(json!(lp));
            }
            top
        }));
        self.offsets.push(offset);
    }

    /// The echoed prompt's tokens; returns the offset after them.
    fn add_prompt(&mut self, st: &RouterState, prompt: &[u32], scores: &[Scored]) -> usize {
        let mut offset = 0;
        for (i, &id) in prompt.iter().enumerate() {
            let scored = i.checked_sub(1).and_then(|j| scores.get(j)).map(|s| (s.logprob, s.top.as_slice()));
            self.push(st, id, scored, offset);
            offset += super::token_text(st, id).len();
        }
        offset
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

/// The echoed prompt: its text and, with `logprobs`, its tokens' scores.
fn echo(st: &RouterState, prompt: &[u32], scores: &[Scored], logprobs: Option<usize>) -> (String, Logprobs, usize) {
    let text = st.tokenizer.as_ref().and_then(|t| t.decode(prompt, false).ok()).unwrap_or_default();
    let mut lp = Logprobs::default();
    if logprobs.is_some() {
        lp.add_prompt(st, prompt, scores);
    }
    let offset = text.len();
    (text, lp, offset)
}

async fn run(st: Arc<RouterState>, req: CompletionRequest, trace_id: String) -> Result<Response, GenerationError> {
    let (stream, with_ids, echoed) = (req.stream, req.return_token_ids, req.echo);
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let (request, logprobs) = translate(req, trace_id).map_err(|e| st.refused(e))?;
    let mut g = generation::start(&st, request).await?;
    let (id, created, model) = (response_id("cmpl"), now_secs(), st.served_model_name.clone());
    if !stream {
        let c = g.collect().await?;
        let (mut text, mut lp, mut offset) = (String::new(), Logprobs::default(), 0);
        if echoed {
            (text, lp, offset) = echo(&st, &c.prompt, &c.prompt_scores, logprobs);
        }
        text += &c.text;
        let mut choice = json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish_str(c.reason)});
        if logprobs.is_some() {
            for t in &c.tokens {
                lp.add(&st, t, offset);
                offset += t.text.len();
            }
            choice["logprobs"] = lp.json();
        }
        if with_ids {
            super::add_token_ids(&mut choice, &c);
        }
        return Ok(super::whole(&id, "text_completion", created, &model, choice, &c));
    }
    let chunk = move |choice: Value| json!({"id": id, "object": "text_completion", "created": created, "model": model, "choices": [choice]});
    let chunks = Chunks { chunk, include_usage };
    let stream = async_stream(move |tx| async move {
        let mut first = Some(std::mem::take(&mut g.prompt));
        let mut offset = 0;
        if echoed && let Some(prompt) = &first {
            let (text, lp, end) = echo(&st, prompt, &std::mem::take(&mut g.prompt_scores), logprobs);
            offset = end;
            let lp = if logprobs.is_some() { lp.json() } else { Value::Null };
            let choice = json!({"index": 0, "text": text, "logprobs": lp, "finish_reason": null});
            if tx.send((chunks.chunk)(choice)).await.is_err() {
                return;
            }
        }
        while let Some(p) = g.next().await {
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
                Ok(Piece::Tail { text, .. }) => choice["text"] = json!(text),
                Ok(done @ Piece::Done { .. }) => {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scored(body: Value) -> Option<usize> {
        let req: CompletionRequest = serde_json::from_value(body).unwrap();
        translate(req, "t".into()).unwrap().0.prompt_logprobs
    }

    #[test]
    fn only_an_echo_with_logprobs_scores_the_prompt() {
        assert_eq!(scored(json!({"prompt": "a", "echo": true, "logprobs": 2})), Some(2));
        assert_eq!(scored(json!({"prompt": "a", "echo": true, "logprobs": 0})), Some(0));
        assert_eq!(scored(json!({"prompt": "a", "echo": true})), None);
        assert_eq!(scored(json!({"prompt": "a", "logprobs": 2})), None);
        assert_eq!(scored(json!({"prompt": "a", "echo": true, "max_tokens": 0})), Some(0));
        assert_eq!(scored(json!({"prompt": "a", "max_tokens": 0})), None);
    }
}
