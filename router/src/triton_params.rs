//! Generation settings of the Triton-style text protocols (KServe's
//! `sampling_parameters` and request parameters, Triton's HTTP generate
//! extension), with the names Triton's vLLM backend uses.

use crate::generation::guide::Guided;
use crate::generation::{GenerationError, GenerationRequest, Prompt, Sampling, Stop};

#[derive(Debug, serde::Deserialize)]
pub struct TextParams {
    max_tokens: Option<i64>,
    #[serde(flatten)]
    sampling: Sampling,
    /// vLLM's `guided_*` (and `response_format`), as Triton's vLLM backend takes them.
    #[serde(flatten)]
    guided: Guided,
    stop: Option<Stop>,
    ignore_eos: Option<bool>,
}

impl TextParams {
    /// From a JSON object of parameters; `what` names them in the error.
    pub fn parse(fields: serde_json::Map<String, serde_json::Value>, what: &str) -> Result<Self, GenerationError> {
        serde_json::from_value(serde_json::Value::Object(fields))
            .map_err(|e| GenerationError::bad(format!("{what}: {e}")))
    }

    /// The request for `text`; `max_tokens` defaults to 16, as vLLM's.
    pub fn request(self, model: &str, text: String, trace_id: String) -> Result<GenerationRequest, GenerationError> {
        Ok(GenerationRequest {
            model: Some(model.to_string()),
            sampling: self.sampling,
            max_tokens: Some(self.max_tokens.unwrap_or(16)),
            stop: Stop::into_vec(self.stop),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            guide: self.guided.guide()?,
            ..GenerationRequest::new(Prompt::Text(text), trace_id)
        })
    }
}
