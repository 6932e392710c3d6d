//! OpenAI tool calling on `/v1/chat/completions`: `tools` and
//! `tool_choice` checked and turned into what the core needs (the
//! definitions for the chat template, the router's `--tool-call-parser`,
//! and for `required` or a named function a grammar that admits only a
//! valid call), and parsed calls back into `tool_calls`.

use crate::RouterState;
use crate::generation::GenerationError;
use crate::generation::guide::Guide;
use crate::generation::tools::{ToolCall, ToolParserKind, call_grammar};
use serde::Deserialize;
use serde_json::{Value, json};

/// One entry of `tools`.
#[derive(Debug, Clone, Deserialize)]
pub struct ToolDef {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionDef,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FunctionDef {
    pub name: String,
    pub description: Option<String>,
    pub parameters: Option<Value>,
}

/// `tool_choice`: `"none"`, `"auto"`, `"required"` or a named function.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ToolChoice {
    Mode(String),
    Named { function: NamedFunction },
}

#[derive(Debug, Clone, Deserialize)]
pub struct NamedFunction {
    pub name: String,
}

/// What a request's tools become.
#[derive(Debug, Default)]
pub struct ToolPlan {
    /// `tools` for the chat template (none with `tool_choice: "none"`).
    pub defs: Option<Value>,
    pub parser: Option<ToolParserKind>,
    /// The grammar of `required` or a named function.
    pub guide: Option<Guide>,
}

fn bad(message: impl Into<String>) -> GenerationError {
    GenerationError::invalid("tools", message)
}

/// Checks `tools` and `tool_choice` (OpenAI's rules: names of 1–64 of
/// `[a-zA-Z0-9_-]`, unique; a named choice must be among them).
/// `parallel`: OpenAI's `parallel_tool_calls` (false: at most one call).
pub fn plan(
    st: &RouterState,
    tools: Option<Vec<ToolDef>>,
    choice: Option<ToolChoice>,
    parallel: bool,
) -> Result<ToolPlan, GenerationError> {
    let Some(tools) = tools.filter(|t| !t.is_empty()) else {
        return match choice {
            None => Ok(ToolPlan::default()),
            Some(ToolChoice::Mode(m)) if m == "none" || m == "auto" => Ok(ToolPlan::default()),
            Some(_) => Err(GenerationError::invalid("tool_choice", "tool_choice needs tools")),
        };
    };
    let mut functions = Vec::with_capacity(tools.len());
    for t in &tools {
        let n = &t.function.name;
        if t.kind != "function" {
            return Err(bad(format!("tool type {:?} is not supported (only \"function\")", t.kind)));
        }
        if n.is_empty() || n.len() > 64 || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(bad(format!("function name {n:?} must be 1-64 of a-z, A-Z, 0-9, _ and -")));
        }
        if functions.iter().any(|(m, _)| m == n) {
            return Err(bad(format!("function {n:?} is defined twice")));
        }
        functions.push((n.clone(), t.function.parameters.clone().unwrap_or_else(|| json!({"type": "object"}))));
    }
    let only = match &choice {
        None => None,
        Some(ToolChoice::Mode(m)) if m == "auto" => None,
        Some(ToolChoice::Mode(m)) if m == "none" => return Ok(ToolPlan::default()),
        Some(ToolChoice::Mode(m)) if m == "required" => Some(None),
        Some(ToolChoice::Mode(m)) => {
            return Err(GenerationError::invalid("tool_choice", format!("unknown tool_choice {m:?}")));
        }
        Some(ToolChoice::Named { function }) => match functions.iter().find(|(n, _)| *n == function.name) {
            Some((n, _)) => Some(Some(n.clone())),
            None => {
                return Err(GenerationError::invalid(
                    "tool_choice",
                    format!("tool_choice names {:?}, which is not among the tools", function.name),
                ));
            }
        },
    };
    let Some(parser) = st.tool_parser else {
        return Err(bad("this router parses no tool calls; start it with --tool-call-parser"));
    };
    let defs = serde_json::to_value(tools.iter().map(tool_json).collect::<Vec<_>>()).map_err(|e| bad(e.to_string()))?;
    let guide = only.map(|o| Guide::Grammar(call_grammar(parser, &functions, o.as_deref(), parallel)));
    Ok(ToolPlan { defs: Some(defs), parser: Some(parser), guide })
}

/// A tool as chat templates read it (OpenAI's shape).
fn tool_json(t: &ToolDef) -> Value {
    let mut f = json!({"name": t.function.name, "parameters": t.function.parameters.clone().unwrap_or(json!({}))});
    if let Some(d) = &t.function.description {
        f["description"] = json!(d);
    }
    json!({"type": "function", "function": f})
}

/// A call in OpenAI's shape; a streamed one carries `index`, its place in
/// the response.
pub fn call_json(c: &ToolCall, index: Option<usize>) -> Value {
    let mut v = json!({"id": super::response_id("call"), "type": "function",
                       "function": {"name": c.name, "arguments": c.arguments}});
    if let Some(i) = index {
        v["index"] = json!(i);
    }
    v
}
