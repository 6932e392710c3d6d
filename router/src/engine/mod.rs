//! The engine: one OS thread that owns the model and runs iteration-level
//! continuous batching.
//!
//! Every step it admits queued requests while the running batch and the
//! KV block pool allow ([`admission`]), gives each decoding sequence one
//! token and spends the rest of the per-step token budget on prefill
//! chunks, runs one forward pass over all of it, samples, and streams
//! tokens out. Requests join and leave at every step; a client that goes
//! away is dropped at the next step and its KV blocks freed. A prompt
//! whose leading blocks are in the prefix cache computes only its tail.
//! A request for prompt logprobs (scoring, perplexity through the API)
//! computes its whole prompt and takes every prompt row's logits. With
//! `--speculative mtp` decoding sequences also verify a drafted token each
//! step ([`speculate`]).

mod admission;
mod guided;
mod speculate;

use crate::generation::GenerationError;
use crate::metrics::Metrics;
use expertmesh_dataplane::trace;
use expertmesh_model::ModelError;
use expertmesh_model::cache::KvCache;
use expertmesh_model::generate::{Dist, FinishReason, Sampler, SamplingParams, top_logprobs};
use expertmesh_model::model::{Logits, Model, SeqChunk};
use llguidance::Matcher;
use rayon::iter::{IntoParallelRefMutIterator, ParallelIterator};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tokio::sync::mpsc;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most sequences in the running batch.
    pub max_num_seqs: usize,
    /// Most tokens (decode + prefill) in one forward step.
    pub max_batch_tokens: usize,

    /// Two concurrent micro-batches per step (`--micro-batches 2`).
    pub overlap: bool,
    /// MTP speculative decoding (`--speculative mtp`; the model has the module).
    pub speculative: bool,
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
    /// The prompt's tokens 1.. as the model scores them (the first has no
    /// context), once the prompt is computed, before any token; only when
    /// the request asked for prompt logprobs.
    Prompt(Vec<Scored>),
    Finished(FinishReason),
    Failed(ModelError),
}

/// A prompt token's log-probability and the likeliest alternatives there.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

pub struct Submit {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub ignore_eos: bool,
    /// Alternatives reported with each token (0: none).
    pub top_logprobs: usize,
    /// Score the prompt, with this many alternatives per token; with
    /// `max_tokens` 0 nothing is generated.
    pub prompt_logprobs: Option<usize>,
    /// Must hold `max_tokens + 3` events (see [`event_channel`]).
    pub events: mpsc::Sender<Event>,
    pub arrived: Instant,
    /// The request's trace id (see `expertmesh_dataplane::trace`).
    pub trace_id: String,
    /// Structured output: masks every sampled token.
    pub guide: Option<Matcher>,
}

/// A request's event channel, sized so the engine never waits on it.
pub fn event_channel(max_tokens: usize) -> (mpsc::Sender<Event>, mpsc::Receiver<Event>) {
    mpsc::channel(max_tokens + 3)
}

/// One planned sequence's step: its logits rows and its hidden rows (empty
/// unless speculating).
type Rows = (Vec<f32>, Vec<f32>);
type StepResult = Result<Rows, ModelError>;

struct Seq {
    /// The prompt, then every token generated so far.
    tokens: Vec<u32>,
    prompt_len: usize,
    generated: usize,
    /// Holds `tokens` but (while decoding) the last one; emptied when the
    /// sequence is preempted, and recomputed when it is readmitted.
    cache: KvCache,
    sampler: Sampler,
    max_tokens: usize,
    ignore_eos: bool,
    top_logprobs: usize,
    /// Alternatives per prompt token, when the prompt is scored.
    prompt_logprobs: Option<usize>,
    /// Prompt tokens 1.. scored so far (kept over a preemption).
    scored: Vec<Scored>,
    events: mpsc::Sender<Event>,
    arrived: Instant,
    last_token_at: Option<Instant>,
    trace_id: String,
    /// MTP speculation, when on (not for requests that score their prompt).
    spec: Option<speculate::Spec>,
    /// The grammar the output follows, and the mask of the next token
    /// (computed while the step's forward pass runs).
    guide: Option<guided::Grammar>,
}

impl Seq {
    /// Tokens to run before the next prediction: the prompt (or, after a
    /// preemption, everything) not yet cached, or the last sampled token.
    fn pending(&self) -> usize {
        // Saturating: a verifying step's cache holds the draft too.
        self.tokens.len().saturating_sub(self.cache.len())
    }

    fn decoding(&self) -> bool {
        self.generated > 0 && self.pending() == 1
    }

    /// Makes `row` the distribution this sequence samples from: masked in
    /// place by its grammar, if any (no copy of a vocabulary-wide row).
    fn guided(&mut self, row: &mut [f32]) -> Result<(), ModelError> {
        self.guide.as_mut().map_or(Ok(()), |g| g.mask(row))
    }

    /// Advances the grammar, if any, over the token chosen.
    fn advance(&mut self, tok: u32) -> Result<(), ModelError> {
        self.guide.as_mut().map_or(Ok(()), |g| g.advance(tok))
    }

    /// The draft to verify this step, if any (a decoding sequence only).
    fn draft(&self) -> Option<u32> {
        self.spec.as_ref().and_then(|sp| sp.draft.as_ref()).map(|d| d.0).filter(|_| self.decoding())
    }

    /// Still computing a prompt it must score: every row's logits are needed.
    fn scoring(&self) -> bool {
        self.prompt_logprobs.is_some() && self.scored.len() + 1 < self.prompt_len
    }

    /// Scores the prompt tokens that `rows` (the logits of the `rows.len() /
    /// vocab` tokens just computed) predict.
    fn score(&mut self, rows: &[f32], vocab: usize) {
        let n = rows.len() / vocab;
        let first = self.cache.len() - n;
        for (r, row) in rows.chunks_exact(vocab).enumerate() {
            // Row r predicts token first + r + 1.
            let t = first + r + 1;
            if t == self.scored.len() + 1 && t < self.prompt_len {
                let lse = expertmesh_model::ops::log_sum_exp(row);
                let logprob = (row[self.tokens[t] as usize] as f64 - lse) as f32;
                self.scored.push(Scored { logprob, top: top_logprobs(row, self.prompt_logprobs.unwrap_or(0)) });
            }
        }
    }
}

pub struct Engine {
    pub model: Model,
    pub cfg: EngineConfig,
    pub metrics: Arc<Metrics>,
    /// The I/O runtime, for waiting on the request queue with a timeout.
    pub rt: tokio::runtime::Handle,
    /// A placement is in use; until then requests wait in the queue.
    pub placed: Arc<AtomicBool>,
}

/// How often an idle engine marks a step boundary, so a staged placement is
/// applied (and acknowledged) without waiting for traffic.
const IDLE_TICK: std::time::Duration = std::time::Duration::from_millis(100);

/// The running batch and what waits to join it.
struct Batch {
    running: Vec<Seq>,
    /// Sequences preempted for KV room, readmitted first, oldest first.
    preempted: VecDeque<Seq>,
    /// A request taken from the queue that waits for KV-cache room.
    held: Option<Submit>,
    /// The queue still has senders.
    open: bool,
}

/// What one intake round found.
enum Intake {
    Work,
    /// Nothing to do this round (an idle tick, or no placement yet).
    Idle,
    /// The queue closed with nothing left to run.
    Closed,
}

impl Batch {
    fn waiting(&self, rx: &mpsc::Receiver<Submit>) -> usize {
        rx.len() + self.held.is_some() as usize + self.preempted.len()
    }

    /// A client that went away frees its slot and blocks now.
    fn drop_cancelled(&mut self) {
        self.running.retain(|s| !s.events.is_closed());
        self.preempted.retain(|s| !s.events.is_closed());
    }

    /// Removes finished sequences (their blocks go back to the pool).
    fn retire(&mut self, finished: &[bool]) {
        let mut i = 0;
        self.running.retain(|_| {
            i += 1;
            !finished[i - 1]
        });
    }
}

impl Engine {
    /// Runs until every sender of `rx` is dropped and the batch has drained.
    pub fn run(self, mut rx: mpsc::Receiver<Submit>) {
        let mut b = Batch { running: Vec::new(), preempted: VecDeque::new(), held: None, open: true };
        loop {
            match self.intake(&mut b, &mut rx) {
                Intake::Closed => return,
                Intake::Idle => continue,
                Intake::Work => {}
            }
            b.drop_cancelled();
            self.admit(&mut b, &mut rx);
            self.publish(b.running.len(), b.waiting(&rx));
            if b.running.is_empty() {
                if !b.open && b.held.is_none() && b.preempted.is_empty() {
                    return;
                }
                continue;
            }
            let plan = self.plan(&b.running);
            let plan = self.reserve(&mut b, plan);
            let results = self.traced_step(&mut b.running, &plan);
            // Before any token goes out, so a client holding one sees its
            // sequence's blocks in the gauges.
            self.metrics.observe_kv_pool(self.model.kv_pool());
            let finished = self.emit(&mut b.running, &plan, results);
            b.retire(&finished);
            if self.cfg.speculative {
                self.speculate(&mut b.running);
            }
            // Also after the step: when the batch empties, the loop blocks for
            // new work and the gauges must not keep showing the old batch.
            self.publish(b.running.len(), b.waiting(&rx));
        }
    }

    /// Blocks only when there is nothing else to do; before a placement is
    /// in use, requests stay queued (the placement is applied at the idle
    /// step boundary marked here).
    fn intake(&self, b: &mut Batch, rx: &mut mpsc::Receiver<Submit>) -> Intake {
        if !self.placed.load(Ordering::Acquire) {
            std::thread::sleep(IDLE_TICK);
            self.model.begin_step();
            self.publish(0, rx.len());
            if rx.is_closed() {
                while let Ok(s) = rx.try_recv() {
                    let e = ModelError::Unavailable("the router shut down before its first placement".into());
                    self.fail(&s.events, &s.trace_id, e);
                }
                return Intake::Closed;
            }
            return Intake::Idle;
        }
        if !b.running.is_empty() || b.held.is_some() || !b.preempted.is_empty() {
            return Intake::Work;
        }
        // The timer must be created inside the runtime's context.
        match self.rt.block_on(async { tokio::time::timeout(IDLE_TICK, rx.recv()).await }) {
            Ok(Some(s)) => {
                b.held = Some(s);
                Intake::Work
            }
            Ok(None) => Intake::Closed,
            Err(_) => {
                self.model.begin_step();
                Intake::Idle
            }
        }
    }

    /// A request refused at admission (the engine's own check), counted.
    fn fail(&self, events: &mpsc::Sender<Event>, trace_id: &str, e: ModelError) {
        self.metrics.errors.with_label_values(&[GenerationError::reason_of(&e)]).inc();
        tracing::debug!(%trace_id, error = %e, "request refused at admission");
        if events.try_send(Event::Failed(e)).is_err() {
            tracing::debug!(%trace_id, "the client left before its refusal");
        }
    }

    /// The step's work: decodes first (one token each), then prefill chunks
    /// from the remaining token budget, oldest request first. Returns
    /// `(seq index, tokens)`.
    fn plan(&self, running: &[Seq]) -> Vec<(usize, usize)> {
        let mut budget = self.cfg.max_batch_tokens.max(1);
        let mut plan = Vec::new();
        for (i, s) in running.iter().enumerate().filter(|(_, s)| s.decoding()) {
            if budget == 0 {
                break;
            }
            // The last token, and the draft after it when the budget allows.
            let n = if s.draft().is_some() && budget >= 2 { 2 } else { 1 };
            plan.push((i, n));
            budget -= n;
        }
        for (i, s) in running.iter().enumerate().filter(|(_, s)| !s.decoding()) {
            if budget == 0 {
                break;
            }
            let n = s.pending().min(budget);
            plan.push((i, n));
            budget -= n;
        }
        plan
    }

    /// [`Self::step`] under the step's own trace id, which goes to the
    /// expert nodes with every dispatch; the log line joins it to the
    /// requests' ids.
    fn traced_step(&self, running: &mut [Seq], plan: &[(usize, usize)]) -> Vec<StepResult> {
        let step_trace = trace::new_id();
        trace::set_step(&step_trace);
        if tracing::enabled!(tracing::Level::DEBUG) {
            let requests: Vec<&str> = plan.iter().map(|&(i, _)| running[i].trace_id.as_str()).collect();
            let tokens: usize = plan.iter().map(|&(_, n)| n).sum();
            tracing::debug!(trace_id = %step_trace, ?requests, tokens, "engine step");
        }
        // Lines logged during the step (failover, node errors) carry its id.
        let span = tracing::info_span!("step", trace_id = %step_trace);
        span.in_scope(|| self.step(running, plan))
    }

    /// Samples and streams each planned sequence's result; returns which
    /// sequences are done (finished, failed or abandoned).
    fn emit(&self, running: &mut [Seq], plan: &[(usize, usize)], results: Vec<StepResult>) -> Vec<bool> {
        let eos = &self.model.config().eos_token_ids;
        let mut finished = vec![false; running.len()];
        for ((i, n), res) in plan.iter().zip(results) {
            let s = &mut running[*i];
            let draft = s.spec.as_mut().and_then(|sp| sp.draft.take());
            let (mut logits, hidden) = match res {
                Ok(l) => l,
                Err(e) => {
                    finished[*i] = self.failed(s, e);
                    continue;
                }
            };
            // The draft ran as the sequence's second position.
            if let (true, Some(d)) = (s.cache.len() > s.tokens.len(), draft) {
                finished[*i] = self.verify(s, &mut logits, &hidden, d, eos);
                continue;
            }
            self.keep_rows(s, *n, &hidden);
            if *n > 1 || s.generated == 0 {
                self.metrics.prompt_tokens.inc_by(*n as u64);
            }
            let vocab = self.model.config().vocab_size;
            // A scoring sequence's rows are every position of its chunk, a
            // one-token chunk's included.
            if s.prompt_logprobs.is_some() {
                s.score(&logits, vocab);
            }
            if s.pending() > 0 {
                continue; // more prompt to go: these logits are not a prediction yet
            }
            if s.generated == 0 && s.prompt_logprobs.is_some() {
                finished[*i] = self.send_scores(s);
                if finished[*i] {
                    continue;
                }
            }
            let last = logits.len() - vocab;
            finished[*i] = self.sample(s, &mut logits[last..], eos);
        }
        finished
    }

    /// Sends the prompt's scores; true when the request is done (it wanted
    /// no tokens, or left).
    fn send_scores(&self, s: &mut Seq) -> bool {
        if s.events.try_send(Event::Prompt(std::mem::take(&mut s.scored))).is_err() {
            return true;
        }
        // Scored: later recomputation (a preemption) must not score again.
        s.prompt_logprobs = None;
        if s.max_tokens > 0 {
            return false;
        }
        self.metrics.e2e.observe(s.arrived.elapsed().as_secs_f64());
        tracing::info!(trace_id = %s.trace_id, prompt_tokens = s.prompt_len, completion_tokens = 0,
                       finish_reason = "length", "prompt scored");
        if s.events.try_send(Event::Finished(FinishReason::Length)).is_err() {
            tracing::debug!(trace_id = %s.trace_id, "the client left before the end");
        }
        true
    }

    /// Samples one token for `s` and sends it; true when `s` is done.
    fn sample(&self, s: &mut Seq, row: &mut [f32], eos: &[u32]) -> bool {
        if let Err(e) = s.guided(row) {
            return self.failed(s, e);
        }
        let (tok, logprob) = s.sampler.sample(row);
        if let Err(e) = s.advance(tok) {
            return self.failed(s, e);
        }
        self.send_token(s, tok, logprob, row, eos)
    }

    /// Fails `s` with `e` (counted and sent); true: it is done.
    fn failed(&self, s: &Seq, e: ModelError) -> bool {
        self.metrics.errors.with_label_values(&[GenerationError::reason_of(&e)]).inc();
        tracing::warn!(trace_id = %s.trace_id, error = %e, "request failed");
        if s.events.try_send(Event::Failed(e)).is_err() {
            tracing::debug!(trace_id = %s.trace_id, "the client left before the failure");
        }
        true
    }

    /// Verifies `s`'s draft against the step's two rows (the last token's,
    /// the draft's) and emits one token, or two when the draft holds; a
    /// rejected draft's position leaves the cache. A grammar masks the
    /// first row as it masked the draft (the same state), and advances only
    /// over verified tokens, so it never rolls back. True when `s` is done.
    fn verify(&self, s: &mut Seq, logits: &mut [f32], hidden: &[f32], (draft, q): (u32, Dist), eos: &[u32]) -> bool {
        let (v, h) = (self.model.config().vocab_size, self.model.config().hidden_size);
        let start = logits.len().saturating_sub(2 * v);
        let rows = &mut logits[start..];
        let (first, second) = rows.split_at_mut(rows.len().saturating_sub(v));
        if let Err(e) = s.guided(first) {
            return self.failed(s, e);
        }
        let (tok, accepted) = s.sampler.verify(first, draft, &q);
        if let Err(e) = s.advance(tok) {
            return self.failed(s, e);
        }
        let m = &self.metrics.spec;
        m.drafts.inc();
        m.draft_tokens.inc();
        // Rows of the last token and (when it holds) the draft.
        let first_pos = s.tokens.len() - 1;
        if accepted {
            m.accepted_tokens.inc();
        } else {
            s.cache.truncate(s.tokens.len());
        }
        let kept = if accepted { hidden.len() } else { h.min(hidden.len()) };
        if let Some(sp) = s.spec.as_mut()
            && !sp.push_rows(first_pos, &hidden[..kept], h)
        {
            s.spec = None;
        }
        let logprob = expertmesh_model::ops::log_softmax_at(first, tok as usize);
        if self.send_token(s, tok, logprob, first, eos) {
            return true;
        }
        accepted && self.sample(s, second, eos)
    }

    /// Hands a step's hidden rows (of its last `n` positions) to `s`'s
    /// speculation state.
    fn keep_rows(&self, s: &mut Seq, n: usize, hidden: &[f32]) {
        let Some(sp) = s.spec.as_mut() else { return };
        let first = s.cache.len() - n.min(s.cache.len());
        if !sp.push_rows(first, hidden, self.model.config().hidden_size) {
            tracing::debug!(trace_id = %s.trace_id, "speculation off: hidden rows out of step");
            s.spec = None;
        }
    }

    /// Sends token `tok` (`logits` is the row it came from); true when `s`
    /// is done (it finished, or its client left).
    fn send_token(&self, s: &mut Seq, tok: u32, logprob: f32, logits: &[f32], eos: &[u32]) -> bool {
        let now = Instant::now();
        match s.last_token_at {
            None => self.metrics.ttft.observe((now - s.arrived).as_secs_f64()),
            Some(t) => self.metrics.itl.observe((now - t).as_secs_f64()),
        }
        s.last_token_at = Some(now);
        s.generated += 1;
        s.tokens.push(tok);
        self.metrics.generation_tokens.inc();
        // The channel holds max_tokens + 2 events, so it is never full: a
        // slow client cannot stall the batch. An error means it left.
        let top = top_logprobs(logits, s.top_logprobs);
        if s.events.try_send(Event::Token { id: tok, logprob, top }).is_err() {
            return true;
        }
        // A complete grammar ends the output whatever the token.
        let stop = (!s.ignore_eos && eos.contains(&tok)) || s.guide.as_ref().is_some_and(|g| g.complete());
        if !stop && s.generated < s.max_tokens {
            return false;
        }
        let reason = if stop { FinishReason::Stop } else { FinishReason::Length };
        let e2e = s.arrived.elapsed().as_secs_f64();
        self.metrics.e2e.observe(e2e);
        tracing::info!(trace_id = %s.trace_id, prompt_tokens = s.prompt_len, completion_tokens = s.generated,
                       finish_reason = reason.as_str(), e2e_seconds = e2e, "request finished");
        if s.events.try_send(Event::Finished(reason)).is_err() {
            tracing::debug!(trace_id = %s.trace_id, "the client left before the end");
        }
        true
    }

    /// The batch's gauges; the pool's first, so a scraper that sees the
    /// request counts fall also sees the blocks they freed.
    fn publish(&self, running: usize, waiting: usize) {
        self.metrics.observe_kv_pool(self.model.kv_pool());
        self.metrics.requests_waiting.set(waiting as i64);
        self.metrics.requests_running.set(running as i64);
    }

    /// One forward pass over the plan. If the batched pass fails, each
    /// sequence is retried alone (the caches were rolled back), so only the
    /// requests that hit the failure see it.
    fn step(&self, running: &mut [Seq], plan: &[(usize, usize)]) -> Vec<StepResult> {
        self.model.begin_step();
        let inputs: Vec<Vec<u32>> = plan
            .iter()
            .map(|&(i, n)| {
                let s = &running[i];
                let (c, take) = (s.cache.len(), n.min(s.pending()));
                // A decoding sequence's second position is its draft.
                s.tokens[c..c + take].iter().copied().chain(s.draft().filter(|_| n > take)).collect()
            })
            .collect();
        // Each sequence's own rows: a scored prompt's every row does not
        // cost its batch-mates the LM head on all of theirs.
        let modes: Vec<Logits> = plan
            .iter()
            .map(|&(i, n)| match &running[i] {
                s if s.scoring() => Logits::All,
                // The last token's row and the draft's.
                s if n > s.pending() => Logits::Tail(2),
                _ => Logits::Last,
            })
            .collect();
        let mut by_index: Vec<Option<&mut Seq>> = running.iter_mut().map(Some).collect();
        let mut seqs: Vec<&mut Seq> = plan.iter().filter_map(|&(i, _)| by_index[i].take()).collect();
        let batched = {
            let (mut chunks, mut guides) = (Vec::with_capacity(seqs.len()), Vec::new());
            for (s, t) in seqs.iter_mut().zip(&inputs) {
                let Seq { cache, guide, .. } = &mut **s;
                chunks.push(SeqChunk { tokens: t, cache });
                guides.extend(guide.as_mut());
            }
            // Grammar masks beside the forward pass (they need only the
            // tokens so far), each a pool task: at a 129k vocabulary one
            // takes ~0.1 ms, and a batch's in a row could outlast a step.
            let (out, ()) = rayon::join(
                || self.forward(&mut chunks, &modes, self.cfg.overlap),
                || guides.par_iter_mut().for_each(|g| g.prepare()),
            );
            out
        };
        match batched {
            Ok(rows) => rows.into_iter().map(Ok).collect(),
            Err(_) if seqs.len() > 1 => seqs
                .iter_mut()
                .zip(&inputs)
                .zip(&modes)
                .map(|((s, t), m)| {
                    let mut one = [SeqChunk { tokens: t, cache: &mut s.cache }];
                    self.forward(&mut one, std::slice::from_ref(m), false).map(|mut v| v.remove(0))
                })
                .collect(),
            Err(e) => vec![Err(e)],
        }
    }

    /// One forward over `chunks`: per sequence its logits rows and, when
    /// speculating, its hidden rows (else empty).
    fn forward(&self, chunks: &mut [SeqChunk<'_>], modes: &[Logits], overlap: bool) -> Result<Vec<Rows>, ModelError> {
        let (logits, hidden) = self.model.forward_each(chunks, modes, overlap, self.cfg.speculative)?;
        if hidden.is_empty() {
            return Ok(logits.into_iter().map(|l| (l, Vec::new())).collect());
        }
        Ok(logits.into_iter().zip(hidden).collect())
    }
}
