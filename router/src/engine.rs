//! The engine: one OS thread that owns the model and runs iteration-level
//! continuous batching.
//!
//! Every step it admits queued requests while the running batch and the
//! KV-cache budget allow, gives each decoding sequence one token and spends
//! the rest of the per-step token budget on prefill chunks, runs one forward
//! pass over all of it, samples, and streams tokens out. Requests join and
//! leave at every step; a client that goes away is dropped at the next step
//! and its KV cache freed.

use crate::metrics::Metrics;
use expertmesh_dataplane::trace;
use expertmesh_model::ModelError;
use expertmesh_model::cache::KvCache;
use expertmesh_model::generate::{FinishReason, Sampler, SamplingParams, check_request, top_logprobs};
use expertmesh_model::model::{Logits, Model, SeqChunk};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most sequences in the running batch.
    pub max_num_seqs: usize,
    /// Most tokens (decode + prefill) in one forward step.
    pub max_batch_tokens: usize,
    /// KV-cache memory for all running sequences; each reserves its prompt
    /// plus `max_tokens` up front, so admitted requests never run out.
    pub kv_cache_bytes: usize,
    /// Two concurrent micro-batches per step (`--micro-batches 2`).
    pub overlap: bool,
}

/// What a request hears back, in order: tokens, then one `Finished` or `Failed`.
#[derive(Debug)]
pub enum Event {
    /// `top`: the `top_logprobs` most likely tokens at this step, if asked.
    Token {
        id: u32,
        logprob: f32,
        top: Vec<(u32, f32)>,
    },
    Finished(FinishReason),
    Failed(ModelError),
}

pub struct Submit {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub ignore_eos: bool,
    /// Alternatives reported with each token (0: none).
    pub top_logprobs: usize,
    /// Must hold `max_tokens + 2` events (see [`event_channel`]).
    pub events: mpsc::Sender<Event>,
    pub arrived: Instant,
    /// The request's trace id (see `expertmesh_dataplane::trace`).
    pub trace_id: String,
}

/// A request's event channel, sized so the engine never waits on it.
pub fn event_channel(max_tokens: usize) -> (mpsc::Sender<Event>, mpsc::Receiver<Event>) {
    mpsc::channel(max_tokens + 2)
}

struct Seq {
    prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    consumed: usize,
    generated: usize,
    last: Option<u32>,
    cache: KvCache,
    sampler: Sampler,
    max_tokens: usize,
    ignore_eos: bool,
    top_logprobs: usize,
    events: mpsc::Sender<Event>,
    reserved: usize,
    arrived: Instant,
    last_token_at: Option<Instant>,
    trace_id: String,
}

impl Seq {
    fn tokens_wanted(&self) -> usize {
        if self.consumed < self.prompt.len() { self.prompt.len() - self.consumed } else { 1 }
    }
}

pub struct Engine {
    pub model: Model,
    pub cfg: EngineConfig,
    pub metrics: Arc<Metrics>,
    /// The I/O runtime, for waiting on the request queue with a timeout.
    pub rt: tokio::runtime::Handle,
}

/// How often an idle engine marks a step boundary, so a staged placement is
/// applied (and acknowledged) without waiting for traffic.
const IDLE_TICK: std::time::Duration = std::time::Duration::from_millis(100);

impl Engine {
    /// Runs until every sender of `rx` is dropped and the batch has drained.
    pub fn run(self, mut rx: mpsc::Receiver<Submit>) {
        let per_token = KvCache::bytes_per_token(self.model.config());
        let eos = self.model.config().eos_token_ids.clone();
        let mut running: Vec<Seq> = Vec::new();
        let mut held: Option<Submit> = None;
        let mut kv_used = 0usize;
        let mut open = true;
        loop {
            // Intake: block only when there is nothing else to do.
            if running.is_empty() && held.is_none() {
                // The timer must be created inside the runtime's context.
                match self.rt.block_on(async { tokio::time::timeout(IDLE_TICK, rx.recv()).await }) {
                    Ok(Some(s)) => held = Some(s),
                    Ok(None) => return,
                    Err(_) => {
                        self.model.begin_step();
                        continue;
                    }
                }
            }
            // Admission, in arrival order, while the batch and KV budget allow.
            while running.len() < self.cfg.max_num_seqs {
                let s = match held.take() {
                    Some(s) => s,
                    None if open => match rx.try_recv() {
                        Ok(s) => s,
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    },
                    None => break,
                };
                if s.events.is_closed() {
                    continue;
                }
                let need = (s.prompt.len() + s.max_tokens) * per_token;
                if need > self.cfg.kv_cache_bytes {
                    let _ = s.events.try_send(Event::Failed(ModelError::InvalidInput(format!(
                        "request needs {need} bytes of KV cache; the budget is {}",
                        self.cfg.kv_cache_bytes
                    ))));
                    continue;
                }
                if kv_used + need > self.cfg.kv_cache_bytes {
                    held = Some(s); // waits until running requests free their cache
                    break;
                }
                if let Err(e) = check_request(&self.model, &s.prompt, s.max_tokens) {
                    let _ = s.events.try_send(Event::Failed(e));
                    continue;
                }
                let sampler = match Sampler::new(s.params) {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = s.events.try_send(Event::Failed(e));
                        continue;
                    }
                };
                kv_used += need;
                running.push(Seq {
                    prompt: s.prompt,
                    consumed: 0,
                    generated: 0,
                    last: None,
                    cache: self.model.new_cache(),
                    sampler,
                    max_tokens: s.max_tokens,
                    ignore_eos: s.ignore_eos,
                    top_logprobs: s.top_logprobs,
                    events: s.events,
                    reserved: need,
                    arrived: s.arrived,
                    last_token_at: None,
                    trace_id: s.trace_id,
                });
            }
            // Cancellation: a client that went away frees its slot now.
            running.retain(|s| {
                let keep = !s.events.is_closed();
                if !keep {
                    kv_used -= s.reserved;
                }
                keep
            });
            self.publish(running.len(), rx.len() + held.is_some() as usize, kv_used);
            if running.is_empty() {
                if !open && held.is_none() {
                    return;
                }
                continue;
            }
            // Plan the step: decodes first (one token each), then prefill
            // chunks from the remaining token budget, oldest request first.
            let mut budget = self.cfg.max_batch_tokens.max(1);
            let mut plan: Vec<(usize, usize)> = Vec::new(); // (seq index, tokens)
            for (i, _) in running.iter().enumerate().filter(|(_, s)| s.consumed == s.prompt.len()) {
                if budget == 0 {
                    break;
                }
                plan.push((i, 1));
                budget -= 1;
            }
            for (i, s) in running.iter().enumerate().filter(|(_, s)| s.consumed < s.prompt.len()) {
                if budget == 0 {
                    break;
                }
                let n = s.tokens_wanted().min(budget);
                plan.push((i, n));
                budget -= n;
            }
            // The step's trace id goes to the expert nodes with every dispatch;
            // this line joins it to the requests' ids.
            let step_trace = trace::new_id();
            trace::set_step(&step_trace);
            if tracing::enabled!(tracing::Level::DEBUG) {
                let requests: Vec<&str> = plan.iter().map(|&(i, _)| running[i].trace_id.as_str()).collect();
                let tokens: usize = plan.iter().map(|&(_, n)| n).sum();
                tracing::debug!(trace_id = %step_trace, ?requests, tokens, "engine step");
            }
            // Lines logged during the step (failover, node errors) carry its id.
            let span = tracing::info_span!("step", trace_id = %step_trace);
            let results = span.in_scope(|| self.step(&mut running, &plan));
            let mut finished = vec![false; running.len()];
            for ((i, n), res) in plan.iter().zip(results) {
                let s = &mut running[*i];
                let logits = match res {
                    Ok(l) => l,
                    Err(e) => {
                        self.metrics.errors.with_label_values(&[error_reason(&e)]).inc();
                        tracing::warn!(trace_id = %s.trace_id, error = %e, "request failed");
                        let _ = s.events.try_send(Event::Failed(e));
                        finished[*i] = true;
                        continue;
                    }
                };
                let prefill = s.consumed < s.prompt.len();
                if prefill {
                    s.consumed += n;
                    self.metrics.prompt_tokens.inc_by(*n as u64);
                    if s.consumed < s.prompt.len() {
                        continue; // more prompt to go: these logits are not a prediction yet
                    }
                }
                let (tok, logprob) = s.sampler.sample(&logits);
                let now = Instant::now();
                match s.last_token_at {
                    None => self.metrics.ttft.observe((now - s.arrived).as_secs_f64()),
                    Some(t) => self.metrics.itl.observe((now - t).as_secs_f64()),
                }
                s.last_token_at = Some(now);
                s.generated += 1;
                s.last = Some(tok);
                self.metrics.generation_tokens.inc();
                // The channel holds max_tokens + 2 events, so it is never full:
                // a slow client cannot stall the batch. An error means it left.
                let top = top_logprobs(&logits, s.top_logprobs);
                if s.events.try_send(Event::Token { id: tok, logprob, top }).is_err() {
                    finished[*i] = true;
                    continue;
                }
                let stop = !s.ignore_eos && eos.contains(&tok);
                if stop || s.generated == s.max_tokens {
                    let reason = if stop { FinishReason::Stop } else { FinishReason::Length };
                    self.metrics.success.with_label_values(&[reason.as_str()]).inc();
                    let e2e = s.arrived.elapsed().as_secs_f64();
                    self.metrics.e2e.observe(e2e);
                    tracing::info!(trace_id = %s.trace_id, prompt_tokens = s.prompt.len(), completion_tokens = s.generated,
                                   finish_reason = reason.as_str(), e2e_seconds = e2e, "request finished");
                    let _ = s.events.try_send(Event::Finished(reason));
                    finished[*i] = true;
                }
            }
            let mut i = 0;
            running.retain(|s| {
                let done = finished[i];
                i += 1;
                if done {
                    kv_used -= s.reserved;
                }
                !done
            });
            // Also after the step: when the batch empties, the loop blocks for
            // new work and the gauges must not keep showing the old batch.
            self.publish(running.len(), rx.len() + held.is_some() as usize, kv_used);
        }
    }

    fn publish(&self, running: usize, waiting: usize, kv_used: usize) {
        self.metrics.requests_running.set(running as i64);
        self.metrics.requests_waiting.set(waiting as i64);
        self.metrics.kv_usage.set(kv_used as f64 / self.cfg.kv_cache_bytes.max(1) as f64);
    }

    /// One forward pass over the plan. If the batched pass fails, each
    /// sequence is retried alone (the caches were rolled back), so only the
    /// requests that hit the failure see it.
    fn step(&self, running: &mut [Seq], plan: &[(usize, usize)]) -> Vec<Result<Vec<f32>, ModelError>> {
        self.model.begin_step();
        let inputs: Vec<Vec<u32>> = plan
            .iter()
            .map(|&(i, n)| {
                let s = &running[i];
                if s.consumed < s.prompt.len() {
                    s.prompt[s.consumed..s.consumed + n].to_vec()
                } else {
                    s.last.into_iter().collect()
                }
            })
            .collect();
        let mut by_index: Vec<Option<&mut Seq>> = running.iter_mut().map(Some).collect();
        let mut seqs: Vec<&mut Seq> = plan.iter().filter_map(|&(i, _)| by_index[i].take()).collect();
        let batched = {
            let mut chunks: Vec<SeqChunk<'_>> =
                seqs.iter_mut().zip(&inputs).map(|(s, t)| SeqChunk { tokens: t, cache: &mut s.cache }).collect();
            if self.cfg.overlap {
                self.model.forward_overlapped(&mut chunks, Logits::Last)
            } else {
                self.model.forward(&mut chunks, Logits::Last)
            }
        };
        match batched {
            Ok(l) => l.into_iter().map(Ok).collect(),
            Err(_) if seqs.len() > 1 => seqs
                .iter_mut()
                .zip(&inputs)
                .map(|(s, t)| {
                    self.model
                        .forward(&mut [SeqChunk { tokens: t, cache: &mut s.cache }], Logits::Last)
                        .map(|mut v| v.remove(0))
                })
                .collect(),
            Err(e) => vec![Err(e)],
        }
    }
}

pub fn error_reason(e: &ModelError) -> &'static str {
    match e {
        ModelError::InvalidInput(_) => "invalid_request",
        ModelError::Unavailable(_) => "unavailable",
        ModelError::Numerical(_) => "numerical",
        _ => "internal",
    }
}
