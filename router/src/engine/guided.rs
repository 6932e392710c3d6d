//! Structured outputs in the running batch: a guided sequence's next-token
//! mask is computed by its llguidance matcher while the step's forward pass
//! runs (the mask depends only on the tokens so far), then every token the
//! grammar forbids is set to −∞ before sampling, and the sampled token
//! advances the matcher. A grammar that is complete ends the sequence
//! (`stop`). Log-probabilities are those of the masked distribution, the
//! one the token was drawn from.

use expertmesh_model::ModelError;
use llguidance::Matcher;
use llguidance::toktrie::SimpleVob;

pub(super) struct Grammar {
    matcher: Matcher,
    /// The next token's mask, once computed.
    mask: Option<Result<SimpleVob, String>>,
}

impl Grammar {
    pub(super) fn new(matcher: Matcher) -> Self {
        Grammar { matcher, mask: None }
    }

    /// The next token's mask, computed unless it is known.
    fn next_mask(&mut self) -> &Result<SimpleVob, String> {
        let matcher = &mut self.matcher;
        self.mask.get_or_insert_with(|| matcher.compute_mask().map_err(|e| e.to_string()))
    }

    /// Computes the next token's mask unless it is known.
    pub(super) fn prepare(&mut self) {
        self.next_mask();
    }

    /// Sets every token the grammar forbids in `logits` to −∞, in place (the
    /// mask is kept until the grammar advances: a draft and its
    /// verification use the same one).
    pub(super) fn mask(&mut self, logits: &mut [f32]) -> Result<(), ModelError> {
        let mask = match self.next_mask() {
            Ok(m) => m,
            Err(e) => return Err(ModelError::InvalidInput(format!("structured output: {e}"))),
        };
        if mask.num_set() == 0 {
            return Err(ModelError::InvalidInput("structured output: the grammar allows no token here".into()));
        }
        mask.iter_unset_entries(|i| {
            if let Some(l) = logits.get_mut(i) {
                *l = f32::NEG_INFINITY;
            }
        });
        Ok(())
    }

    /// Advances the grammar over the sampled `tok`.
    pub(super) fn advance(&mut self, tok: u32) -> Result<(), ModelError> {
        self.mask = None;
        self.matcher.consume_token(tok).map_err(|e| ModelError::InvalidInput(format!("structured output: {e}")))
    }

    /// The grammar is complete: nothing may follow.
    pub(super) fn complete(&self) -> bool {
        self.matcher.is_stopped()
    }
}
