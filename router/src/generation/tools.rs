//! Tool calls in generated text, parsed into OpenAI's `tool_calls` as the
//! text streams (`--tool-call-parser`). Each parser follows its model's
//! published format:
//!
//! - `deepseek_v3` (DeepSeek-V3/R1's chat template):
//!   `<｜tool▁calls▁begin｜>` then, per call,
//!   `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>`,
//!   then `<｜tool▁calls▁end｜>`;
//! - `qwen3` (Qwen3's and Hermes' format): per call
//!   `<tool_call>\n{"name": NAME, "arguments": ARGS}\n</tool_call>`.
//!
//! Text outside the calls is content. A marker split across stream pieces
//! is held back until it is known not to be one; a call is emitted whole
//! once its end marker arrives (its arguments in one delta, which OpenAI
//! clients accept), and what is left unfinished at the end goes out as
//! content, so nothing the model wrote is lost.

use serde_json::Value;

/// Which format to parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ToolParserKind {
    #[value(name = "deepseek_v3")]
    DeepseekV3,
    #[value(name = "qwen3")]
    Qwen3,
}

/// One parsed call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as JSON text (OpenAI sends them as a string).
    pub arguments: String,
}

/// What a piece of text turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolEvent {
    Content(String),
    Call(ToolCall),
}

/// DeepSeek's markers.
pub const DS_CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
pub const DS_CALLS_END: &str = "<｜tool▁calls▁end｜>";
pub const DS_CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
pub const DS_CALL_END: &str = "<｜tool▁call▁end｜>";
pub const DS_SEP: &str = "<｜tool▁sep｜>";
const QWEN_BEGIN: &str = "<tool_call>";
const QWEN_END: &str = "</tool_call>";

/// A streaming parser of one response.
pub struct ToolParser {
    kind: ToolParserKind,
    buf: String,
    /// Inside a calls section (DeepSeek) or a call (Qwen3).
    inside: bool,
    /// The open marker is still in `buf` as text (no call of the section
    /// has been emitted).
    opened: bool,
    /// The section has given a well-formed call (else its end marker is
    /// content too).
    called: bool,
}

/// The longest suffix of `s` that is a proper prefix of `marker` (it may
/// become the marker when more text comes).
fn partial_suffix(s: &str, marker: &str) -> usize {
    (1..marker.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && marker.starts_with(&s[s.len() - n..]))
        .unwrap_or(0)
}

impl ToolParser {
    pub fn new(kind: ToolParserKind) -> Self {
        ToolParser { kind, buf: String::new(), inside: false, opened: false, called: false }
    }

    /// Removes `buf[..at + marker]` and returns `buf[..at]` (byte offsets).
    fn take(&mut self, at: usize, marker: usize) -> String {
        let head = self.buf[..at].to_string();
        self.buf.drain(..at + marker);
        head
    }

    fn open_marker(&self) -> &'static str {
        match self.kind {
            ToolParserKind::DeepseekV3 => DS_CALLS_BEGIN,
            ToolParserKind::Qwen3 => QWEN_BEGIN,
        }
    }

    /// Feeds the next piece of text; returns what is now known.
    pub fn push(&mut self, text: &str) -> Vec<ToolEvent> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            if !self.inside {
                let open = self.open_marker();
                match self.buf.find(open) {
                    Some(i) => {
                        let content = self.take(i, open.len());
                        if !content.is_empty() {
                            out.push(ToolEvent::Content(content));
                        }
                        (self.inside, self.opened, self.called) = (true, true, false);
                    }
                    None => {
                        let keep = partial_suffix(&self.buf, open);
                        let content: String = self.buf.drain(..self.buf.len() - keep).collect();
                        if !content.is_empty() {
                            out.push(ToolEvent::Content(content));
                        }
                        return out;
                    }
                }
            }
            match self.kind {
                ToolParserKind::DeepseekV3 => {
                    if !self.deepseek_step(&mut out) {
                        return out;
                    }
                }
                ToolParserKind::Qwen3 => {
                    let Some(end) = self.buf.find(QWEN_END) else { return out };
                    let body = self.take(end, QWEN_END.len());
                    out.push(qwen_call(&body));
                    self.inside = false;
                }
            }
        }
    }

    /// One DeepSeek call, or the end of the section; false when more text
    /// is needed.
    fn deepseek_step(&mut self, out: &mut Vec<ToolEvent>) -> bool {
        let trimmed = self.buf.trim_start();
        if trimmed.starts_with(DS_CALLS_END) {
            let skip = self.buf.len() - trimmed.len() + DS_CALLS_END.len();
            let end: String = self.buf.drain(..skip).collect();
            if !self.called {
                let open = if self.opened { DS_CALLS_BEGIN } else { "" };
                out.push(ToolEvent::Content(format!("{open}{end}")));
            }
            self.inside = false;
            return true;
        }
        let Some(end) = self.buf.find(DS_CALL_END) else { return false };
        let call = self.take(end, DS_CALL_END.len());
        let mut event = deepseek_call(&call);
        // A malformed first call is content with the section's marker.
        match &mut event {
            ToolEvent::Content(text) if self.opened => text.insert_str(0, DS_CALLS_BEGIN),
            ToolEvent::Content(_) => {}
            ToolEvent::Call(_) => self.called = true,
        }
        out.push(event);
        self.opened = false;
        true
    }

    /// The end of the text: anything unfinished is content.
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        let rest = std::mem::take(&mut self.buf);
        let rest = if self.inside && self.opened { format!("{}{rest}", self.open_marker()) } else { rest };
        self.inside = false;
        if rest.is_empty() { vec![] } else { vec![ToolEvent::Content(rest)] }
    }
}

/// `<｜tool▁call▁begin｜>TYPE<｜tool▁sep｜>NAME\n```json\nARGS\n```` (the end
/// marker removed); malformed calls are content.
fn deepseek_call(call: &str) -> ToolEvent {
    let parsed = (|| {
        let body = call.trim_start().strip_prefix(DS_CALL_BEGIN)?;
        let (_kind, rest) = body.split_once(DS_SEP)?;
        let (name, args) = rest.split_once('\n')?;
        let args = args.trim().strip_prefix("```json")?.strip_suffix("```")?.trim();
        serde_json::from_str::<Value>(args).ok()?;
        Some(ToolCall { name: name.trim().to_string(), arguments: args.to_string() })
    })();
    match parsed {
        Some(c) => ToolEvent::Call(c),
        None => ToolEvent::Content(format!("{call}{DS_CALL_END}")),
    }
}

/// `{"name": NAME, "arguments": ARGS}`; malformed calls are content.
fn qwen_call(body: &str) -> ToolEvent {
    let parsed = serde_json::from_str::<Value>(body.trim()).ok().and_then(|v| {
        let name = v.get("name")?.as_str()?.to_string();
        let args = v.get("arguments").cloned().unwrap_or(Value::Object(Default::default()));
        Some(ToolCall { name, arguments: args.to_string() })
    });
    match parsed {
        Some(c) => ToolEvent::Call(c),
        None => ToolEvent::Content(format!("{QWEN_BEGIN}{body}{QWEN_END}")),
    }
}

/// A Lark grammar (llguidance's dialect) that admits only well-formed
/// calls in `kind`'s markup to `functions` (name, parameters schema): one
/// or more calls (exactly one unless `parallel`), or with `only`, one call
/// to that function; each call's arguments are valid for its schema
/// (compact JSON).
pub fn call_grammar(kind: ToolParserKind, functions: &[(String, Value)], only: Option<&str>, parallel: bool) -> String {
    // A Lark string literal: JSON's quoting, which the dialect reads.
    let lit = |s: &str| Value::String(s.to_string()).to_string();
    // Arguments are an object whatever `parameters` says; compact JSON.
    let compact = |schema: &Value| {
        super::guide::compact(if schema.is_object() { schema.clone() } else { serde_json::json!({"type": "object"}) })
    };
    let mut rules = Vec::new();
    for (i, (name, params)) in functions.iter().filter(|(n, _)| only.is_none_or(|o| o == n)).enumerate() {
        rules.push(match kind {
            ToolParserKind::DeepseekV3 => format!(
                "fn_{i}: {} args_{i} {}\nargs_{i}: %json {}",
                lit(&format!("{DS_CALL_BEGIN}function{DS_SEP}{name}\n```json\n")),
                lit(&format!("\n```{DS_CALL_END}")),
                compact(params)
            ),
            ToolParserKind::Qwen3 => {
                let call = super::guide::compact(serde_json::json!({"type": "object",
                    "properties": {"name": {"const": name}, "arguments": compact(params)},
                    "required": ["name", "arguments"], "additionalProperties": false}));
                format!(
                    "fn_{i}: {} call_{i} {}\ncall_{i}: %json {call}",
                    lit(&format!("{QWEN_BEGIN}\n")),
                    lit(&format!("\n{QWEN_END}"))
                )
            }
        });
    }
    let names: Vec<String> = (0..rules.len()).map(|i| format!("fn_{i}")).collect();
    let calls = if only.is_none() && parallel { "call+" } else { "call" };
    let start = match kind {
        ToolParserKind::DeepseekV3 => format!("start: {} {calls} {}", lit(DS_CALLS_BEGIN), lit(DS_CALLS_END)),
        ToolParserKind::Qwen3 => format!("start: {calls}"),
    };
    format!("{start}\ncall: {}\n{}\n", names.join(" | "), rules.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every event of `text` fed in pieces of `n` characters, with adjacent
    /// content merged.
    fn parse(kind: ToolParserKind, text: &str, n: usize) -> Vec<ToolEvent> {
        let mut p = ToolParser::new(kind);
        let chars: Vec<char> = text.chars().collect();
        let mut events: Vec<ToolEvent> = chars.chunks(n).flat_map(|c| p.push(&c.iter().collect::<String>())).collect();
        events.extend(p.finish());
        let mut merged: Vec<ToolEvent> = Vec::new();
        for e in events {
            match (merged.last_mut(), e) {
                (Some(ToolEvent::Content(a)), ToolEvent::Content(b)) => a.push_str(&b),
                (_, e) => merged.push(e),
            }
        }
        merged
    }

    fn call(name: &str, arguments: &str) -> ToolEvent {
        ToolEvent::Call(ToolCall { name: name.into(), arguments: arguments.into() })
    }

    /// A DeepSeek-V3 response with two calls, as its template writes them.
    const DS: &str = "Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Tokyo\"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{\"zone\": \"JST\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";

    #[test]
    fn deepseek_calls_parse_whole_and_split_at_every_size() {
        let want = vec![
            ToolEvent::Content("Let me check.".into()),
            call("get_weather", r#"{"city": "Tokyo"}"#),
            call("get_time", r#"{"zone": "JST"}"#),
        ];
        for n in 1..=DS.chars().count() {
            assert_eq!(parse(ToolParserKind::DeepseekV3, DS, n), want, "pieces of {n} characters");
        }
    }

    #[test]
    fn qwen3_calls_parse_split_at_every_size() {
        let text = "Sure.\n<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}\n</tool_call>";
        let want = vec![ToolEvent::Content("Sure.\n".into()), call("add", r#"{"a":1,"b":2}"#)];
        for n in 1..=text.chars().count() {
            assert_eq!(parse(ToolParserKind::Qwen3, text, n), want, "pieces of {n}");
        }
    }

    /// Whether `grammar` admits `text` whole, byte by byte.
    fn admits(grammar: &str, text: &str) -> bool {
        use llguidance::toktrie::ApproximateTokEnv;
        let env = ApproximateTokEnv::single_byte_env();
        let factory = llguidance::ParserFactory::new_simple(&env).unwrap();
        let g = llguidance::api::TopLevelGrammar::from_lark(grammar.to_string());
        let mut m = llguidance::Matcher::new(factory.create_parser(g));
        assert_eq!(m.get_error(), None, "{grammar}");
        text.bytes()
            .all(|b| m.compute_mask().is_ok_and(|mask| mask.is_allowed(b as u32)) && m.consume_token(b as u32).is_ok())
            && m.is_accepting().unwrap_or(false)
    }

    #[test]
    fn call_grammars_admit_exactly_valid_calls() {
        let weather = serde_json::json!({"type": "object", "properties": {"city": {"type": "string"}},
                                         "required": ["city"], "additionalProperties": false});
        let fns = vec![("get_weather".to_string(), weather), ("get_time".to_string(), serde_json::json!({}))];
        let ds = call_grammar(ToolParserKind::DeepseekV3, &fns, None, true);
        let one = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\":\"Oslo\"}\n```<｜tool▁call▁end｜>";
        assert!(admits(&ds, &format!("{DS_CALLS_BEGIN}{one}{DS_CALLS_END}")));
        assert!(!admits(&ds, &format!("{DS_CALLS_BEGIN}{}{DS_CALLS_END}", one.replace("city", "town"))), "schema");
        assert!(!admits(&ds, &format!("{DS_CALLS_BEGIN}{}{DS_CALLS_END}", one.replace("get_weather", "nope"))));
        let named = call_grammar(ToolParserKind::DeepseekV3, &fns, Some("get_time"), true);
        let single = call_grammar(ToolParserKind::DeepseekV3, &fns, None, false);
        assert!(admits(&single, &format!("{DS_CALLS_BEGIN}{one}{DS_CALLS_END}")));
        assert!(!admits(&single, &format!("{DS_CALLS_BEGIN}{one}{one}{DS_CALLS_END}")), "parallel_tool_calls false");
        assert!(admits(&ds, &format!("{DS_CALLS_BEGIN}{one}{one}{DS_CALLS_END}")));
        assert!(!admits(&named, &format!("{DS_CALLS_BEGIN}{one}{DS_CALLS_END}")), "only the named function");
        let qwen = call_grammar(ToolParserKind::Qwen3, &fns, Some("get_weather"), true);
        assert!(admits(
            &qwen,
            "<tool_call>\n{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Oslo\"}}\n</tool_call>"
        ));
        // What the grammar admits, the parser reads back.
        let text = format!("{DS_CALLS_BEGIN}{one}{DS_CALLS_END}");
        assert_eq!(parse(ToolParserKind::DeepseekV3, &text, 7), vec![call("get_weather", r#"{"city":"Oslo"}"#)]);
    }

    #[test]
    fn text_without_calls_and_broken_calls_stay_content() {
        for kind in [ToolParserKind::DeepseekV3, ToolParserKind::Qwen3] {
            let plain = "No tools here: <tool and <｜tool▁sep";
            assert_eq!(parse(kind, plain, 3), vec![ToolEvent::Content(plain.into())]);
        }
        let unfinished = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{\"a\":";
        assert_eq!(parse(ToolParserKind::DeepseekV3, unfinished, 5), vec![ToolEvent::Content(unfinished.into())]);
        let bad = "<tool_call>not json</tool_call>";
        assert_eq!(parse(ToolParserKind::Qwen3, bad, 4), vec![ToolEvent::Content(bad.into())]);
        // A malformed first DeepSeek call keeps the section's marker.
        let broken = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\nnot json<｜tool▁call▁end｜> <｜tool▁calls▁end｜>after";
        let got: String = parse(ToolParserKind::DeepseekV3, broken, 7)
            .into_iter()
            .map(|e| match e {
                ToolEvent::Content(t) => t,
                ToolEvent::Call(c) => panic!("no call in {broken}: {c:?}"),
            })
            .collect();
        assert_eq!(got, broken);
    }
}
