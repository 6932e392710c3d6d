//! Attention: MLA (DeepSeek) over the compressed latent cache with absorbed
//! weights, and GQA (Qwen3-MoE, Mixtral).

use crate::cache::KvCache;
use crate::config::{GqaConfig, MlaConfig};
use crate::error::Result;
use crate::kernels::matmul;
use crate::kernels::quant::QuantFormat;
use crate::kernels::rows::{Row, axpy_row, dot_row};
use crate::moe::add_bias;
use crate::ops::{Rope, rms_norm, softmax};
use crate::tensor::Matrix;
use rayon::prelude::*;

/// A linear layer with an optional bias.
pub struct Linear {
    pub w: Matrix,
    pub b: Option<Vec<f32>>,
}

impl Linear {
    pub fn forward(&self, x: &[f32], tokens: usize) -> Vec<f32> {
        let mut y = matmul(x, tokens, self.w.view(), self.w.rows(), self.w.cols());
        if let Some(b) = &self.b {
            add_bias(&mut y, b);
        }
        y
    }
}

/// The rows of a forward step that belong to one sequence.
pub struct SeqSlice<'a> {
    pub cache: &'a mut KvCache,
    /// First row of this sequence in the flattened batch.
    pub start: usize,
    pub len: usize,
}

/// Query rows attended together: each key and value is read once per tile
/// (from L1) instead of once per row, which matters once the cache
/// outgrows the L2 (MLA's heads all read the same latents, GQA's group).
const ROW_TILE: usize = 16;

/// Softmax attention of `rows` query rows over cached keys, causal (row r
/// sees positions `lo(r)..hi(r)`). `key(t)` and `val(t)` give position t's
/// key (`q_dim` wide) and value (`val_dim` wide), wherever its block is.
/// Returns `[rows, val_dim]`. Each row's scores, softmax and weighted sum
/// are computed in the same order as one row alone would be, so tiling
/// does not change any result.
fn attend<'c>(
    q: &[f32],
    q_dim: usize,
    key_range: impl Fn(usize) -> (usize, usize) + Sync,
    key: impl Fn(usize) -> Row<'c> + Sync,
    val: impl Fn(usize) -> Row<'c> + Sync,
    val_dim: usize,
    scale: f32,
) -> Vec<f32> {
    let rows = q.len() / q_dim;
    let mut out = vec![0f32; rows * val_dim];
    let work: usize = (0..rows).map(|r| key_range(r).1 - key_range(r).0).sum::<usize>() * (q_dim + val_dim);
    // Small batches (a decode step's few heads) still need a tile per thread.
    let parallel = work > 1 << 16;
    let per_tile = if parallel { rows.div_ceil(2 * rayon::current_num_threads()).clamp(1, ROW_TILE) } else { ROW_TILE };
    let tile = |(i, o): (usize, &mut [f32])| {
        let r0 = i * per_tile;
        let n = o.len() / val_dim;
        let ranges: Vec<(usize, usize)> = (r0..r0 + n).map(&key_range).collect();
        let lo = ranges.iter().map(|r| r.0).min().unwrap_or(0);
        let hi = ranges.iter().map(|r| r.1).max().unwrap_or(0);
        // Keys outer, rows inner: one key serves every row of the tile.
        let mut scores: Vec<Vec<f32>> = ranges.iter().map(|(a, b)| Vec::with_capacity(b - a)).collect();
        for t in lo..hi {
            let k = key(t);
            for (j, &(a, b)) in ranges.iter().enumerate() {
                if a <= t && t < b {
                    scores[j].push(dot_row(&q[(r0 + j) * q_dim..(r0 + j + 1) * q_dim], k) * scale);
                }
            }
        }
        scores.iter_mut().for_each(|s| softmax(s));
        for t in lo..hi {
            let v = val(t);
            for (j, (&(a, b), s)) in ranges.iter().zip(&scores).enumerate() {
                if a <= t && t < b {
                    axpy_row(s[t - a], v, &mut o[j * val_dim..(j + 1) * val_dim]);
                }
            }
        }
    };
    if parallel {
        out.par_chunks_mut(per_tile * val_dim).enumerate().for_each(tile);
    } else {
        out.chunks_mut(per_tile * val_dim).enumerate().for_each(tile);
    }
    out
}

pub enum QProj {
    Direct(Linear),
    Lora { a: Linear, norm: Vec<f32>, b: Linear },
}

pub struct Mla {
    pub cfg: MlaConfig,
    pub q: QProj,
    pub kv_a: Linear,
    pub kv_norm: Vec<f32>,
    /// Per head `W_ukᵀ` (`[kv_lora_rank, qk_nope]`, in the checkpoint's
    /// dtype or quantized): folds the key up-projection into the query so
    /// scores are taken against the latent.
    pub w_uk_t: Vec<Matrix>,
    /// Per head `W_uv` (`[v_head_dim, kv_lora_rank]`): applied after
    /// attending over the latent, so the cache is never re-expanded.
    pub w_uv: Vec<Matrix>,
    pub o: Linear,
    pub eps: f32,
    pub scale: f32,
}

impl Mla {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: MlaConfig,
        q: QProj,
        kv_a: Linear,
        kv_norm: Vec<f32>,
        kv_b: Matrix,
        o: Linear,
        eps: f32,
        scale: f32,
        quant: Option<(QuantFormat, usize)>,
    ) -> Self {
        let (dn, dv) = (cfg.qk_nope_head_dim, cfg.v_head_dim);
        // Both halves are multiplied whole, so they take the dense layers'
        // layout: packed bf16, or quantized under `--quantize-targets dense`
        // (as llama.cpp quantizes `attn_kv_b`).
        let w_uk_t = (0..cfg.num_heads)
            .map(|h| {
                let base = h * (dn + dv);
                kv_b.slice_rows(base, base + dn).transposed().prepared(quant)
            })
            .collect();
        let w_uv = (0..cfg.num_heads)
            .map(|h| {
                let base = h * (dn + dv) + dn;
                kv_b.slice_rows(base, base + dv).prepared(quant)
            })
            .collect();
        Mla { cfg, q, kv_a, kv_norm, w_uk_t, w_uv, o, eps, scale }
    }

    pub fn forward(
        &self,
        layer: usize,
        x: &[f32],
        tokens: usize,
        seqs: &mut [SeqSlice<'_>],
        rope: &Rope,
    ) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let (nh, dn, dr, dv, r) = (c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank);
        let qd = dn + dr;
        let mut q = match &self.q {
            QProj::Direct(p) => p.forward(x, tokens),
            QProj::Lora { a, norm, b } => {
                let mut qa = a.forward(x, tokens);
                rms_norm(&mut qa, norm, self.eps);
                b.forward(&qa, tokens)
            }
        };
        let mut ckv = self.kv_a.forward(x, tokens);
        let lat = r + dr;
        for s in seqs.iter() {
            let p0 = s.cache.len();
            for i in 0..s.len {
                let t = s.start + i;
                let row = &mut ckv[t * lat..(t + 1) * lat];
                rms_norm(&mut row[..r], &self.kv_norm, self.eps);
                rope.apply(&mut row[r..], p0 + i);
                for h in 0..nh {
                    let off = t * nh * qd + h * qd + dn;
                    rope.apply(&mut q[off..off + dr], p0 + i);
                }
            }
        }
        // Absorbed query: per head, q_nope · W_uk gives a kv_lora_rank vector,
        // so scores are taken directly against the cached latent.
        let mut qfull = vec![0f32; tokens * nh * lat];
        let mut qn = vec![0f32; tokens * dn];
        for h in 0..nh {
            for t in 0..tokens {
                let off = t * nh * qd + h * qd;
                qn[t * dn..(t + 1) * dn].copy_from_slice(&q[off..off + dn]);
            }
            let qa = matmul(&qn, tokens, self.w_uk_t[h].view(), r, dn);
            for t in 0..tokens {
                let dst = (t * nh + h) * lat;
                qfull[dst..dst + r].copy_from_slice(&qa[t * r..(t + 1) * r]);
                let off = t * nh * qd + h * qd + dn;
                qfull[dst + r..dst + lat].copy_from_slice(&q[off..off + dr]);
            }
        }
        let mut latent_out = vec![0f32; tokens * nh * r];
        for s in seqs.iter_mut() {
            let p0 = s.cache.len();
            s.cache.write(layer, p0, &ckv[s.start * lat..(s.start + s.len) * lat])?;
            let rows = &qfull[s.start * nh * lat..(s.start + s.len) * nh * lat];
            // Keys are the whole latent row, values its first kv_lora_rank entries.
            let cache = &*s.cache;
            let key = |t| cache.row(layer, t);
            let val = |t| cache.row(layer, t).slice(0, r);
            let o = attend(rows, lat, |row| (0, p0 + row / nh + 1), key, val, r, self.scale);
            latent_out[s.start * nh * r..(s.start + s.len) * nh * r].copy_from_slice(&o);
        }
        // Absorbed output: per head, W_uv maps the attended latent to v_head_dim.
        let mut heads = vec![0f32; tokens * nh * dv];
        let mut lh = vec![0f32; tokens * r];
        for h in 0..nh {
            for t in 0..tokens {
                let src = (t * nh + h) * r;
                lh[t * r..(t + 1) * r].copy_from_slice(&latent_out[src..src + r]);
            }
            let vh = matmul(&lh, tokens, self.w_uv[h].view(), dv, r);
            for t in 0..tokens {
                let dst = t * nh * dv + h * dv;
                heads[dst..dst + dv].copy_from_slice(&vh[t * dv..(t + 1) * dv]);
            }
        }
        Ok(self.o.forward(&heads, tokens))
    }
}

pub struct Gqa {
    pub cfg: GqaConfig,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub eps: f32,
    pub scale: f32,
}

impl Gqa {
    pub fn forward(
        &self,
        layer: usize,
        x: &[f32],
        tokens: usize,
        seqs: &mut [SeqSlice<'_>],
        rope: &Rope,
    ) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let rep = nh / nkv;
        let mut q = self.q.forward(x, tokens);
        let mut k = self.k.forward(x, tokens);
        let v = self.v.forward(x, tokens);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            rms_norm(&mut q, qn, self.eps);
            rms_norm(&mut k, kn, self.eps);
        }
        for s in seqs.iter() {
            let p0 = s.cache.len();
            for i in 0..s.len {
                let t = s.start + i;
                for h in q[t * nh * hd..(t + 1) * nh * hd].chunks_exact_mut(hd) {
                    rope.apply(h, p0 + i);
                }
                for h in k[t * nkv * hd..(t + 1) * nkv * hd].chunks_exact_mut(hd) {
                    rope.apply(h, p0 + i);
                }
            }
        }
        let mut heads = vec![0f32; tokens * nh * hd];
        let window = c.sliding_window.unwrap_or(usize::MAX);
        let kvd = nkv * hd;
        let mut kv_rows = Vec::new();
        for s in seqs.iter_mut() {
            let p0 = s.cache.len();
            // Each position's row: its keys over all KV heads, then its values.
            kv_rows.clear();
            for t in s.start..s.start + s.len {
                kv_rows.extend_from_slice(&k[t * kvd..(t + 1) * kvd]);
                kv_rows.extend_from_slice(&v[t * kvd..(t + 1) * kvd]);
            }
            s.cache.write(layer, p0, &kv_rows)?;
            let cache = &*s.cache;
            for g in 0..nkv {
                // Rows: this sequence's tokens × the query heads of group g.
                let mut rows = Vec::with_capacity(s.len * rep * hd);
                for i in 0..s.len {
                    let t = s.start + i;
                    rows.extend_from_slice(&q[(t * nh + g * rep) * hd..(t * nh + (g + 1) * rep) * hd]);
                }
                let range = |row: usize| {
                    let pos = p0 + row / rep;
                    ((pos + 1).saturating_sub(window), pos + 1)
                };
                let key = |t| cache.row(layer, t).slice(g * hd, (g + 1) * hd);
                let val = |t| cache.row(layer, t).slice(kvd + g * hd, kvd + (g + 1) * hd);
                let o = attend(&rows, hd, range, key, val, hd, self.scale);
                for i in 0..s.len {
                    let t = s.start + i;
                    let dst = (t * nh + g * rep) * hd;
                    heads[dst..dst + rep * hd].copy_from_slice(&o[i * rep * hd..(i + 1) * rep * hd]);
                }
            }
        }
        Ok(self.o.forward(&heads, tokens))
    }
}

pub enum Attention {
    Mla(Box<Mla>),
    Gqa(Box<Gqa>),
}

impl Attention {
    pub fn forward(
        &self,
        layer: usize,
        x: &[f32],
        tokens: usize,
        seqs: &mut [SeqSlice<'_>],
        rope: &Rope,
    ) -> Result<Vec<f32>> {
        match self {
            Attention::Mla(m) => m.forward(layer, x, tokens, seqs, rope),
            Attention::Gqa(g) => g.forward(layer, x, tokens, seqs, rope),
        }
    }
}
