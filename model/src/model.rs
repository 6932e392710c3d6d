//! The decoder: loading by architecture and the batched forward step.

use crate::attention::{Attention, Gqa, Linear, Mla, QProj, SeqSlice};
use crate::cache::{KvCache, KvPool, PoolConfig, row_width};
use crate::config::{Arch, AttentionConfig, FfnKind, ModelConfig};
use crate::error::{ModelError, Result};
use crate::kernels::matmul;
use crate::moe::{ExpertBank, ExpertExecutor, Gate, LocalExperts, Mlp, MlpBias, RoutedBatch};
use crate::ops::{Rope, rms_norm};
use crate::options::{QuantTarget, WeightArgs};
use crate::tensor::{MatView, Matrix, Precision};
use crate::weights::WeightStore;
use std::path::Path;
use std::sync::Arc;

enum Ffn {
    Dense(Mlp),
    Moe { gate: Gate, shared: Option<Mlp> },
}

pub(crate) struct Layer {
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    attn: Attention,
    ffn: Ffn,
}

/// The dense part of a model (everything except the routed experts), plus the
/// executor that computes those.
pub struct Model {
    cfg: ModelConfig,
    embed: Matrix,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    /// `None` when tied to the embeddings.
    lm_head: Option<Matrix>,
    rope: Rope,
    executor: Arc<dyn ExpertExecutor>,
    /// Where every cache of this model takes its blocks.
    pool: KvPool,
    /// DeepSeek-V3's MTP module, when the checkpoint carries one.
    pub(crate) mtp: Option<crate::mtp::Mtp>,
}

/// One sequence's new tokens in a forward step.
pub struct SeqChunk<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

/// Which logits a forward step returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only each sequence's last new token (generation).
    Last,
    /// Every new token (scoring, tests).
    All,
    /// Each sequence's last k new tokens, or all of a shorter chunk (a
    /// speculative step: the last token and the drafts after it).
    Tail(usize),
}

impl Logits {
    /// How many of a chunk of `len` new rows get logits.
    fn rows(self, len: usize) -> usize {
        match self {
            Logits::All => len,
            Logits::Last => 1,
            Logits::Tail(k) => k.clamp(1, len),
        }
    }
}

/// Per sequence of a step: the logits rows asked, and with
/// [`Model::forward_hidden`] the final-norm hidden state of every new row.
pub type StepRows = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// Tensor names of one routed expert: `[gate, up, down]`.
pub fn expert_tensor_names(cfg: &ModelConfig, layer: usize, expert: usize) -> [String; 3] {
    let p = format!("model.layers.{layer}.");
    match cfg.arch {
        Arch::Mixtral => ["w1", "w3", "w2"].map(|w| format!("{p}block_sparse_moe.experts.{expert}.{w}.weight")),
        _ => ["gate_proj", "up_proj", "down_proj"].map(|w| format!("{p}mlp.experts.{expert}.{w}.weight")),
    }
}

fn mlp(
    ws: &WeightStore,
    prefix: &str,
    names: [&str; 3],
    (hidden, inter): (usize, usize),
    target: QuantTarget,
) -> Result<Mlp> {
    let [g, u, d] = names.map(|n| format!("{prefix}{n}.weight"));
    let bias = match ws.opt_vector(&format!("{prefix}{}.bias", names[0]), inter)? {
        Some(gb) => {
            let ub = ws.vector(&format!("{prefix}{}.bias", names[1]), inter)?;
            let db = ws.vector(&format!("{prefix}{}.bias", names[2]), hidden)?;
            Some(MlpBias { gate_up: [gb, ub].concat(), down: db })
        }
        None => None,
    };
    let (g, u, d) = (ws.matrix(&g, inter, hidden)?, ws.matrix(&u, inter, hidden)?, ws.matrix(&d, hidden, inter)?);
    Ok(Mlp::with_quant(g, u, d, bias, ws.quant_for(target)))
}

fn linear(ws: &WeightStore, name: &str, out: usize, inp: usize) -> Result<Linear> {
    Ok(Linear {
        w: ws.matrix(&format!("{name}.weight"), out, inp)?.prepared(ws.quant_for(QuantTarget::Dense)),
        b: ws.opt_vector(&format!("{name}.bias"), out)?,
    })
}

/// Layer attention weights under the prefix `a` (`model.layers.N.self_attn.`).
fn attention(ws: &WeightStore, cfg: &ModelConfig, a: &str) -> Result<Attention> {
    let (h, eps, scale) = (cfg.hidden_size, cfg.rms_norm_eps, cfg.attention_scale());
    Ok(match &cfg.attention {
        AttentionConfig::Mla(m) => {
            let nh = m.num_heads;
            let qd = m.qk_nope_head_dim + m.qk_rope_head_dim;
            let q = match m.q_lora_rank {
                None => QProj::Direct(linear(ws, &format!("{a}q_proj"), nh * qd, h)?),
                Some(r) => QProj::Lora {
                    a: linear(ws, &format!("{a}q_a_proj"), r, h)?,
                    norm: ws.vector(&format!("{a}q_a_layernorm.weight"), r)?,
                    b: linear(ws, &format!("{a}q_b_proj"), nh * qd, r)?,
                },
            };
            let kv_a = linear(ws, &format!("{a}kv_a_proj_with_mqa"), m.kv_lora_rank + m.qk_rope_head_dim, h)?;
            let kv_norm = ws.vector(&format!("{a}kv_a_layernorm.weight"), m.kv_lora_rank)?;
            let kv_b =
                ws.matrix(&format!("{a}kv_b_proj.weight"), nh * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)?;
            let o = linear(ws, &format!("{a}o_proj"), h, nh * m.v_head_dim)?;
            let quant = ws.quant_for(QuantTarget::Dense);
            Attention::Mla(Box::new(Mla::new(m.clone(), q, kv_a, kv_norm, kv_b, o, eps, scale, quant)))
        }
        AttentionConfig::Gqa(g) => {
            let (qd, kvd) = (g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim);
            let (q_norm, k_norm) = if g.qk_norm {
                (
                    Some(ws.vector(&format!("{a}q_norm.weight"), g.head_dim)?),
                    Some(ws.vector(&format!("{a}k_norm.weight"), g.head_dim)?),
                )
            } else {
                (None, None)
            };
            // A config with attention biases (Qwen2 always) and a file
            // without them would otherwise load and compute wrong logits.
            let proj = |n: &str, out: usize| -> Result<Linear> {
                let l = linear(ws, &format!("{a}{n}_proj"), out, h)?;
                match (&l.b, g.attention_bias) {
                    (None, true) => Err(ModelError::MissingTensor(format!("{a}{n}_proj.bias"))),
                    _ => Ok(l),
                }
            };
            Attention::Gqa(Box::new(Gqa {
                cfg: g.clone(),
                q: proj("q", qd)?,
                k: proj("k", kvd)?,
                v: proj("v", kvd)?,
                o: linear(ws, &format!("{a}o_proj"), h, qd)?,
                q_norm,
                k_norm,
                eps,
                scale,
            }))
        }
    })
}

/// Loads the routed experts accepted by `want(layer, expert)`.
pub fn load_experts(
    cfg: &ModelConfig,
    ws: &WeightStore,
    want: impl FnMut(usize, usize) -> bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LocalExperts> {
    let mut experts = LocalExperts::new(Vec::new());
    load_experts_into(cfg, ws, want, progress, &mut experts)?;
    Ok(experts)
}

/// Loads the routed experts accepted by `want(layer, expert)` into `bank`,
/// one at a time, so a device bank never holds the whole shard on the host.
pub fn load_experts_into(
    cfg: &ModelConfig,
    ws: &WeightStore,
    mut want: impl FnMut(usize, usize) -> bool,
    progress: &mut dyn FnMut(usize, usize),
    bank: &mut dyn ExpertBank,
) -> Result<()> {
    let layers: Vec<usize> = cfg.moe_layers().collect();
    for (n, &l) in layers.iter().enumerate() {
        for e in 0..cfg.moe.n_routed_experts {
            if want(l, e) {
                bank.insert(l, e, load_expert(cfg, ws, l, e)?)?;
            }
        }
        progress(n + 1, layers.len());
    }
    Ok(())
}

/// One routed expert's weights.
pub fn load_expert(cfg: &ModelConfig, ws: &WeightStore, layer: usize, expert: usize) -> Result<Mlp> {
    let (h, inter) = (cfg.hidden_size, cfg.moe.moe_intermediate_size);
    let [g, u, d] = expert_tensor_names(cfg, layer, expert);
    let (g, u, d) = (ws.matrix(&g, inter, h)?, ws.matrix(&u, inter, h)?, ws.matrix(&d, h, inter)?);
    Ok(Mlp::with_quant(g, u, d, None, ws.quant_for(QuantTarget::Routed)))
}

/// Decoder layer `i` (`model.layers.{i}.`), with the FFN kind given (the
/// MTP module's layer sits past `num_hidden_layers`).
pub(crate) fn load_layer(cfg: &ModelConfig, ws: &WeightStore, i: usize, ffn_kind: FfnKind) -> Result<Layer> {
    let h = cfg.hidden_size;
    let p = format!("model.layers.{i}.");
    let a = format!("{p}self_attn.");
    let attn = attention(ws, cfg, &a)?;
    let ffn = match ffn_kind {
        FfnKind::Dense => Ffn::Dense(mlp(
            ws,
            &format!("{p}mlp."),
            ["gate_proj", "up_proj", "down_proj"],
            (h, cfg.intermediate_size),
            QuantTarget::Dense,
        )?),
        FfnKind::Moe => {
            let m = if cfg.arch == Arch::Mixtral { "block_sparse_moe" } else { "mlp" };
            // Routing runs in f32 whatever the precision mode, as in transformers.
            let mut weight = ws.gate_matrix(&format!("{p}{m}.gate.weight"), cfg.moe.n_routed_experts, h)?;
            weight.set_precision(Precision::F32);
            let gate = Gate {
                weight,
                correction_bias: ws
                    .opt_vector(&format!("{p}{m}.gate.e_score_correction_bias"), cfg.moe.n_routed_experts)?,
            };
            let shared = match cfg.moe.n_shared_experts {
                0 => None,
                n => Some(mlp(
                    ws,
                    &format!("{p}mlp.shared_experts."),
                    ["gate_proj", "up_proj", "down_proj"],
                    (h, cfg.moe.moe_intermediate_size * n),
                    QuantTarget::Shared,
                )?),
            };
            Ffn::Moe { gate, shared }
        }
    };
    Ok(Layer {
        input_norm: ws.vector(&format!("{p}input_layernorm.weight"), h)?,
        post_norm: ws.vector(&format!("{p}post_attention_layernorm.weight"), h)?,
        attn,
        ffn,
    })
}

impl Model {
    /// Loads config, dense weights and all routed experts into one process.
    pub fn load(dir: &Path, opts: impl Into<WeightArgs>, progress: &mut dyn FnMut(usize, usize)) -> Result<Model> {
        let cfg = ModelConfig::from_dir(dir)?;
        let ws = WeightStore::for_model(dir, &cfg, opts)?;
        let experts = load_experts(&cfg, &ws, |_, _| true, &mut |_, _| {})?;
        Model::load_dense(cfg, &ws, Arc::new(experts), progress)
    }

    /// Loads everything but the routed experts, which `executor` computes.
    pub fn load_dense(
        cfg: ModelConfig,
        ws: &WeightStore,
        executor: Arc<dyn ExpertExecutor>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Model> {
        let h = cfg.hidden_size;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            layers.push(load_layer(&cfg, ws, i, cfg.layer_ffn[i])?);
            progress(i + 1, cfg.num_layers);
        }
        // Packed: it doubles as the LM head when the embeddings are tied.
        let dense = ws.quant_for(QuantTarget::Dense);
        let embed = ws.matrix("model.embed_tokens.weight", cfg.vocab_size, h)?.prepared(dense);
        let lm_head = if cfg.tie_word_embeddings && !ws.contains("lm_head.weight") {
            None
        } else {
            Some(ws.matrix("lm_head.weight", cfg.vocab_size, h)?.prepared(dense))
        };
        Ok(Model {
            norm: ws.vector("model.norm.weight", h)?,
            rope: Rope::new(&cfg.rope),
            pool: KvPool::new(PoolConfig::default(), cfg.num_layers, row_width(&cfg))?,
            mtp: crate::mtp::Mtp::load(&cfg, ws)?,
            cfg,
            embed,
            layers,
            lm_head,
            executor,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// An empty cache.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(&self.cfg, &self.pool)
    }

    /// A cache holding the longest cached prefix of `prompt` (with the
    /// prefix cache on; else empty).
    pub fn new_cache_for(&self, prompt: &[u32]) -> KvCache {
        KvCache::with_prefix(&self.cfg, &self.pool, prompt)
    }

    /// Replaces the block pool (size, budget, prefix sharing); caches made
    /// before keep the old one. The MTP module's pool, when loaded, takes
    /// the same block size, dtype and number of blocks (each a layer's, not
    /// the model's), unshared: its positions have no prefix-cache entries.
    pub fn configure_kv_pool(&mut self, cfg: PoolConfig) -> Result<()> {
        self.pool = KvPool::new(cfg, self.cfg.num_layers, row_width(&self.cfg))?;
        if let Some(mtp) = &mut self.mtp {
            mtp.pool = KvPool::new(PoolConfig { prefix_cache: false, ..cfg }, 1, row_width(&self.cfg))?;
        }
        Ok(())
    }

    pub fn kv_pool(&self) -> &KvPool {
        &self.pool
    }

    /// Checks a chunk before any state changes, so a bad request in a batch is
    /// refused without touching the others.
    pub fn validate(&self, tokens: &[u32], cached: usize) -> Result<()> {
        if tokens.is_empty() {
            return Err(ModelError::InvalidInput("empty token chunk".into()));
        }
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(ModelError::InvalidInput(format!(
                "token id {t} is out of range (vocab size {})",
                self.cfg.vocab_size
            )));
        }
        if cached + tokens.len() > self.cfg.max_position_embeddings {
            return Err(ModelError::InvalidInput(format!(
                "sequence of {} tokens exceeds max_position_embeddings ({})",
                cached + tokens.len(),
                self.cfg.max_position_embeddings
            )));
        }
        Ok(())
    }

    /// Marks a step boundary for the expert executor (see
    /// [`ExpertExecutor::begin_step`]); the serving loop calls it before
    /// each step.
    pub fn begin_step(&self) {
        self.executor.begin_step();
    }

    /// Runs one forward step over several sequences at once (each with its
    /// own cache and any number of new tokens), appending to their caches.
    /// Returns per sequence the logits rows requested by `mode`.
    pub fn forward(&self, batch: &mut [SeqChunk<'_>], mode: Logits) -> Result<Vec<Vec<f32>>> {
        self.forward_into(batch, &vec![mode; batch.len()], None)
    }

    /// [`forward`](Self::forward) (or, with `overlap`,
    /// [`forward_overlapped`](Self::forward_overlapped)) that also returns
    /// every new row's final-norm hidden state, which DeepSeek's MTP module
    /// reads.
    pub fn forward_hidden(&self, batch: &mut [SeqChunk<'_>], mode: Logits, overlap: bool) -> Result<StepRows> {
        self.forward_each(batch, &vec![mode; batch.len()], overlap, true)
    }

    /// The general step: `modes[i]` is sequence i's logits rows (a scoring
    /// prompt's every row need not cost its batch-mates their LM head on
    /// every prefill row), `overlap` runs two micro-batches, and `hidden`
    /// also returns every new row's final-norm hidden state (else empty).
    pub fn forward_each(
        &self,
        batch: &mut [SeqChunk<'_>],
        modes: &[Logits],
        overlap: bool,
        hidden: bool,
    ) -> Result<StepRows> {
        if modes.len() != batch.len() {
            return Err(ModelError::InvalidInput(format!(
                "{} logits modes for {} sequences",
                modes.len(),
                batch.len()
            )));
        }
        let mut rows = Vec::with_capacity(if hidden { batch.len() } else { 0 });
        let out = hidden.then_some(&mut rows);
        let logits =
            if overlap { self.overlapped_into(batch, modes, out)? } else { self.forward_into(batch, modes, out)? };
        Ok((logits, rows))
    }

    fn forward_into(
        &self,
        batch: &mut [SeqChunk<'_>],
        modes: &[Logits],
        hidden: Option<&mut Vec<Vec<f32>>>,
    ) -> Result<Vec<Vec<f32>>> {
        for s in batch.iter() {
            self.validate(s.tokens, s.cache.len())?;
        }
        let before: Vec<usize> = batch.iter().map(|s| s.cache.len()).collect();
        // Blocks first, so a full pool fails the step before any compute.
        if let Some(e) = batch.iter_mut().find_map(|s| s.cache.reserve(s.tokens.len()).err()) {
            for (s, len) in batch.iter_mut().zip(&before) {
                s.cache.truncate(*len);
            }
            return Err(e);
        }
        // Run the step on a pool worker: nested parallel loops then split by
        // work stealing instead of waking the pool for every matrix product.
        let out = rayon::scope(|_| self.forward_unchecked(batch, modes, hidden));
        if out.is_err() {
            // An executor or numerical failure part-way must not leave
            // half-written caches behind.
            for (s, len) in batch.iter_mut().zip(before) {
                s.cache.truncate(len);
            }
        }
        out
    }

    /// [`forward`](Self::forward) with the sequences split into two
    /// token-balanced micro-batches run concurrently (two-batch overlap):
    /// while one half waits for its routed experts (on other processes), the
    /// other half computes attention. Every sequence's result is the same as
    /// in one batch. If either half fails, both are rolled back.
    pub fn forward_overlapped(&self, batch: &mut [SeqChunk<'_>], mode: Logits) -> Result<Vec<Vec<f32>>> {
        self.overlapped_into(batch, &vec![mode; batch.len()], None)
    }

    fn overlapped_into(
        &self,
        batch: &mut [SeqChunk<'_>],
        modes: &[Logits],
        hidden: Option<&mut Vec<Vec<f32>>>,
    ) -> Result<Vec<Vec<f32>>> {
        if batch.len() < 2 {
            return self.forward_into(batch, modes, hidden);
        }
        let total: usize = batch.iter().map(|s| s.tokens.len()).sum();
        let (mut acc, mut mid) = (0, batch.len() - 1);
        for (i, s) in batch.iter().enumerate() {
            acc += s.tokens.len();
            if 2 * acc >= total {
                mid = (i + 1).min(batch.len() - 1);
                break;
            }
        }
        let before: Vec<usize> = batch.iter().map(|s| s.cache.len()).collect();
        let (a, b) = batch.split_at_mut(mid);
        let (ma, mb) = modes.split_at(mid);
        let want = hidden.is_some();
        let (mut ha, mut hb) = (Vec::new(), Vec::new());
        let (ra, rb) = rayon::join(
            || self.forward_into(a, ma, want.then_some(&mut ha)),
            || self.forward_into(b, mb, want.then_some(&mut hb)),
        );
        match (ra, rb) {
            (Ok(mut x), Ok(y)) => {
                x.extend(y);
                if let Some(out) = hidden {
                    out.extend(ha.into_iter().chain(hb));
                }
                Ok(x)
            }
            (Err(e), _) | (_, Err(e)) => {
                for (s, len) in batch.iter_mut().zip(before) {
                    s.cache.truncate(len);
                }
                Err(e)
            }
        }
    }

    /// One decoder layer over the step's rows `x`, in place: attention on
    /// cache layer `cache_layer`, routed experts as layer `expert_layer`.
    pub(crate) fn run_layer(
        &self,
        cache_layer: usize,
        expert_layer: usize,
        layer: &Layer,
        x: &mut [f32],
        tokens: usize,
        seqs: &mut [SeqSlice<'_>],
    ) -> Result<()> {
        let h = self.cfg.hidden_size;
        let mut hbuf = x.to_vec();
        rms_norm(&mut hbuf, &layer.input_norm, self.cfg.rms_norm_eps);
        let a = layer.attn.forward(cache_layer, &hbuf, tokens, seqs, &self.rope)?;
        x.iter_mut().zip(&a).for_each(|(v, d)| *v += d);
        hbuf.copy_from_slice(x);
        rms_norm(&mut hbuf, &layer.post_norm, self.cfg.rms_norm_eps);
        let y = match &layer.ffn {
            Ffn::Dense(m) => m.forward(&hbuf, tokens),
            Ffn::Moe { gate, shared } => {
                let routing = gate.route(&self.cfg.moe, &hbuf, tokens);
                // The shared expert runs while the routed experts are computed
                // (or, with a remote executor, while the dispatch is in flight).
                let batch = RoutedBatch { layer: expert_layer, hidden: &hbuf, hidden_size: h, routing: &routing };
                let (routed, shared_out) =
                    rayon::join(|| self.executor.execute(batch), || shared.as_ref().map(|m| m.forward(&hbuf, tokens)));
                let routed = routed?;
                if routed.len() != tokens * h {
                    return Err(ModelError::Executor(format!(
                        "executor returned {} values for {tokens} tokens of width {h}",
                        routed.len()
                    )));
                }
                match shared_out {
                    Some(s) => s.iter().zip(&routed).map(|(a, b)| a + b).collect(),
                    None => routed,
                }
            }
        };
        x.iter_mut().zip(&y).for_each(|(v, d)| *v += d);
        Ok(())
    }

    /// The LM head over `n` final-normed rows.
    pub(crate) fn head_logits(&self, rows: &[f32], n: usize) -> Vec<f32> {
        let head: MatView<'_> = self.lm_head.as_ref().unwrap_or(&self.embed).view();
        matmul(rows, n, head, self.cfg.vocab_size, self.cfg.hidden_size)
    }

    /// The embedding rows of `tokens`.
    pub(crate) fn embed_rows(&self, tokens: impl Iterator<Item = u32>) -> Vec<f32> {
        let h = self.cfg.hidden_size;
        let mut x = Vec::new();
        for t in tokens {
            // Element-wise, so it works on the packed layout (one row per token is cheap).
            let (emb, base) = (self.embed.view(), t as usize * h);
            x.extend((0..h).map(|i| emb.get(base + i)));
        }
        x
    }

    /// With `hidden`, also returns there each sequence's final-norm hidden
    /// states of every new row (what DeepSeek's MTP module reads).
    pub(crate) fn forward_unchecked(
        &self,
        batch: &mut [SeqChunk<'_>],
        modes: &[Logits],
        hidden: Option<&mut Vec<Vec<f32>>>,
    ) -> Result<Vec<Vec<f32>>> {
        let h = self.cfg.hidden_size;
        let tokens: usize = batch.iter().map(|s| s.tokens.len()).sum();
        let mut x = self.embed_rows(batch.iter().flat_map(|s| s.tokens.iter().copied()));
        let tokens_of: Vec<&[u32]> = batch.iter().map(|s| s.tokens).collect();
        let mut seqs = Vec::with_capacity(batch.len());
        let mut start = 0;
        for s in batch.iter_mut() {
            seqs.push(SeqSlice { cache: &mut *s.cache, start, len: s.tokens.len() });
            start += s.tokens.len();
        }
        for (li, layer) in self.layers.iter().enumerate() {
            self.run_layer(li, li, layer, &mut x, tokens, &mut seqs)?;
        }
        for (s, t) in seqs.iter_mut().zip(&tokens_of) {
            s.cache.advance(t);
        }
        // Final norm and LM head only on the rows whose logits are wanted.
        let rows: Vec<usize> =
            seqs.iter().zip(modes).flat_map(|(s, m)| s.start + s.len - m.rows(s.len)..s.start + s.len).collect();
        let normed = hidden.is_some();
        if let Some(out) = hidden {
            rms_norm(&mut x, &self.norm, self.cfg.rms_norm_eps);
            out.extend(seqs.iter().map(|s| x[s.start * h..(s.start + s.len) * h].to_vec()));
        }
        let mut last = Vec::with_capacity(rows.len() * h);
        for &r in &rows {
            last.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        if !normed {
            rms_norm(&mut last, &self.norm, self.cfg.rms_norm_eps);
        }
        let v = self.cfg.vocab_size;
        let logits = self.head_logits(&last, rows.len());
        if let Some(i) = logits.iter().position(|l| !l.is_finite()) {
            return Err(ModelError::Numerical(format!(
                "non-finite logit {} at vocab index {} (the checkpoint or an expert produced NaN/inf)",
                logits[i],
                i % v
            )));
        }
        let mut out = Vec::with_capacity(seqs.len());
        let mut off = 0;
        for (s, m) in seqs.iter().zip(modes) {
            let n = m.rows(s.len);
            out.push(logits[off * v..(off + n) * v].to_vec());
            off += n;
        }
        Ok(out)
    }
}
