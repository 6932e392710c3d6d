//! Sampling and single-sequence generation.

use crate::error::{ModelError, Result};
use crate::model::{Logits, Model, SeqChunk};
use crate::moe::top_k_indices;
use crate::ops::{argmax, log_softmax_at, softmax};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::time::Instant;

/// How to pick each next token.
#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 1.0 disables nucleus filtering.
    pub top_p: f32,
    /// 0 disables top-k filtering.
    pub top_k: usize,
    /// Same seed, same tokens.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_p: 1.0, top_k: 0, seed: None }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(ModelError::InvalidInput(format!("temperature must be ≥ 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::InvalidInput(format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        Ok(())
    }
}

/// A seeded sampler; one per sequence so results do not depend on batching.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = match params.seed {
            Some(s) => ChaCha8Rng::seed_from_u64(s),
            None => ChaCha8Rng::from_rng(&mut rand::rng()),
        };
        Ok(Sampler { params, rng })
    }

    fn greedy(&self) -> bool {
        self.params.temperature == 0.0 || self.params.top_k == 1
    }

    /// The tokens sampling may pick and their weights (softmax at the
    /// temperature over the top-k, cut to the top-p nucleus; not
    /// renormalized after the cut).
    fn candidates(&self, logits: &[f32]) -> (Vec<usize>, Vec<f32>) {
        let p = &self.params;
        let k = if p.top_k == 0 { logits.len() } else { p.top_k.min(logits.len()) };
        let mut cand = top_k_indices(logits, k);
        let mut probs: Vec<f32> = cand.iter().map(|&i| logits[i] / p.temperature).collect();
        softmax(&mut probs);
        // Nucleus: the smallest prefix (by probability) reaching top_p.
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        cand.truncate(keep);
        probs.truncate(keep);
        (cand, probs)
    }

    /// Draws from weights summing to their total.
    fn draw(&mut self, cand: &[usize], probs: &[f32]) -> usize {
        let total: f32 = probs.iter().sum();
        let mut u = self.rng.random::<f32>() * total;
        // Where rounding leaves u past every weight: the last candidate of
        // nonzero weight, never one a grammar masked to zero.
        let mut fallback = cand[0];
        for (&c, &q) in cand.iter().zip(probs) {
            if u < q {
                return c;
            }
            if q > 0.0 {
                fallback = c;
            }
            u -= q;
        }
        fallback
    }

    /// Picks a token; returns it with its log-probability under the raw
    /// logits (before temperature), as OpenAI-style APIs report it.
    pub fn sample(&mut self, logits: &[f32]) -> (u32, f32) {
        let tok = if self.greedy() {
            argmax(logits)
        } else {
            let (cand, probs) = self.candidates(logits);
            self.draw(&cand, &probs)
        };
        (tok as u32, log_softmax_at(logits, tok))
    }

    /// The distribution [`sample`](Self::sample) draws from, normalized
    /// (one-hot when greedy).
    pub fn distribution(&self, logits: &[f32]) -> Dist {
        if self.greedy() {
            return Dist(vec![(argmax(logits), 1.0)]);
        }
        let (cand, probs) = self.candidates(logits);
        let total: f32 = probs.iter().sum();
        Dist(cand.into_iter().zip(probs.into_iter().map(|p| p / total)).collect())
    }

    /// A speculative draft from a draft model's logits: the token and the
    /// distribution it was drawn from.
    pub fn draft(&mut self, logits: &[f32]) -> (u32, Dist) {
        let q = self.distribution(logits);
        let tok = if q.0.len() == 1 { q.0[0].0 } else { self.draw_dist(&q) };
        (tok as u32, q)
    }

    fn draw_dist(&mut self, d: &Dist) -> usize {
        let (cand, probs): (Vec<usize>, Vec<f32>) = d.0.iter().copied().unzip();
        self.draw(&cand, &probs)
    }

    /// Verifies `draft` (drawn from `q`) against the target logits: keeps
    /// it with probability min(1, p/q), else draws from max(0, p − q)
    /// normalized, so the token is distributed as [`sample`](Self::sample)
    /// would draw it. Greedy: keeps it iff it is the target's argmax.
    /// Returns the token and whether it is the draft.
    pub fn verify(&mut self, logits: &[f32], draft: u32, q: &Dist) -> (u32, bool) {
        let p = self.distribution(logits);
        if self.greedy() {
            let t = p.0[0].0 as u32;
            return (t, t == draft);
        }
        let (pd, qd) = (p.prob(draft as usize), q.prob(draft as usize));
        if qd > 0.0 && self.rng.random::<f32>() < pd / qd {
            return (draft, true);
        }
        // q looked up by token: both may span the whole vocabulary, where a
        // search per token would be quadratic in it.
        let q_of: HashMap<usize, f32> = q.0.iter().copied().collect();
        let residual: Vec<(usize, f32)> =
            p.0.iter()
                .map(|&(t, pt)| (t, (pt - q_of.get(&t).copied().unwrap_or(0.0)).max(0.0)))
                .filter(|&(_, r)| r > 0.0)
                .collect();
        let pick = if residual.is_empty() { self.draw_dist(&p) } else { self.draw_dist(&Dist(residual)) };
        (pick as u32, pick == draft as usize)
    }
}

/// A sampling distribution: `(token, probability)`, most likely first.
#[derive(Debug, Clone, PartialEq)]
pub struct Dist(pub Vec<(usize, f32)>);

impl Dist {
    pub fn prob(&self, tok: usize) -> f32 {
        self.0.iter().find(|&&(t, _)| t == tok).map_or(0.0, |&(_, p)| p)
    }
}

/// The `n` most likely tokens, most likely first, with their
/// log-probabilities under the raw logits (OpenAI's `top_logprobs`).
pub fn top_logprobs(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    let lse = crate::ops::log_sum_exp(logits);
    top_k_indices(logits, n).into_iter().map(|i| (i as u32, (logits[i] as f64 - lse) as f32)).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
    /// Prompt forward up to the first token.
    pub prefill_s: f64,
    /// The remaining tokens.
    pub decode_s: f64,
}

/// Checks that a prompt and token budget fit the model before any work.
pub fn check_request(model: &Model, prompt: &[u32], max_tokens: usize) -> Result<()> {
    if max_tokens == 0 {
        return Err(ModelError::InvalidInput("max_tokens must be at least 1".into()));
    }
    let ctx = model.config().max_position_embeddings;
    if prompt.len() + max_tokens > ctx {
        return Err(ModelError::InvalidInput(format!(
            "prompt ({} tokens) + max_tokens ({max_tokens}) exceeds the context of {ctx} tokens",
            prompt.len()
        )));
    }
    model.validate(prompt, 0)
}

/// Generates up to `max_tokens` tokens for one prompt, stopping at an EOS
/// token unless `ignore_eos`. `on_token` sees each token as it is chosen.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    max_tokens: usize,
    params: SamplingParams,
    ignore_eos: bool,
    mut on_token: impl FnMut(u32, f32),
) -> Result<Generation> {
    check_request(model, prompt, max_tokens)?;
    let mut sampler = Sampler::new(params)?;
    let eos = &model.config().eos_token_ids;
    let mut cache = model.new_cache();
    let t0 = Instant::now();
    let mut logits = model.forward(&mut [SeqChunk { tokens: prompt, cache: &mut cache }], Logits::Last)?.remove(0);
    let mut g = Generation {
        token_ids: Vec::with_capacity(max_tokens),
        logprobs: Vec::with_capacity(max_tokens),
        finish_reason: FinishReason::Length,
        prefill_s: 0.0,
        decode_s: 0.0,
    };
    let mut t1 = t0;
    loop {
        let (tok, lp) = sampler.sample(&logits);
        if g.token_ids.is_empty() {
            t1 = Instant::now();
            g.prefill_s = (t1 - t0).as_secs_f64();
        }
        g.token_ids.push(tok);
        g.logprobs.push(lp);
        on_token(tok, lp);
        if !ignore_eos && eos.contains(&tok) {
            g.finish_reason = FinishReason::Stop;
            break;
        }
        if g.token_ids.len() == max_tokens {
            break;
        }
        logits = model.forward(&mut [SeqChunk { tokens: &[tok], cache: &mut cache }], Logits::Last)?.remove(0);
    }
    g.decode_s = t1.elapsed().as_secs_f64();
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let params = SamplingParams { temperature: 1.0, top_p: 0.9, top_k: 5, seed: Some(7) };
        let run = || {
            let mut s = Sampler::new(params.clone()).unwrap();
            (0..20).map(|_| s.sample(&logits).0).collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        let top5: Vec<u32> = top_k_indices(&logits, 5).into_iter().map(|i| i as u32).collect();
        assert!(a.iter().all(|t| top5.contains(t)));
        let mut g = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(g.sample(&logits).0 as usize, top_k_indices(&logits, 1)[0]);
    }

    /// Draws `n` tokens from one seeded sampler.
    fn draws(params: SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
        let mut s = Sampler::new(params).unwrap();
        (0..n).map(|_| s.sample(logits).0).collect()
    }

    fn softmax_at(logits: &[f32], t: f32) -> Vec<f64> {
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f64> = logits.iter().map(|&l| (((l - m) / t) as f64).exp()).collect();
        let z: f64 = e.iter().sum();
        e.into_iter().map(|x| x / z).collect()
    }

    /// Pearson's chi-square of observed counts against probabilities.
    fn chi_square(counts: &[usize], probs: &[f64]) -> f64 {
        let n: usize = counts.iter().sum();
        counts.iter().zip(probs).map(|(&c, &p)| (c as f64 - n as f64 * p).powi(2) / (n as f64 * p)).sum()
    }

    #[test]
    fn different_seeds_diverge() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run =
            |seed| draws(SamplingParams { temperature: 1.0, top_p: 1.0, top_k: 0, seed: Some(seed) }, &logits, 30);
        let runs: std::collections::BTreeSet<Vec<u32>> = (0..8).map(run).collect();
        assert_eq!(runs.len(), 8, "eight seeds, eight different sequences");
        let unseeded = draws(SamplingParams { temperature: 1.0, ..Default::default() }, &logits, 30);
        let unseeded_again = draws(SamplingParams { temperature: 1.0, ..Default::default() }, &logits, 30);
        assert_ne!(unseeded, unseeded_again, "without a seed every sampler draws afresh");
    }

    #[test]
    fn draws_follow_the_softmax_at_the_temperature() {
        // Chi-square goodness of fit, 5 degrees of freedom: 20.5 is the
        // p = 0.001 critical value. The seed fixes the draws, so the test
        // is deterministic; a sampler that ignored temperature (or
        // returned the argmax) would be off by orders of magnitude.
        let logits = [1.0f32, 0.5, 0.0, -0.5, -1.0, 2.0];
        let n = 20_000;
        for t in [0.5f32, 1.0, 2.0] {
            let mut counts = [0usize; 6];
            for tok in draws(SamplingParams { temperature: t, top_p: 1.0, top_k: 0, seed: Some(11) }, &logits, n) {
                counts[tok as usize] += 1;
            }
            let fit = chi_square(&counts, &softmax_at(&logits, t));
            assert!(fit < 20.5, "T={t}: chi-square {fit:.1} against the softmax ({counts:?})");
            let other = if t == 2.0 { 0.5 } else { 2.0 };
            let misfit = chi_square(&counts, &softmax_at(&logits, other));
            assert!(misfit > 200.0, "T={t} draws also fit T={other} (chi-square {misfit:.1}): temperature ignored");
        }
    }

    proptest::proptest! {
        #[test]
        fn top_k_never_leaves_the_top_k_and_top_p_never_leaves_the_nucleus(
            logits in proptest::collection::vec(-4.0f32..4.0, 2..40),
            k in 1usize..8,
            top_p in 0.05f32..0.99,
            seed in 0u64..1000,
        ) {
            let top = top_k_indices(&logits, k.min(logits.len()));
            for tok in draws(SamplingParams { temperature: 1.0, top_p: 1.0, top_k: k, seed: Some(seed) }, &logits, 50) {
                proptest::prop_assert!(top.contains(&(tok as usize)), "token {} outside the top {}", tok, k);
            }
            // The nucleus: the most likely tokens until their mass reaches top_p.
            let probs = softmax_at(&logits, 1.0);
            let order = top_k_indices(&logits, logits.len());
            let mut mass = 0.0;
            // (A hair above top_p, so f32 rounding at the boundary cannot fail the test.)
            let nucleus: Vec<usize> = order.iter().copied().take_while(|&i| { let inside = mass < top_p as f64 + 1e-5; mass += probs[i]; inside }).collect();
            for tok in draws(SamplingParams { temperature: 1.0, top_p, top_k: 0, seed: Some(seed) }, &logits, 50) {
                proptest::prop_assert!(nucleus.contains(&(tok as usize)), "token {} outside the nucleus {:?}", tok, nucleus);
            }
        }
    }

    #[test]
    fn bad_params_are_refused() {
        assert!(SamplingParams { temperature: -1.0, ..Default::default() }.validate().is_err());
        assert!(SamplingParams { top_p: 0.0, ..Default::default() }.validate().is_err());
        assert!(SamplingParams { temperature: f32::NAN, ..Default::default() }.validate().is_err());
    }
}

#[cfg(test)]
mod speculative_tests {
    use super::*;

    /// The rejection rule leaves the target distribution as it is: drafts
    /// from a different distribution q, verified against p, give tokens
    /// distributed as p (within 4 standard errors over 40,000 draws).
    #[test]
    fn verified_drafts_are_distributed_as_the_target() {
        let params = SamplingParams { temperature: 0.8, top_p: 0.95, top_k: 0, seed: Some(7) };
        let target = [1.0f32, 0.2, -0.5, 2.0, 0.0, -3.0];
        let drafter = [0.0f32, 1.5, 0.5, 0.5, -1.0, 1.0];
        let mut s = Sampler::new(params).unwrap();
        let p = s.distribution(&target);
        let n = 40_000;
        let mut counts = [0usize; 6];
        let mut kept = 0;
        for _ in 0..n {
            let (d, q) = s.draft(&drafter);
            let (t, accepted) = s.verify(&target, d, &q);
            counts[t as usize] += 1;
            kept += usize::from(accepted);
        }
        for (tok, &c) in counts.iter().enumerate() {
            let want = p.prob(tok) as f64;
            let se = (want * (1.0 - want) / n as f64).sqrt().max(1e-4);
            assert!(((c as f64 / n as f64) - want).abs() < 4.0 * se, "token {tok}: {c}/{n} vs {want}");
        }
        assert!(kept > 0 && kept < n, "{kept}");
        // Greedy: kept exactly when the draft is the target's argmax.
        let mut g = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(g.verify(&target, 3, &g.distribution(&drafter)), (3, true));
        assert_eq!(g.verify(&target, 1, &g.distribution(&drafter)), (3, false));
    }
}
