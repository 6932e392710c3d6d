//! MTP speculative decoding in the running batch (`--speculative mtp`).
//!
//! A speculating sequence keeps the MTP module's own cache beside its KV
//! cache. After every step, one batched pass through the module enters the
//! hidden rows the step produced (entry j reads the main model's hidden
//! state at position j and token j + 1) and, for each sequence whose newest
//! token was just entered, drafts the token after it. The next step runs
//! the last token and the draft as two positions of that sequence; the
//! engine then verifies the draft with the sampler's rejection rule (exact
//! for greedy, distribution-preserving for sampling), emits one or two
//! tokens, and drops the draft's position from the cache when it was
//! rejected. Sequences in one batch accept different counts; the others
//! decode as usual. A sequence under a grammar drafts from the MTP logits
//! masked by the grammar's state after its last token, the same mask its
//! verification applies to the first row, and its grammar advances only
//! over verified tokens, so structured outputs speculate exactly too.
//!
//! The MTP cache starts at the position a request's prompt starts being
//! computed: positions taken from the prefix cache have no hidden states,
//! so the module attends over the computed part only. Drafts may be worse
//! there, never the output (every token is verified).

use super::{Engine, Seq};
use expertmesh_model::cache::KvCache;
use expertmesh_model::generate::Dist;
use expertmesh_model::model::Model;
use expertmesh_model::mtp::MtpChunk;

/// One sequence's speculation state.
pub(super) struct Spec {
    /// The MTP module's cache: entry i is main position `base + i`.
    cache: KvCache,
    base: usize,
    /// Final-norm hidden rows of the main positions from
    /// `base + cache.len()` on, not yet entered.
    hidden: Vec<f32>,
    /// The token drafted for the position after the last one, with the
    /// distribution it was drawn from.
    pub(super) draft: Option<(u32, Dist)>,
}

impl Spec {
    /// State for a sequence whose main cache holds `cached` positions.
    pub(super) fn new(model: &Model, cached: usize) -> Option<Spec> {
        match model.new_mtp_cache() {
            Ok(cache) => Some(Spec { cache, base: cached, hidden: Vec::new(), draft: None }),
            Err(e) => {
                tracing::warn!(error = %e, "speculation off for a request");
                None
            }
        }
    }

    /// Adds the hidden rows of main positions `first..`; false when they do
    /// not follow the rows held (the state is then unusable).
    pub(super) fn push_rows(&mut self, first: usize, rows: &[f32], hidden_size: usize) -> bool {
        if first != self.base + self.cache.len() + self.hidden.len() / hidden_size.max(1) {
            return false;
        }
        self.hidden.extend_from_slice(rows);
        true
    }
}

/// What one sequence gives the module this round.
struct Entry {
    seq: usize,
    /// Rows entered (and tokens after them).
    rows: usize,
    next: Vec<u32>,
}

impl Engine {
    /// The MTP pass after a step: enters what is known and drafts for every
    /// sequence that can take a draft. A failure turns speculation off for
    /// the sequences in the pass (they decode on without it).
    pub(super) fn speculate(&self, running: &mut [Seq]) {
        let h = self.model.config().hidden_size;
        let mut entries = Vec::new();
        for (i, s) in running.iter().enumerate() {
            let Some(sp) = &s.spec else { continue };
            let pos = sp.base + sp.cache.len();
            // Entry j needs token j + 1.
            let rows = (sp.hidden.len() / h).min(s.tokens.len().saturating_sub(pos + 1));
            if rows > 0 {
                entries.push(Entry { seq: i, rows, next: s.tokens[pos + 1..pos + 1 + rows].to_vec() });
            }
        }
        if entries.is_empty() {
            return;
        }
        let result = {
            let mut by_index: Vec<Option<&mut Seq>> = running.iter_mut().map(Some).collect();
            let mut chunks: Vec<MtpChunk<'_>> = Vec::with_capacity(entries.len());
            for e in &entries {
                if let Some(Some(sp)) = by_index[e.seq].take().map(|s| s.spec.as_mut()) {
                    chunks.push(MtpChunk { cache: &mut sp.cache, hidden: &sp.hidden[..e.rows * h], next: &e.next });
                }
            }
            self.model.mtp_forward(&mut chunks)
        };
        match result {
            Ok(guesses) => {
                for (e, mut guess) in entries.iter().zip(guesses) {
                    self.take_draft(&mut running[e.seq], e.rows * h, &mut guess);
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, sequences = entries.len(), "MTP pass failed; those requests go on without speculation");
                for e in &entries {
                    running[e.seq].spec = None;
                }
                self.metrics.spec.stopped.inc_by(entries.len() as u64);
            }
        }
    }

    /// Drops the entered rows and drafts when the sequence's newest token
    /// was entered and it has room for two more tokens.
    fn take_draft(&self, s: &mut Seq, entered: usize, guess: &mut [f32]) {
        let Some(sp) = s.spec.as_mut() else { return };
        sp.hidden.drain(..entered);
        let newest_entered = sp.base + sp.cache.len() + 1 == s.tokens.len();
        let room = s.generated > 0
            && s.generated + 1 < s.max_tokens
            && s.tokens.len() < self.model.config().max_position_embeddings
            && s.tokens.len() == s.cache.len() + 1;
        if !(newest_entered && room) {
            return;
        }
        // A grammar masks the draft as it will mask the token it guesses;
        // on a grammar error the sampling step reports it, with no draft.
        if s.guided(guess).is_ok() {
            let draft = s.sampler.draft(guess);
            if let Some(sp) = s.spec.as_mut() {
                sp.draft = Some(draft);
            }
        }
    }
}
