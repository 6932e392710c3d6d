//! Perplexity over a long text with sliding windows, as transformers'
//! perplexity guide computes it (and llama.cpp's `llama-perplexity` with a
//! stride): each window of at most `context` positions starts with BOS (when
//! the model has one) and every token is scored exactly once, by the first
//! window that holds it after the previous window's end, so with a stride
//! below the context each scored token sees at least `context - stride`
//! tokens before it.
//!
//! The scorer is a closure from a window's tokens to the log-probability of
//! each token after the first given those before it, so the same windows
//! run offline ([`perplexity_offline`], from the logits) and through a
//! router (the CLI's `eval --url`, from the API's prompt logprobs).

use crate::model::{Logits, Model, SeqChunk};
use crate::ops::log_sum_exp;
use crate::{ModelError, Result};

/// One window: tokens `begin..end` of the text (after BOS), of which
/// `score_from..end` are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub begin: usize,
    pub end: usize,
    pub score_from: usize,
}

/// The windows over `n` tokens: `context` positions each (BOS included when
/// `bos`), starts `stride` apart, until the text's end is covered.
pub fn windows(n: usize, context: usize, stride: usize, bos: bool) -> Result<Vec<Window>> {
    let span = context.saturating_sub(usize::from(bos));
    if span == 0 || stride == 0 || stride > span {
        return Err(ModelError::InvalidInput(format!(
            "stride must be in 1..={span} (the context {context} minus BOS), got {stride}"
        )));
    }
    let (mut out, mut begin, mut prev_end) = (Vec::new(), 0, 0);
    while prev_end < n {
        let end = (begin + span).min(n);
        out.push(Window { begin, end, score_from: prev_end.max(begin) });
        prev_end = end;
        begin += stride;
    }
    Ok(out)
}

/// The result: `exp(nll / tokens)`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Perplexity {
    /// Tokens scored (every token of the text; the very first is predicted
    /// from BOS alone, or skipped when the model has no BOS).
    pub tokens: usize,
    /// Their summed negative log-likelihood, in nats.
    pub nll: f64,
    pub windows: usize,
    pub perplexity: f64,
}

/// Scores `ids` window by window; `logprobs(input)` must return
/// `input.len() - 1` values, entry i being log p(input[i + 1] | input[..=i]).
pub fn perplexity(
    ids: &[u32],
    bos: Option<u32>,
    context: usize,
    stride: usize,
    mut logprobs: impl FnMut(&[u32]) -> Result<Vec<f64>>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Perplexity> {
    let ws = windows(ids.len(), context, stride, bos.is_some())?;
    let (mut nll, mut tokens) = (0f64, 0usize);
    for (wi, w) in ws.iter().enumerate() {
        let input: Vec<u32> = bos.into_iter().chain(ids[w.begin..w.end].iter().copied()).collect();
        let lp = logprobs(&input)?;
        if lp.len() + 1 != input.len() {
            return Err(ModelError::Executor(format!(
                "scorer returned {} log-probabilities for {} tokens",
                lp.len(),
                input.len()
            )));
        }
        // Text token j sits at input position j - begin + offset, and is
        // entry (position - 1) of the scores.
        let offset = usize::from(bos.is_some());
        for j in w.score_from..w.end {
            let Some(p) = (j - w.begin + offset).checked_sub(1) else { continue };
            nll -= lp[p];
            tokens += 1;
        }
        progress(wi + 1, ws.len());
    }
    if tokens == 0 {
        return Err(ModelError::InvalidInput("the text has no token to score".into()));
    }
    Ok(Perplexity { tokens, nll, windows: ws.len(), perplexity: (nll / tokens as f64).exp() })
}

/// [`perplexity`] with the model in this process, one window per forward.
pub fn perplexity_offline(
    model: &Model,
    ids: &[u32],
    context: usize,
    stride: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Perplexity> {
    let cfg = model.config();
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= cfg.vocab_size) {
        return Err(ModelError::InvalidInput(format!("token {bad} is outside the vocabulary of {}", cfg.vocab_size)));
    }
    let vocab = cfg.vocab_size;
    let score = |input: &[u32]| {
        let mut cache = model.new_cache();
        let mut out = model.forward(&mut [SeqChunk { tokens: input, cache: &mut cache }], Logits::All)?;
        let rows = out.pop().ok_or_else(|| ModelError::Executor("forward returned no sequence".into()))?;
        Ok(rows_logprobs(&rows, &input[1..], vocab))
    };
    perplexity(ids, cfg.bos_token_id, context, stride, score, progress)
}

/// log p(next[i]) under logit row i, for each row that has a next token.
pub fn rows_logprobs(rows: &[f32], next: &[u32], vocab: usize) -> Vec<f64> {
    rows.chunks_exact(vocab).zip(next).map(|(row, &t)| row[t as usize] as f64 - log_sum_exp(row)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every token is scored exactly once, within its window, with at
        /// least `context - stride` tokens of that window before it once
        /// the first window is past.
        #[test]
        fn windows_score_each_token_once(n in 1usize..400, context in 2usize..64, stride_frac in 0.0f64..1.0, bos: bool) {
            let span = context - usize::from(bos);
            prop_assume!(span > 0);
            let stride = 1 + ((span - 1) as f64 * stride_frac) as usize;
            let ws = windows(n, context, stride, bos).unwrap();
            let mut seen = vec![0u32; n];
            for (i, w) in ws.iter().enumerate() {
                prop_assert!(w.end - w.begin <= span && w.begin <= w.score_from && w.score_from <= w.end);
                for (j, count) in seen.iter_mut().enumerate().take(w.end).skip(w.score_from) {
                    *count += 1;
                    if i > 0 {
                        prop_assert!(j - w.begin >= span - stride);
                    }
                }
            }
            prop_assert!(seen.iter().all(|&c| c == 1));
        }
    }

    #[test]
    fn a_uniform_model_has_the_vocabulary_as_perplexity() {
        let ids: Vec<u32> = (0..50).map(|i| i % 7).collect();
        let uniform = |inp: &[u32]| Ok(rows_logprobs(&vec![0.5; inp.len() * 7], &inp[1..], 7));
        let p = perplexity(&ids, Some(0), 16, 8, uniform, &mut |_, _| {}).unwrap();
        assert_eq!(p.tokens, 50);
        assert!((p.perplexity - 7.0).abs() < 1e-9, "{p:?}");
        // Without BOS the first token cannot be predicted.
        let q = perplexity(&ids, None, 16, 8, uniform, &mut |_, _| {}).unwrap();
        assert_eq!(q.tokens, 49);
    }

    #[test]
    fn a_model_sure_of_each_next_token_has_perplexity_one_and_bad_strides_are_refused() {
        let ids: Vec<u32> = (0..30).map(|i| (i * 3 % 5) as u32).collect();
        // Row p of a window predicts its input token p + 1: put all mass there.
        let oracle = |inp: &[u32]| {
            let mut out = vec![-1e4f32; inp.len() * 5];
            let text: Vec<u32> = inp.iter().skip(1).copied().collect();
            let start = ids.windows(text.len()).position(|w| w == text.as_slice()).unwrap_or(0);
            for p in 0..inp.len() {
                let next = ids.get(start + p).copied().unwrap_or(0);
                out[p * 5 + next as usize] = 0.0;
            }
            Ok(rows_logprobs(&out, &inp[1..], 5))
        };
        let p = perplexity(&ids, Some(9), 12, 5, oracle, &mut |_, _| {}).unwrap();
        assert!((p.perplexity - 1.0).abs() < 1e-6, "{p:?}");
        assert!(windows(10, 8, 8, true).is_err() && windows(10, 8, 0, false).is_err());
        let short = perplexity(&ids, Some(9), 12, 5, |_| Ok(vec![0.0; 3]), &mut |_, _| {});
        assert!(matches!(short, Err(ModelError::Executor(_))));
    }
}
