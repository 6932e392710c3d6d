//! DeepSeek-V3's multi-token-prediction (MTP) module, and speculative
//! decoding with it.
//!
//! The module is stored as decoder layer `num_hidden_layers` (DeepSeek's
//! names: `enorm`, `hnorm`, `eh_proj`, the layer's attention and MoE,
//! `shared_head.norm`; its copies of `embed_tokens` and `shared_head.head`
//! equal the main model's, which are used instead). Entry j combines the
//! main model's final-norm hidden state at position j with the embedding of
//! token j + 1: `eh_proj([enorm(emb(t[j+1])); hnorm(h[j])])`, one decoder
//! layer with its own KV cache, the shared head's norm and the LM head give
//! a guess for token j + 2.
//!
//! [`generate_mtp`] drafts one token per step with it and verifies the draft
//! as a second position of the next forward: greedy output is the model's
//! own greedy output, and sampling uses the standard rejection rule
//! (accept the draft d with probability min(1, p(d)/q(d)), else sample
//! from max(0, p − q)), so the distribution of tokens is unchanged.

use crate::attention::SeqSlice;
use crate::cache::{KvCache, KvPool, PoolConfig, row_width};
use crate::config::{FfnKind, ModelConfig};
use crate::error::{ModelError, Result};
use crate::generate::{FinishReason, Generation, Sampler, SamplingParams, check_request};
use crate::kernels::matmul;
use crate::model::{Layer, Logits, Model, SeqChunk, load_layer};
use crate::ops::{log_softmax_at, rms_norm};
use crate::options::QuantTarget;
use crate::tensor::Matrix;
use crate::weights::WeightStore;
use std::time::Instant;

pub(crate) struct Mtp {
    enorm: Vec<f32>,
    hnorm: Vec<f32>,
    /// `[hidden, 2 × hidden]`.
    eh_proj: Matrix,
    layer: Layer,
    norm: Vec<f32>,
    /// One layer's blocks, for the module's attention.
    pub(crate) pool: KvPool,
}

/// The MTP layer's index (DeepSeek stores the first module there).
fn mtp_index(cfg: &ModelConfig) -> Option<usize> {
    (cfg.mtp_layers > 0).then_some(cfg.num_layers)
}

/// The MTP layer's FFN: MoE when the layers before it are (its routed
/// experts are then among [`ModelConfig::moe_layers`], placed like the rest).
fn ffn_kind(cfg: &ModelConfig, layer: usize) -> FfnKind {
    if cfg.moe_layers().any(|l| l == layer) { FfnKind::Moe } else { FfnKind::Dense }
}

impl Mtp {
    /// The module, when the config declares one and the file holds it.
    pub(crate) fn load(cfg: &ModelConfig, ws: &WeightStore) -> Result<Option<Mtp>> {
        let Some(n) = mtp_index(cfg) else { return Ok(None) };
        let p = format!("model.layers.{n}.");
        if !ws.contains(&format!("{p}eh_proj.weight")) {
            return Ok(None);
        }
        let h = cfg.hidden_size;
        Ok(Some(Mtp {
            enorm: ws.vector(&format!("{p}enorm.weight"), h)?,
            hnorm: ws.vector(&format!("{p}hnorm.weight"), h)?,
            eh_proj: ws.matrix(&format!("{p}eh_proj.weight"), h, 2 * h)?.prepared(ws.quant_for(QuantTarget::Dense)),
            layer: load_layer(cfg, ws, n, ffn_kind(cfg, n))?,
            norm: ws.vector(&format!("{p}shared_head.norm.weight"), h)?,
            pool: KvPool::new(PoolConfig { prefix_cache: false, ..PoolConfig::default() }, 1, row_width(cfg))?,
        }))
    }
}

impl Model {
    /// Whether the checkpoint's MTP module is loaded.
    pub fn has_mtp(&self) -> bool {
        self.mtp.is_some()
    }

    fn mtp(&self) -> Result<&Mtp> {
        self.mtp.as_ref().ok_or_else(|| ModelError::InvalidInput("this checkpoint has no MTP module".into()))
    }

    /// An empty cache for the MTP module's attention.
    pub fn new_mtp_cache(&self) -> Result<KvCache> {
        Ok(KvCache::new(self.config(), &self.mtp()?.pool))
    }

    /// One sequence's [`Model::forward_hidden`]: `(logits of the rows
    /// `mode` asks, hidden rows)`.
    fn forward_one(&self, tokens: &[u32], cache: &mut KvCache, mode: Logits) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut l, mut h) = self.forward_hidden(&mut [SeqChunk { tokens, cache }], mode, false)?;
        let missing = || ModelError::Executor("forward returned no sequence".into());
        Ok((l.pop().ok_or_else(missing)?, h.pop().ok_or_else(missing)?))
    }

    /// Appends each chunk's MTP entries (main hidden rows `hidden`, the
    /// tokens after them `next`) to its cache, all in one pass through the
    /// module; returns per chunk the logits guessing the token after the
    /// last of its `next`. On failure no cache changes.
    pub fn mtp_forward(&self, batch: &mut [MtpChunk<'_>]) -> Result<Vec<Vec<f32>>> {
        let (m, h) = (self.mtp()?, self.config().hidden_size);
        for c in batch.iter() {
            let n = c.next.len();
            if n == 0 || c.hidden.len() != n * h {
                return Err(ModelError::InvalidInput(format!("MTP: {} hidden values for {n} tokens", c.hidden.len())));
            }
            self.validate(c.next, c.cache.len())?;
        }
        let before: Vec<usize> = batch.iter().map(|c| c.cache.len()).collect();
        let out = self.mtp_unchecked(m, batch);
        if out.is_err() {
            for (c, len) in batch.iter_mut().zip(before) {
                c.cache.truncate(len);
            }
        }
        out
    }

    fn mtp_unchecked(&self, m: &Mtp, batch: &mut [MtpChunk<'_>]) -> Result<Vec<Vec<f32>>> {
        let (h, eps) = (self.config().hidden_size, self.config().rms_norm_eps);
        for c in batch.iter_mut() {
            c.cache.reserve(c.next.len())?;
        }
        let n: usize = batch.iter().map(|c| c.next.len()).sum();
        let mut e = self.embed_rows(batch.iter().flat_map(|c| c.next.iter().copied()));
        rms_norm(&mut e, &m.enorm, eps);
        let mut hn: Vec<f32> = batch.iter().flat_map(|c| c.hidden.iter().copied()).collect();
        rms_norm(&mut hn, &m.hnorm, eps);
        let cat: Vec<f32> =
            e.chunks_exact(h).zip(hn.chunks_exact(h)).flat_map(|(a, b)| a.iter().chain(b)).copied().collect();
        let mut x = matmul(&cat, n, m.eh_proj.view(), h, 2 * h);
        let nexts: Vec<&[u32]> = batch.iter().map(|c| c.next).collect();
        let mut seqs = Vec::with_capacity(batch.len());
        let mut start = 0;
        for c in batch.iter_mut() {
            seqs.push(SeqSlice { cache: &mut *c.cache, start, len: c.next.len() });
            start += c.next.len();
        }
        let layer_index = self.config().num_layers;
        rayon::scope(|_| self.run_layer(0, layer_index, &m.layer, &mut x, n, &mut seqs))?;
        let mut last = Vec::with_capacity(nexts.len() * h);
        for (s, next) in seqs.iter_mut().zip(&nexts) {
            s.cache.advance(next);
            last.extend_from_slice(&x[(s.start + s.len - 1) * h..(s.start + s.len) * h]);
        }
        rms_norm(&mut last, &m.norm, eps);
        let v = self.config().vocab_size;
        Ok(self.head_logits(&last, nexts.len()).chunks_exact(v).map(<[f32]>::to_vec).collect())
    }
}

/// One sequence's new entries for the MTP module.
pub struct MtpChunk<'a> {
    pub cache: &'a mut KvCache,
    /// Main-model final-norm hidden rows, `next.len() × hidden`.
    pub hidden: &'a [f32],
    /// The token after each of those rows' positions.
    pub next: &'a [u32],
}

/// What speculation did over one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct SpecStats {
    /// Verification steps (each one forward of 2 positions).
    pub steps: usize,
    pub drafted: usize,
    pub accepted: usize,
}

impl SpecStats {
    pub fn acceptance(&self) -> f64 {
        if self.drafted == 0 { 0.0 } else { self.accepted as f64 / self.drafted as f64 }
    }
}

/// [`crate::generate::generate`] with one MTP draft per step, verified in
/// the next forward; same arguments, plus what speculation did.
pub fn generate_mtp(
    model: &Model,
    prompt: &[u32],
    max_tokens: usize,
    params: SamplingParams,
    ignore_eos: bool,
    mut on_token: impl FnMut(u32, f32),
) -> Result<(Generation, SpecStats)> {
    check_request(model, prompt, max_tokens)?;
    let mut sampler = Sampler::new(params)?;
    let eos = model.config().eos_token_ids.clone();
    let (mut cache, mut mcache) = (model.new_cache(), model.new_mtp_cache()?);
    let t0 = Instant::now();
    let (logits, mut hidden) = model.forward_one(prompt, &mut cache, Logits::Last)?;
    let (mut out, mut lps, mut stats) = (Vec::new(), Vec::new(), SpecStats::default());
    let mut emit = |tok: u32, lp: f32, out: &mut Vec<u32>| {
        on_token(tok, lp);
        out.push(tok);
        lps.push(lp);
        (!ignore_eos && eos.contains(&tok)) || out.len() >= max_tokens
    };
    let (mut tok, lp) = sampler.sample(&logits);
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut done = emit(tok, lp, &mut out);
    // MTP entries still to append: the hidden rows and the tokens after them.
    let mut next: Vec<u32> = prompt[1..].iter().copied().chain([tok]).collect();
    while !done {
        let mut chunk = [MtpChunk { cache: &mut mcache, hidden: &hidden, next: &next }];
        let guess = model
            .mtp_forward(&mut chunk)?
            .pop()
            .ok_or_else(|| ModelError::Executor("the MTP pass returned no sequence".into()))?;
        let (draft, q) = sampler.draft(&guess);
        let before = cache.len();
        let (rows, h2) = model.forward_one(&[tok, draft], &mut cache, Logits::All)?;
        let vocab = model.config().vocab_size;
        let (first, second) = rows.split_at(vocab);
        stats.steps += 1;
        stats.drafted += 1;
        let (t1_, accepted) = sampler.verify(first, draft, &q);
        done = emit(t1_, log_softmax_at(first, t1_ as usize), &mut out);
        let h = model.config().hidden_size;
        if accepted {
            stats.accepted += 1;
            if done {
                break;
            }
            let (t2, lp2) = sampler.sample(second);
            done = emit(t2, lp2, &mut out);
            (hidden, next, tok) = (h2, vec![draft, t2], t2);
        } else {
            // The draft's position is dropped; the verified token is next.
            cache.truncate(before + 1);
            (hidden, next, tok) = (h2[..h].to_vec(), vec![t1_], t1_);
        }
    }
    let stop = out.last().is_some_and(|t| !ignore_eos && eos.contains(t));
    let finish_reason = if stop { FinishReason::Stop } else { FinishReason::Length };
    let g =
        Generation { token_ids: out, logprobs: lps, finish_reason, prefill_s, decode_s: t1.elapsed().as_secs_f64() };
    Ok((g, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Arch;
    use crate::generate::generate;
    use crate::genmodel::{GenSpec, generate_checkpoint};
    use crate::tensor::Precision;

    /// A random DeepSeek-V3 checkpoint with an MTP module (2 layers + MTP).
    fn random_mtp_model(tag: &str) -> Model {
        let dir = std::env::temp_dir().join(format!("em-mtp-{tag}-{}", std::process::id()));
        let mut spec = GenSpec::demo(Arch::DeepseekV3);
        (spec.hidden_size, spec.num_layers, spec.mtp) = (64, 2, true);
        generate_checkpoint(&spec, &dir).unwrap();
        let cfg = ModelConfig::from_dir(&dir).unwrap();
        assert_eq!((cfg.mtp_layers, cfg.moe_layers().collect::<Vec<_>>()), (1, vec![1, 2]), "MTP experts are placed");
        let m = Model::load(&dir, Precision::F32, &mut |_, _| {}).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        m
    }

    /// Random drafts are mostly rejected, so every step rolls the KV cache
    /// back: greedy output must still be the model's own.
    #[test]
    fn rejected_drafts_roll_back_and_greedy_output_is_unchanged() {
        let m = random_mtp_model("greedy");
        assert!(m.has_mtp());
        for prompt in [vec![0u32, 5, 9, 200], vec![0, 17], (0..40).collect()] {
            let plain = generate(&m, &prompt, 24, SamplingParams::default(), true, |_, _| {}).unwrap();
            let (spec, s) = generate_mtp(&m, &prompt, 24, SamplingParams::default(), true, |_, _| {}).unwrap();
            assert_eq!(spec.token_ids, plain.token_ids, "{prompt:?}");
            assert!(spec.logprobs.iter().zip(&plain.logprobs).all(|(a, b)| (a - b).abs() < 1e-4));
            assert!(s.drafted > 0 && s.accepted < s.drafted, "{s:?}: some drafts are rejected");
        }
    }

    /// Entries of several sequences in one pass equal each sequence alone.
    #[test]
    fn a_batched_mtp_pass_equals_one_pass_per_sequence() {
        let m = random_mtp_model("batch");
        let h = m.config().hidden_size;
        let rows: Vec<f32> = (0..5 * h).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let (a_next, b_next) = ([3u32, 8, 1], [4u32, 4]);
        let (mut ca, mut cb) = (m.new_mtp_cache().unwrap(), m.new_mtp_cache().unwrap());
        let together = m
            .mtp_forward(&mut [
                MtpChunk { cache: &mut ca, hidden: &rows[..3 * h], next: &a_next },
                MtpChunk { cache: &mut cb, hidden: &rows[3 * h..], next: &b_next },
            ])
            .unwrap();
        assert_eq!((ca.len(), cb.len()), (3, 2));
        let mut c = m.new_mtp_cache().unwrap();
        let alone = m.mtp_forward(&mut [MtpChunk { cache: &mut c, hidden: &rows[3 * h..], next: &b_next }]).unwrap();
        assert!(together[1].iter().zip(&alone[0]).all(|(x, y)| (x - y).abs() < 1e-4));
        // A malformed chunk is refused and leaves the caches as they were.
        let bad = m.mtp_forward(&mut [
            MtpChunk { cache: &mut ca, hidden: &rows[..h], next: &a_next },
            MtpChunk { cache: &mut cb, hidden: &rows[..h], next: &[1] },
        ]);
        assert!(bad.is_err());
        assert_eq!((ca.len(), cb.len()), (3, 2));
    }
}
