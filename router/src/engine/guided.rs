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
        bar(mask, logits);
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

/// Sets `logits[i]` to −∞ for every token `mask` bars. Word by word, a
/// select per bit: inside a JSON string tens of thousands of a 129k
/// vocabulary's tokens are barred (every one holding a quote or a
/// newline), too many for a call per token.
fn bar(mask: &SimpleVob, logits: &mut [f32]) {
    for (chunk, &word) in logits.chunks_mut(32).zip(mask.as_slice()) {
        if word == u32::MAX {
            continue;
        }
        for (bit, l) in chunk.iter_mut().enumerate() {
            if word & (1 << bit) == 0 {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Exactly the barred tokens become −∞, the rest keep their value,
        /// whatever the vocabulary's length against the 32-bit words.
        #[test]
        fn only_barred_tokens_are_masked(allowed in proptest::collection::vec(any::<bool>(), 1..200)) {
            let mut mask = SimpleVob::alloc(allowed.len());
            for (i, _) in allowed.iter().enumerate().filter(|(_, a)| **a) {
                mask.allow_token(i as u32);
            }
            let mut logits: Vec<f32> = (0..allowed.len()).map(|i| i as f32).collect();
            bar(&mask, &mut logits);
            for (i, (l, a)) in logits.iter().zip(&allowed).enumerate() {
                prop_assert_eq!(*l, if *a { i as f32 } else { f32::NEG_INFINITY });
            }
        }
    }
}
