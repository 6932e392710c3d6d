//! Text ↔ token ids with the checkpoint's `tokenizer.json`, and chat
//! templates from `tokenizer_config.json` rendered with minijinja.

use crate::error::{ModelError, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// One chat turn, as chat templates read it (OpenAI's fields).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant turn's calls: `{id, type, function: {name, arguments}}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<Value>,
    /// A `tool` turn: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into(), ..Default::default() }
    }
}

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: String,
    eos_token: String,
}

/// Turns a growing token sequence into text pieces as they become
/// decodable (a multi-byte character may span tokens).
///
/// Each step decodes only the tokens from `prefix` on, never the whole
/// sequence: `prefix..read` is context already emitted (decoders such as
/// byte-level BPE or SentencePiece need a little left context to place
/// spaces), `read..` is what is new.
#[derive(Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl IncrementalDecoder {
    /// Adds a token; returns the new text, if any is complete.
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Option<String> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read], true).ok()?;
        let now = tok.decode(&self.ids[self.prefix..], true).ok()?;
        if now.len() <= before.len() || now.ends_with('\u{fffd}') {
            return None; // nothing complete yet
        }
        // `get` never splits a character if a decoder rewrote the context.
        let new = now.get(before.len()..)?.to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        Some(new)
    }
}

/// `"tok"` or `{"content": "tok", …}` as tokenizer_config.json writes tokens.
fn token_string(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

impl TextTokenizer {
    /// The checkpoint's tokenizer: `None` when it has no `tokenizer.json`
    /// (the model then takes token ids only), an error naming the file when
    /// one is there but unreadable.
    pub fn open(dir: &Path) -> Result<Option<Self>> {
        if !dir.join("tokenizer.json").exists() {
            return Ok(None);
        }
        Self::from_dir(dir).map(Some)
    }

    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(ModelError::Tokenizer(format!("{} not found (pass token ids instead)", path.display())));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
            serde_json::from_str(&text).map_err(|e| ModelError::Tokenizer(format!("{}: {e}", cfg_path.display())))?
        } else {
            Value::Null
        };
        // A single template string, or a list of named templates ("default").
        let chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or(list.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        };
        Ok(TextTokenizer {
            inner,
            chat_template,
            bos_token: token_string(cfg.get("bos_token")),
            eos_token: token_string(cfg.get("eos_token")),
        })
    }

    /// Encodes text as is; special tokens written in the text are recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Renders the chat template as transformers' `apply_chat_template`
    /// (with `tokenize=False`) does.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.apply_chat_template_with_tools(messages, None, add_generation_prompt)
    }

    /// [`apply_chat_template`](Self::apply_chat_template) with the
    /// request's `tools` (OpenAI's function definitions) for templates that
    /// render them.
    pub fn apply_chat_template_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tpl = self
            .chat_template
            .as_deref()
            .ok_or_else(|| ModelError::Template("tokenizer_config.json has no chat_template".into()))?;
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_keep_trailing_newline(true);
        env.set_trim_blocks(false);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", tpl).map_err(|e| ModelError::Template(e.to_string()))?;
        let t = env.get_template("chat").map_err(|e| ModelError::Template(e.to_string()))?;
        t.render(minijinja::context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| ModelError::Template(e.to_string()))
    }
}
