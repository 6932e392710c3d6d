//! Structured outputs: what a request's output must match (a JSON schema,
//! any JSON object, a regular expression, one of several strings, or a
//! Lark grammar), compiled by llguidance against the checkpoint's
//! tokenizer into a matcher that masks every sampling step of the request.
//!
//! The request fields are OpenAI's (`response_format`) and vLLM's
//! (`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`),
//! which Triton's vLLM backend also takes in `sampling_parameters`. JSON is
//! compact (no free whitespace) unless the schema sets llguidance's own
//! `x-guidance` options: free whitespace lets a weak model pad forever.

use super::GenerationError;
use expertmesh_model::tokenizer::TextTokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory, TokenParser};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// What a request's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Guide {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON schema (`json_schema`, `guided_json`).
    JsonSchema(Value),
    Regex(String),
    /// Exactly one of these strings (`guided_choice`).
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark dialect (`guided_grammar`).
    Grammar(String),
}

/// OpenAI's `response_format`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Debug, Clone, Deserialize)]
pub struct JsonSchemaFormat {
    pub name: Option<String>,
    pub schema: Option<Value>,
    pub strict: Option<bool>,
}

/// The structured-output fields of a request, every one optional; at most
/// one may be given.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Guided {
    pub response_format: Option<ResponseFormat>,
    /// A schema, or a string holding one (vLLM takes both).
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
}

impl Guided {
    /// The one guide asked for, if any.
    pub fn guide(self) -> Result<Option<Guide>, GenerationError> {
        let format = match self.response_format {
            None | Some(ResponseFormat::Text) => None,
            Some(ResponseFormat::JsonObject) => Some(Guide::JsonObject),
            Some(ResponseFormat::JsonSchema { json_schema }) => match json_schema.schema {
                Some(s) => Some(Guide::JsonSchema(s)),
                None => return Err(GenerationError::invalid("response_format", "json_schema.schema is required")),
            },
        };
        let json = match self.guided_json {
            Some(Value::String(s)) => Some(Guide::JsonSchema(
                serde_json::from_str(&s)
                    .map_err(|e| GenerationError::invalid("guided_json", format!("not JSON: {e}")))?,
            )),
            Some(v) => Some(Guide::JsonSchema(v)),
            None => None,
        };
        if self.guided_choice.as_ref().is_some_and(Vec::is_empty) {
            return Err(GenerationError::invalid("guided_choice", "give at least one choice"));
        }
        let all = [
            format,
            json,
            self.guided_regex.map(Guide::Regex),
            self.guided_choice.map(Guide::Choice),
            self.guided_grammar.map(Guide::Grammar),
        ];
        let mut given = all.into_iter().flatten();
        let first = given.next();
        if given.next().is_some() {
            return Err(GenerationError::invalid(
                "response_format",
                "give at most one of response_format (json), guided_json, guided_regex, guided_choice, guided_grammar",
            ));
        }
        Ok(first)
    }
}

/// Escapes `s` for a regular expression (regex-syntax's meta characters).
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Compact JSON unless the schema sets its own llguidance options.
pub(crate) fn compact(mut schema: Value) -> Value {
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance").or_insert_with(|| json!({"whitespace_flexible": false}));
    }
    schema
}

impl Guide {
    fn grammar(&self) -> TopLevelGrammar {
        match self {
            Guide::JsonObject => TopLevelGrammar::from_json_schema(compact(json!({"type": "object"}))),
            Guide::JsonSchema(s) => TopLevelGrammar::from_json_schema(compact(s.clone())),
            Guide::Regex(r) => TopLevelGrammar::from_regex(r),
            Guide::Choice(c) => {
                TopLevelGrammar::from_regex(&c.iter().map(|s| regex_escape(s)).collect::<Vec<_>>().join("|"))
            }
            Guide::Grammar(g) => TopLevelGrammar::from_lark(g.clone()),
        }
    }

    /// The field a compile error is reported against, and the cache key.
    fn field_and_key(&self) -> (&'static str, String) {
        match self {
            Guide::JsonObject => ("response_format", "object".into()),
            Guide::JsonSchema(s) => ("response_format", format!("schema:{s}")),
            Guide::Regex(r) => ("guided_regex", format!("regex:{r}")),
            Guide::Choice(c) => ("guided_choice", format!("choice:{c:?}")),
            Guide::Grammar(g) => ("guided_grammar", format!("lark:{g}")),
        }
    }
}

/// The checkpoint's tokenizer as llguidance sees it: every token's bytes
/// (read from `tokenizer.json` by llguidance itself) in a trie, with the
/// model's own tokenizer for the text it must tokenize.
struct Env {
    trie: TokTrie,
    tokenizer: Arc<TextTokenizer>,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| match self.tokenizer.encode(text) {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "tokenizing grammar text; the trie's greedy tokens are used");
                Vec::new()
            }
        })
    }
}

/// Grammars compiled are kept, by their text, up to this many.
const CACHE: usize = 64;

/// Compiles guides for one model, caching the compiled grammars.
pub struct Guidance {
    factory: ParserFactory,
    cache: Mutex<VecDeque<(String, TokenParser)>>,
}

impl Guidance {
    /// For the tokenizer in `dir` (its `tokenizer.json`), padded to the
    /// model's `vocab_size`, with the model's EOS tokens.
    pub fn new(dir: &Path, tokenizer: Arc<TextTokenizer>, vocab_size: usize, eos: &[u32]) -> Result<Self, String> {
        let path = dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&v).map_err(|e| format!("tokenizer.json: {e}"))?;
        if words.len() > vocab_size {
            return Err(format!("tokenizer.json has {} tokens, the model {vocab_size}", words.len()));
        }
        // Ids the tokenizer lacks (padding of the embedding) are special
        // tokens no grammar allows.
        while words.len() < vocab_size {
            let mut name = format!(".<[{}]>", words.len()).into_bytes();
            name[0] = TokTrie::SPECIAL_TOKEN_MARKER;
            words.push(name);
        }
        let info = TokRxInfo {
            vocab_size: vocab_size as u32,
            tok_eos: eos.first().copied().unwrap_or(0),
            tok_bos: None,
            tok_pad: None,
            tok_unk: None,
            tok_end_of_turn: None,
        };
        let mut trie = TokTrie::from(&info, &words);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(eos);
        }
        let env: TokEnv = Arc::new(Env { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| format!("llguidance: {e}"))?;
        factory.quiet();
        Ok(Guidance { factory, cache: Mutex::new(VecDeque::new()) })
    }

    /// A fresh matcher for `guide`; a guide that does not compile is a
    /// 400 naming the problem.
    pub fn matcher(&self, guide: &Guide) -> Result<Matcher, GenerationError> {
        let (field, key) = guide.field_and_key();
        let cached = {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache.iter().find(|(k, _)| *k == key).map(|(_, p)| p.clone())
        };
        let parser = match cached {
            Some(p) => p,
            None => {
                let p = self
                    .factory
                    .create_parser(guide.grammar())
                    .map_err(|e| GenerationError::invalid(field, format!("the grammar does not compile: {e}")))?;
                let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                if cache.len() == CACHE {
                    cache.pop_front();
                }
                cache.push_back((key, p.clone()));
                p
            }
        };
        let m = Matcher::new(Ok(parser));
        match m.get_error() {
            Some(e) => Err(GenerationError::invalid(field, format!("the grammar does not start: {e}"))),
            None => Ok(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guided(v: Value) -> Result<Option<Guide>, GenerationError> {
        serde_json::from_value::<Guided>(v).unwrap().guide()
    }

    #[test]
    fn request_fields_give_one_guide() {
        assert_eq!(guided(json!({})).unwrap(), None);
        assert_eq!(guided(json!({"response_format": {"type": "text"}})).unwrap(), None);
        assert_eq!(guided(json!({"response_format": {"type": "json_object"}})).unwrap(), Some(Guide::JsonObject));
        let s = json!({"type": "integer"});
        let rf = json!({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": s}}});
        assert_eq!(guided(rf).unwrap(), Some(Guide::JsonSchema(s.clone())));
        assert_eq!(guided(json!({"guided_json": "{\"type\": \"integer\"}"})).unwrap(), Some(Guide::JsonSchema(s)));
        assert!(guided(json!({"guided_json": "{nope"})).is_err());
        assert!(guided(json!({"guided_choice": []})).is_err());
        assert!(guided(json!({"guided_regex": "a+", "guided_choice": ["a"]})).is_err(), "two guides");
        assert!(serde_json::from_value::<Guided>(json!({"response_format": {"type": "xml"}})).is_err());
    }

    #[test]
    fn choices_are_escaped_literals() {
        assert_eq!(regex_escape("a.b(c)|d"), r"a\.b\(c\)\|d");
        assert_eq!(regex_escape("plain"), "plain");
    }
}
