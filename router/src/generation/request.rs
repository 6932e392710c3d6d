//! A generation request as every API describes it, and the checks that make
//! it one the engine can run: the model name, the prompt (text, token ids
//! or chat messages through the checkpoint's template), sampling, stop
//! strings and every limit (`--max-model-len`, `--max-tokens-limit`).

use super::GenerationError;
use crate::RouterState;
use expertmesh_model::generate::SamplingParams;
use expertmesh_model::tokenizer::ChatMessage;
use serde::Deserialize;

/// Most stop strings a request may give.
pub const MAX_STOP: usize = 16;
/// Most alternatives per token a request may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The prompt, in any of the forms the APIs accept.
#[derive(Debug, Clone)]
pub enum Prompt {
    Text(String),
    TokenIds(Vec<u32>),
    /// Rendered with the checkpoint's chat template (generation prompt added).
    Chat(Vec<ChatMessage>),
}

/// Sampling fields as the APIs send them, every one optional. The names
/// are OpenAI's and vLLM's (`top_k`), which Triton's vLLM backend also uses.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sampling {
    /// Default 1 (OpenAI's); 0 is greedy.
    pub temperature: Option<f32>,
    /// Default 1 (no nucleus filtering).
    pub top_p: Option<f32>,
    /// ≤ 0 or absent: no top-k filtering.
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    /// Completions per prompt; only 1 is served.
    pub n: Option<i64>,
}

impl Sampling {
    pub fn params(&self) -> Result<SamplingParams, GenerationError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(GenerationError::invalid("n", "only n=1 is supported"));
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

/// `stop`: a string or a list of strings (OpenAI's shape, also Triton's).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(s: Option<Stop>) -> Vec<String> {
        match s {
            None => vec![],
            Some(Stop::One(x)) => vec![x],
            Some(Stop::Many(v)) => v,
        }
    }
}

/// One generation, as an API adapter hands it to the core.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// The model the client named, if it named one.
    pub model: Option<String>,
    pub prompt: Prompt,
    pub sampling: Sampling,
    /// `None`: as many as the context allows, up to `--max-tokens-limit`
    /// (adapters apply their protocol's own default first).
    pub max_tokens: Option<i64>,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Alternatives reported with each token (0–20).
    pub top_logprobs: usize,
    /// Score the prompt too, with this many alternatives per token (0–20):
    /// OpenAI's `echo` with `logprobs`, vLLM's `prompt_logprobs`.
    pub prompt_logprobs: Option<usize>,
    /// Split DeepSeek-R1 reasoning from content (chat, with
    /// `--reasoning-parser deepseek_r1`).
    pub reasoning: bool,
    /// What the output must match (structured outputs).
    pub guide: Option<super::guide::Guide>,
    /// OpenAI's `tools`, for the chat template.
    pub tools: Option<serde_json::Value>,
    /// Parse tool calls out of the text in this format.
    pub tool_parser: Option<super::tools::ToolParserKind>,
    /// See `expertmesh_dataplane::trace`.
    pub trace_id: String,
}

impl GenerationRequest {
    /// A request with the defaults every field has.
    pub fn new(prompt: Prompt, trace_id: String) -> Self {
        GenerationRequest {
            model: None,
            prompt,
            sampling: Sampling::default(),
            max_tokens: None,
            stop: Vec::new(),
            ignore_eos: false,
            top_logprobs: 0,
            prompt_logprobs: None,
            reasoning: false,
            guide: None,
            tools: None,
            tool_parser: None,
            trace_id,
        }
    }
}

/// The served model, or not found for any other name.
pub fn check_model(st: &RouterState, model: Option<&str>) -> Result<(), GenerationError> {
    match model {
        Some(m) if m != st.served_model_name => Err(GenerationError::ModelNotFound(m.to_string())),
        _ => Ok(()),
    }
}

/// The prompt as token ids (a chat rendered with `tools`, if given).
pub fn prompt_ids(
    st: &RouterState,
    p: &Prompt,
    tools: Option<&serde_json::Value>,
) -> Result<Vec<u32>, GenerationError> {
    let tok = || {
        st.tokenizer.as_ref().ok_or_else(|| {
            GenerationError::invalid("prompt", "this model has no tokenizer.json; send the prompt as token ids")
        })
    };
    Ok(match p {
        Prompt::TokenIds(ids) => ids.clone(),
        Prompt::Text(text) => tok()?.encode(text)?,
        Prompt::Chat(messages) => {
            if messages.is_empty() {
                return Err(GenerationError::invalid("messages", "messages must not be empty"));
            }
            let t = tok()?;
            t.encode(&t.apply_chat_template_with_tools(messages, tools, true)?)?
        }
    })
}

/// The request's fields other than the prompt, checked.
pub fn check_fields(req: &GenerationRequest) -> Result<SamplingParams, GenerationError> {
    if req.stop.len() > MAX_STOP {
        return Err(GenerationError::invalid("stop", format!("at most {MAX_STOP} stop strings")));
    }
    if req.top_logprobs > MAX_TOP_LOGPROBS || req.prompt_logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
        return Err(GenerationError::invalid(
            "top_logprobs",
            format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"),
        ));
    }
    req.sampling.params()
}

/// The request's lengths against the router's limits; returns `max_tokens`,
/// which may be 0 only for a request that scores its prompt.
pub fn check_limits(
    st: &RouterState,
    prompt: usize,
    max_tokens: Option<i64>,
    scoring: bool,
) -> Result<usize, GenerationError> {
    let l = &st.limits;
    if prompt == 0 {
        return Err(GenerationError::invalid("prompt", "the prompt is empty"));
    }
    if prompt >= l.max_model_len {
        return Err(GenerationError::invalid(
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
        Some(0) if scoring => 0,
        Some(m) if m <= 0 => return Err(GenerationError::invalid("max_tokens", "max_tokens must be at least 1")),
        Some(m) => m as usize,
    };
    if m > l.max_tokens_limit {
        return Err(GenerationError::invalid(
            "max_tokens",
            format!("max_tokens is {m}; this server allows at most {}", l.max_tokens_limit),
        ));
    }
    if m > room {
        return Err(GenerationError::invalid(
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
