//! A running generation: the request checked and queued on the engine,
//! tokens decoded to text, stop strings and the reasoning split applied,
//! the request timeout enforced. The first engine event is awaited before
//! [`start`] returns, so a refusal (bad token ids, full queue, uncovered
//! experts) becomes a proper error status rather than a failed stream.

use super::GenerationError;
use super::guide::Guide;
use super::request::{GenerationRequest, check_fields, check_limits, check_model, prompt_ids};
use super::text::{ReasoningSplitter, StopMatcher};
use super::tools::{ToolCall, ToolEvent, ToolParser};
use crate::RouterState;
use crate::engine::{Event, Scored, Submit, event_channel};
use expertmesh_model::generate::FinishReason;
use expertmesh_model::tokenizer::{IncrementalDecoder, TextTokenizer};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

#[derive(Debug, Clone)]
pub struct TokenOut {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
    /// Text this token completes (may be empty: held for a stop string, an
    /// unfinished UTF-8 sequence or a reasoning marker).
    pub text: String,
    /// Reasoning text it completes (with the reasoning split on).
    pub reasoning: String,
    /// Tool calls it completes (with a tool-call parser on).
    pub calls: Vec<ToolCall>,
}

#[derive(Debug, Clone)]
pub enum Piece {
    Token(TokenOut),
    /// Text released at the end (held back while it could become a stop
    /// string or a reasoning marker).
    Tail {
        text: String,
        reasoning: String,
        /// Calls completed by the held-back text.
        calls: Vec<ToolCall>,
    },
    Done {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
}

/// A generation in progress. Dropping it cancels the request and frees its
/// KV cache.
pub struct Generation {
    /// The prompt's token ids.
    pub prompt: Vec<u32>,
    /// Prompt tokens 1.. scored, when the request asked (`prompt_logprobs`).
    pub prompt_scores: Vec<Scored>,
    pieces: mpsc::Receiver<Result<Piece, GenerationError>>,
}

/// A generation collected whole (the APIs' non-streaming answers).
#[derive(Debug, Clone)]
pub struct Completion {
    pub prompt: Vec<u32>,
    pub prompt_scores: Vec<Scored>,
    pub tokens: Vec<TokenOut>,
    pub text: String,
    pub reasoning: String,
    pub tool_calls: Vec<ToolCall>,
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

impl Generation {
    /// The next piece; after `Done` or an error, `None`.
    pub async fn next(&mut self) -> Option<Result<Piece, GenerationError>> {
        self.pieces.recv().await
    }

    /// Waits for the whole generation.
    pub async fn collect(mut self) -> Result<Completion, GenerationError> {
        let (mut tokens, mut text, mut reasoning) = (Vec::new(), String::new(), String::new());
        let mut tool_calls = Vec::new();
        while let Some(p) = self.next().await {
            match p? {
                Piece::Token(t) => {
                    text += &t.text;
                    reasoning += &t.reasoning;
                    tool_calls.extend(t.calls.iter().cloned());
                    tokens.push(t);
                }
                Piece::Tail { text: t, reasoning: r, calls } => {
                    text += &t;
                    reasoning += &r;
                    tool_calls.extend(calls);
                }
                Piece::Done { reason, prompt_tokens, completion_tokens } => {
                    let (prompt, prompt_scores) = (self.prompt, self.prompt_scores);
                    return Ok(Completion {
                        prompt,
                        prompt_scores,
                        tokens,
                        text,
                        reasoning,
                        tool_calls,
                        reason,
                        prompt_tokens,
                        completion_tokens,
                    });
                }
            }
        }
        Err(GenerationError::Unavailable("the generation ended early".into()))
    }
}

/// Checks and starts a generation. A refusal is counted in
/// `expertmesh_request_errors_total` once, whichever API it came through:
/// here for the core's own checks, by the engine for what it refuses.
pub async fn start(st: &Arc<RouterState>, req: GenerationRequest) -> Result<Generation, GenerationError> {
    let arrived = Instant::now();
    let (params, prompt, max_tokens) = check(st, &req).map_err(|e| st.refused(e))?;
    let guide = match req.guide.clone() {
        Some(g) => Some(compile(st, g).await.map_err(|e| st.refused(e))?),
        None => None,
    };
    crate::log_prompt(st, &req.trace_id, &prompt);
    let (events, mut rx) = event_channel(max_tokens);
    st.submit(Submit {
        prompt: prompt.clone(),
        params,
        max_tokens,
        ignore_eos: req.ignore_eos,
        top_logprobs: req.top_logprobs,
        prompt_logprobs: req.prompt_logprobs,
        events,
        arrived,
        trace_id: req.trace_id,
        guide,
    })
    .map_err(|e| st.refused(e))?;
    let clock = Clock::new(arrived, st.limits.request_timeout);
    let mut prompt_scores = Vec::new();
    let first = loop {
        match clock.next(&mut rx).await {
            Err(e) => return Err(st.refused(e)),
            Ok(Event::Failed(e)) => return Err(e.into()),
            // A scored prompt comes first, once; the answer starts after it.
            Ok(Event::Prompt(v)) => prompt_scores = v,
            Ok(ev) => break ev,
        }
    };
    let text = TextState {
        tok: st.tokenizer.clone(),
        decoder: IncrementalDecoder::default(),
        stops: StopMatcher::new(req.stop),
        splitter: req.reasoning.then(ReasoningSplitter::default),
        tools: req.tool_parser.map(ToolParser::new),
    };
    let (out, pieces) = mpsc::channel(64);
    tokio::spawn(relay(st.clone(), prompt.len(), first, rx, clock, text, out));
    Ok(Generation { prompt, prompt_scores, pieces })
}

/// A fresh matcher for `guide`, compiled (or taken from the cache) off the
/// async runtime.
async fn compile(st: &Arc<RouterState>, guide: Guide) -> Result<llguidance::Matcher, GenerationError> {
    let g = match &st.guidance {
        Ok(g) => g.clone(),
        Err(why) => {
            return Err(GenerationError::invalid("response_format", format!("structured outputs are off: {why}")));
        }
    };
    tokio::task::spawn_blocking(move || g.matcher(&guide))
        .await
        .map_err(|e| GenerationError::Internal(format!("compiling the grammar: {e}")))?
}

/// The request checked: sampling, the prompt's ids and `max_tokens`.
fn check(
    st: &RouterState,
    req: &GenerationRequest,
) -> Result<(expertmesh_model::generate::SamplingParams, Vec<u32>, usize), GenerationError> {
    check_model(st, req.model.as_deref())?;
    let params = check_fields(req)?;
    let prompt = prompt_ids(st, &req.prompt, req.tools.as_ref())?;
    let max_tokens = check_limits(st, prompt.len(), req.max_tokens, req.prompt_logprobs.is_some())?;
    Ok((params, prompt, max_tokens))
}

/// The request deadline (`--request-timeout`), from arrival.
struct Clock {
    deadline: tokio::time::Instant,
    timeout: Option<Duration>,
}

impl Clock {
    fn new(arrived: Instant, timeout: Option<Duration>) -> Self {
        let far = Duration::from_secs(365 * 86400);
        Clock { deadline: tokio::time::Instant::from_std(arrived + timeout.unwrap_or(far)), timeout }
    }

    async fn next(&self, rx: &mut mpsc::Receiver<Event>) -> Result<Event, GenerationError> {
        match tokio::time::timeout_at(self.deadline, rx.recv()).await {
            Ok(Some(ev)) => Ok(ev),
            Ok(None) => Err(GenerationError::Unavailable("the engine stopped".into())),
            Err(_) => Err(GenerationError::Timeout(self.timeout.map_or(0.0, |t| t.as_secs_f64()))),
        }
    }
}

/// Token ids to text: detokenized incrementally, stop strings matched,
/// reasoning split off.
struct TextState {
    tok: Option<Arc<TextTokenizer>>,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    splitter: Option<ReasoningSplitter>,
    tools: Option<ToolParser>,
}

impl TextState {
    /// `(reasoning, content)` of a piece of text.
    fn route(&mut self, text: &str) -> (String, String) {
        match &mut self.splitter {
            None => (String::new(), text.to_string()),
            Some(s) => s.push(text),
        }
    }

    /// Content split into text and tool calls (with a parser on).
    fn calls(&mut self, content: String, end: bool) -> (String, Vec<ToolCall>) {
        let Some(p) = &mut self.tools else { return (content, vec![]) };
        let mut events = p.push(&content);
        if end {
            events.extend(p.finish());
        }
        let (mut text, mut calls) = (String::new(), vec![]);
        for e in events {
            match e {
                ToolEvent::Content(c) => text += &c,
                ToolEvent::Call(c) => calls.push(c),
            }
        }
        (text, calls)
    }

    /// A token's reasoning, text and calls; `true` when it completed a
    /// stop string.
    fn token(&mut self, id: u32) -> (String, String, Vec<ToolCall>, bool) {
        let raw = self.tok.as_ref().and_then(|t| self.decoder.push(t, id)).unwrap_or_default();
        let (text, hit) = self.stops.push(&raw);
        let (reasoning, content) = self.route(&text);
        let (content, calls) = self.calls(content, false);
        (reasoning, content, calls, hit)
    }

    /// Everything held back, once the generation has ended.
    fn tail(&mut self, stopped: bool) -> (String, String, Vec<ToolCall>) {
        let held = if stopped { String::new() } else { self.stops.flush() };
        let (mut reasoning, content) = self.route(&held);
        if let Some(s) = &mut self.splitter {
            reasoning += &s.flush();
        }
        // A call cut off at the end is text.
        let (content, calls) = self.calls(content, true);
        (reasoning, content, calls)
    }
}

/// Turns engine events into pieces until the end, the deadline, or the
/// client going away (a failed send: dropping `rx` cancels the request).
async fn relay(
    st: Arc<RouterState>,
    prompt_tokens: usize,
    first: Event,
    mut rx: mpsc::Receiver<Event>,
    clock: Clock,
    mut text: TextState,
    out: mpsc::Sender<Result<Piece, GenerationError>>,
) {
    let mut generated = 0;
    let mut ev = Ok(first);
    let end = Ending { st: &st, out: &out, prompt_tokens };
    loop {
        match ev {
            Err(e) => return end.fail(st.refused(e)).await,
            // The engine counted its own failure.
            Ok(Event::Failed(e)) => return end.fail(e.into()).await,
            Ok(Event::Token { id, logprob, top }) => {
                generated += 1;
                let (reasoning, content, calls, hit) = text.token(id);
                let t = Piece::Token(TokenOut { id, logprob, top, text: content, reasoning, calls });
                if out.send(Ok(t)).await.is_err() {
                    return;
                }
                if hit {
                    // Returning drops `rx`: the engine cancels the rest.
                    return end.finish(&mut text, true, FinishReason::Stop, generated).await;
                }
            }
            Ok(Event::Finished(reason)) => return end.finish(&mut text, false, reason, generated).await,
            Ok(Event::Prompt(_)) => {
                return end.fail(GenerationError::Unavailable("the engine scored a prompt twice".into())).await;
            }
        }
        ev = clock.next(&mut rx).await;
    }
}

/// How a generation's piece stream ends.
struct Ending<'a> {
    st: &'a RouterState,
    out: &'a mpsc::Sender<Result<Piece, GenerationError>>,
    prompt_tokens: usize,
}

impl Ending<'_> {
    async fn fail(&self, e: GenerationError) {
        if self.out.send(Err(e)).await.is_err() {
            tracing::debug!("the client left before the error");
        }
    }

    /// The held-back tail, then `Done`; counts the success.
    async fn finish(&self, text: &mut TextState, stopped: bool, reason: FinishReason, generated: usize) {
        let (reasoning, content, calls) = text.tail(stopped);
        if (!reasoning.is_empty() || !content.is_empty() || !calls.is_empty())
            && self.out.send(Ok(Piece::Tail { text: content, reasoning, calls })).await.is_err()
        {
            return;
        }
        self.st.metrics.success.with_label_values(&[reason.as_str()]).inc();
        let done = Piece::Done { reason, prompt_tokens: self.prompt_tokens, completion_tokens: generated };
        if self.out.send(Ok(done)).await.is_err() {
            tracing::debug!("the client left before the last piece");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::tools::ToolParserKind;

    /// An R1 answer that thinks, then calls a tool, in pieces of every
    /// size: reasoning, content and the call come apart.
    #[test]
    fn reasoning_content_and_tool_calls_stay_apart() {
        let out = "Oslo is a city.</think>Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\":\"Oslo\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        let chars: Vec<char> = out.chars().collect();
        for n in [1, 2, 5, 13, chars.len()] {
            let mut t = TextState {
                tok: None,
                decoder: IncrementalDecoder::default(),
                stops: StopMatcher::new(vec![]),
                splitter: Some(ReasoningSplitter::default()),
                tools: Some(ToolParser::new(ToolParserKind::DeepseekV3)),
            };
            let (mut reasoning, mut content, mut calls) = (String::new(), String::new(), vec![]);
            for piece in chars.chunks(n).map(|c| c.iter().collect::<String>()) {
                let (r, c) = t.route(&piece);
                let (c, k) = t.calls(c, false);
                (reasoning, content) = (reasoning + &r, content + &c);
                calls.extend(k);
            }
            let (r, c, k) = t.tail(false);
            (reasoning, content) = (reasoning + &r, content + &c);
            calls.extend(k);
            assert_eq!((reasoning.as_str(), content.as_str()), ("Oslo is a city.", "Checking."), "pieces of {n}");
            assert_eq!(calls, vec![ToolCall { name: "get_weather".into(), arguments: r#"{"city":"Oslo"}"#.into() }]);
        }
    }
}
