//! Admission and preemption over the KV block pool.
//!
//! A request is admitted, in arrival order (preempted sequences first),
//! when the pool could give it the blocks of its prompt plus one, counting
//! idle prefix-cache blocks as free; its cache starts with the longest
//! cached prefix of the prompt. Decoding then takes blocks as it goes.
//! When a step's blocks cannot be had, the most recently admitted other
//! sequence is preempted: its blocks are freed and it waits, at the head of
//! the queue, to be recomputed from its prompt and the tokens it already
//! produced (which it does not send again), as vLLM's recompute preemption
//! does. A request that could not fit even alone is refused at admission.

use super::speculate::Spec;
use super::{Batch, Engine, Seq, Submit};
use expertmesh_model::ModelError;
use expertmesh_model::generate::{Sampler, check_request};
use tokio::sync::mpsc;

impl Engine {
    /// Blocks that `tokens` positions take.
    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.model.kv_pool().config().block_tokens)
    }

    /// A cache for `tokens`: from their longest cached prefix, or empty when
    /// the prompt is to be scored (cached positions would have no logits).
    fn cache_for(&self, tokens: &[u32], scoring: bool) -> expertmesh_model::cache::KvCache {
        if scoring { self.model.new_cache() } else { self.model.new_cache_for(tokens) }
    }

    /// Speculation state for a sequence (re)starting with `cached`
    /// positions, when speculation is on and it does not score its prompt.
    fn spec_for(&self, cached: usize, plain: bool) -> Option<Spec> {
        (self.cfg.speculative && plain).then(|| Spec::new(&self.model, cached)).flatten()
    }

    /// Admission while the batch and the block pool allow.
    pub(super) fn admit(&self, b: &mut Batch, rx: &mut mpsc::Receiver<Submit>) {
        while b.running.len() < self.cfg.max_num_seqs {
            if let Some(s) = b.preempted.front() {
                // The tokens it already has, plus the next one.
                if self.blocks_for(s.tokens.len() + 1) > self.model.kv_pool().available() {
                    break;
                }
                if let Some(mut s) = b.preempted.pop_front() {
                    s.cache = self.cache_for(&s.tokens, s.prompt_logprobs.is_some());
                    s.spec = self.spec_for(s.cache.len(), s.prompt_logprobs.is_none());
                    b.running.push(s);
                }
                continue;
            }
            let s = match b.held.take() {
                Some(s) => s,
                None if b.open => match rx.try_recv() {
                    Ok(s) => s,
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        b.open = false;
                        break;
                    }
                },
                None => break,
            };
            if s.events.is_closed() {
                continue;
            }
            let pool = self.model.kv_pool();
            let (whole, capacity) = (self.blocks_for(s.prompt.len() + s.max_tokens), pool.stats().capacity_blocks);
            if whole > capacity {
                let e = ModelError::InvalidInput(format!(
                    "request needs {whole} KV blocks ({} bytes) for its prompt and max_tokens; the budget holds {capacity}",
                    whole * pool.block_bytes()
                ));
                self.fail(&s.events, &s.trace_id, e);
                continue;
            }
            if self.blocks_for(s.prompt.len() + 1) > pool.available() {
                b.held = Some(s); // waits until running requests free blocks
                break;
            }
            // A scoring request (max_tokens 0) is checked as if for one token.
            if let Err(e) = check_request(&self.model, &s.prompt, s.max_tokens.max(1)) {
                self.fail(&s.events, &s.trace_id, e);
                continue;
            }
            let sampler = match Sampler::new(s.params) {
                Ok(x) => x,
                Err(e) => {
                    self.fail(&s.events, &s.trace_id, e);
                    continue;
                }
            };
            let cache = self.cache_for(&s.prompt, s.prompt_logprobs.is_some());
            b.running.push(Seq {
                spec: self.spec_for(cache.len(), s.prompt_logprobs.is_none()),
                guide: s.guide.map(super::guided::Grammar::new),
                cache,
                prompt_len: s.prompt.len(),
                tokens: s.prompt,
                generated: 0,
                sampler,
                max_tokens: s.max_tokens,
                ignore_eos: s.ignore_eos,
                top_logprobs: s.top_logprobs,
                prompt_logprobs: s.prompt_logprobs,
                scored: Vec::new(),
                events: s.events,
                arrived: s.arrived,
                last_token_at: None,
                trace_id: s.trace_id,
            });
        }
    }

    /// Takes the blocks the planned step needs, preempting the youngest
    /// other sequences while the pool is short; returns the plan of the
    /// sequences still running (indices into the new `running`).
    pub(super) fn reserve(&self, b: &mut Batch, plan: Vec<(usize, usize)>) -> Vec<(usize, usize)> {
        let mut out: Vec<bool> = vec![false; b.running.len()];
        for &(i, n) in &plan {
            while !out[i] {
                match b.running[i].cache.reserve(n) {
                    Ok(()) => break,
                    Err(e) => {
                        // The youngest sequence still in; the one asking only
                        // if no other is left.
                        let victim = (0..b.running.len()).rev().find(|&j| !out[j] && j != i).unwrap_or(i);
                        tracing::info!(trace_id = %b.running[victim].trace_id, error = %e,
                                       "preempted for KV blocks; it will be recomputed");
                        self.metrics.preemptions.inc();
                        out[victim] = true;
                        b.running[victim].cache = self.model.new_cache();
                        b.running[victim].spec = None;
                    }
                }
            }
        }
        // Out of the batch, at the head of the queue, oldest first.
        let mut kept = Vec::with_capacity(b.running.len());
        let mut index = vec![usize::MAX; b.running.len()];
        for (j, s) in std::mem::take(&mut b.running).into_iter().enumerate() {
            if out[j] {
                b.preempted.push_back(s);
            } else {
                index[j] = kept.len();
                kept.push(s);
            }
        }
        let preempted = b.preempted.make_contiguous();
        preempted.sort_by_key(|s| s.arrived);
        b.running = kept;
        plan.into_iter().filter(|&(i, _)| !out[i]).map(|(i, n)| (index[i], n)).collect()
    }
}
