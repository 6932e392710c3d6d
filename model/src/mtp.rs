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
use crate::model::{Layer, Logits, Model, SeqChunk, load_expert, load_layer};
use crate::moe::ExpertBank;
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
    pool: KvPool,
}

/// The MTP layer's index (DeepSeek stores the first module there).
fn mtp_index(cfg: &ModelConfig) -> Option<usize> {
    (cfg.mtp_layers > 0).then_some(cfg.num_layers)
}

fn ffn_kind(cfg: &ModelConfig, layer: usize) -> FfnKind {
    if cfg.moe.n_routed_experts > 0 && layer >= cfg.layer_ffn.iter().take_while(|k| **k == FfnKind::Dense).count() {
        FfnKind::Moe
    } else {
        FfnKind::Dense
    }
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

/// The MTP layer's routed experts, into an in-process bank (offline runs).
pub(crate) fn load_mtp_experts(cfg: &ModelConfig, ws: &WeightStore, bank: &mut dyn ExpertBank) -> Result<()> {
    let Some(n) = mtp_index(cfg) else { return Ok(()) };
    if ffn_kind(cfg, n) != FfnKind::Moe || !ws.contains(&format!("model.layers.{n}.eh_proj.weight")) {
        return Ok(());
    }
    for e in 0..cfg.moe.n_routed_experts {
        bank.insert(n, e, load_expert(cfg, ws, n, e)?)?;
    }
    Ok(())
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

    /// One sequence's forward that also returns the final-norm hidden
    /// state of every new row: `(logits of the rows `mode` asks, hidden)`.
    pub fn forward_hidden(&self, tokens: &[u32], cache: &mut KvCache, mode: Logits) -> Result<(Vec<f32>, Vec<f32>)> {
        self.validate(tokens, cache.len())?;
        let before = cache.len();
        cache.reserve(tokens.len())?;
        let mut hidden = Vec::new();
        let out = rayon::scope(|_| {
            self.forward_unchecked(&mut [SeqChunk { tokens, cache: &mut *cache }], mode, Some(&mut hidden))
        });
        match out {
            Ok(mut l) => Ok((l.pop().unwrap_or_default(), hidden.pop().unwrap_or_default())),
            Err(e) => {
                cache.truncate(before);
                Err(e)
            }
        }
    }

    /// Appends MTP entries (main hidden rows `hidden`, the tokens after
    /// them `next`) to `cache`; returns the logits guessing the token after
    /// the last of `next`.
    pub fn mtp_forward(&self, cache: &mut KvCache, hidden: &[f32], next: &[u32]) -> Result<Vec<f32>> {
        let (m, h, n) = (self.mtp()?, self.config().hidden_size, next.len());
        if n == 0 || hidden.len() != n * h {
            return Err(ModelError::InvalidInput(format!("MTP: {} hidden values for {n} tokens", hidden.len())));
        }
        self.validate(next, cache.len())?;
        let before = cache.len();
        cache.reserve(n)?;
        let eps = self.config().rms_norm_eps;
        let mut e = self.embed_rows(next.iter().copied());
        rms_norm(&mut e, &m.enorm, eps);
        let mut hn = hidden.to_vec();
        rms_norm(&mut hn, &m.hnorm, eps);
        let cat: Vec<f32> =
            e.chunks_exact(h).zip(hn.chunks_exact(h)).flat_map(|(a, b)| a.iter().chain(b)).copied().collect();
        let mut x = matmul(&cat, n, m.eh_proj.view(), h, 2 * h);
        let layer_index = self.config().num_layers;
        let out = rayon::scope(|_| {
            let mut seqs = [SeqSlice { cache: &mut *cache, start: 0, len: n }];
            self.run_layer(0, layer_index, &m.layer, &mut x, n, &mut seqs)
        });
        if let Err(err) = out {
            cache.truncate(before);
            return Err(err);
        }
        cache.advance(next);
        let mut last = x[(n - 1) * h..].to_vec();
        rms_norm(&mut last, &m.norm, eps);
        Ok(self.head_logits(&last, 1))
    }
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
    let (logits, mut hidden) = model.forward_hidden(prompt, &mut cache, Logits::Last)?;
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
        let guess = model.mtp_forward(&mut mcache, &hidden, &next)?;
        let (draft, q) = sampler.draft(&guess);
        let before = cache.len();
        let (rows, h2) = model.forward_hidden(&[tok, draft], &mut cache, Logits::All)?;
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
