//! What the API adapters and the generation core share.

use crate::engine::Submit;
use crate::generation::GenerationError;
use crate::metrics::Metrics;
use expertmesh_model::config::ModelConfig;
use expertmesh_model::tokenizer::TextTokenizer;
use expertmesh_plumbing::listen::Listeners;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Request limits of the public APIs.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_model_len: usize,
    pub max_tokens_limit: usize,
    pub request_timeout: Option<Duration>,
}

pub struct RouterState {
    pub model_cfg: ModelConfig,
    pub model_name: String,
    /// The name the OpenAI and KServe APIs answer to.
    pub served_model_name: String,
    /// Unix time the router started (the models list's `created`).
    pub started: u64,
    pub limits: Limits,
    pub api_keys: Arc<Vec<String>>,
    pub reasoning_parser: bool,
    /// `--tool-call-parser`.
    pub tool_parser: Option<crate::generation::tools::ToolParserKind>,
    /// `--log-prompts`.
    pub log_prompts: bool,
    pub tokenizer: Option<Arc<TextTokenizer>>,
    /// Structured outputs, or why they are off (no tokenizer, or one
    /// llguidance cannot read).
    pub guidance: Result<Arc<crate::generation::guide::Guidance>, String>,
    pub metrics: Arc<Metrics>,
    /// Serving and not shutting down.
    pub accepting: AtomicBool,
    /// A placement is in use (with `--etcd`, false until the coordinator's
    /// first placement is applied; the engine admits nothing before).
    pub placed: Arc<AtomicBool>,
    /// The HTTP and gRPC servers; one that fails makes the router unready.
    pub listeners: Arc<Listeners>,
    /// Dropped at shutdown: the engine then drains and exits.
    pub submit: Mutex<Option<mpsc::Sender<Submit>>>,
}

/// With `--log-prompts`, logs a request's prompt under its trace id.
pub fn log_prompt(st: &RouterState, trace_id: &str, prompt: &[u32]) {
    if st.log_prompts {
        tracing::info!(%trace_id, ?prompt, "prompt");
    }
}

impl RouterState {
    /// Ready to generate: serving, every listener up, a placement in use.
    pub fn is_ready(&self) -> bool {
        self.accepting.load(Ordering::Acquire) && self.placed.load(Ordering::Acquire) && self.listeners.healthy()
    }

    /// Counts a refusal made before the core saw the request (an adapter's
    /// translation), and hands it back.
    pub fn refused(&self, e: GenerationError) -> GenerationError {
        self.metrics.errors.with_label_values(&[e.reason()]).inc();
        e
    }

    /// Queues a request. A full queue is refused; so is a router that is
    /// shutting down.
    pub fn submit(&self, s: Submit) -> Result<(), GenerationError> {
        let closing = || GenerationError::Unavailable("the router is shutting down".into());
        let tx = self.submit.lock().unwrap_or_else(|e| e.into_inner()).clone().ok_or_else(closing)?;
        tx.try_send(s).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => GenerationError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => closing(),
        })
    }

    /// Stops taking requests (running ones finish).
    pub fn close(&self) {
        self.accepting.store(false, Ordering::Release);
        self.submit.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}
