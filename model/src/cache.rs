//! Per-sequence KV cache.
//!
//! MLA layers keep only the compressed latent: `kv_lora_rank` normalised
//! latent values plus `qk_rope_head_dim` rotated key values per token, which
//! is what makes DeepSeek's cache small. GQA layers keep keys and values per
//! KV head.

use crate::config::{AttentionConfig, ModelConfig};

#[derive(Debug, Clone)]
pub(crate) enum LayerCache {
    /// `[len, width]`, width = `kv_lora_rank + qk_rope_head_dim`.
    Mla { latent: Vec<f32>, width: usize },
    /// `[kv_heads][len, head_dim]` for keys and values.
    Gqa { k: Vec<Vec<f32>>, v: Vec<Vec<f32>>, head_dim: usize },
}

/// The cache of one sequence: every position before `len()` has been run
/// through the model.
#[derive(Debug, Clone)]
pub struct KvCache {
    len: usize,
    pub(crate) layers: Vec<LayerCache>,
}

impl KvCache {
    pub fn new(cfg: &ModelConfig) -> Self {
        let layer = match &cfg.attention {
            AttentionConfig::Mla(m) => {
                LayerCache::Mla { latent: Vec::new(), width: m.kv_lora_rank + m.qk_rope_head_dim }
            }
            AttentionConfig::Gqa(g) => LayerCache::Gqa {
                k: vec![Vec::new(); g.num_kv_heads],
                v: vec![Vec::new(); g.num_kv_heads],
                head_dim: g.head_dim,
            },
        };
        KvCache { len: 0, layers: vec![layer; cfg.num_layers] }
    }

    /// Tokens cached so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Bytes one more token costs (f32 values over all layers), for KV-cache
    /// memory budgets.
    pub fn bytes_per_token(cfg: &ModelConfig) -> usize {
        let per_layer = match &cfg.attention {
            AttentionConfig::Mla(m) => m.kv_lora_rank + m.qk_rope_head_dim,
            AttentionConfig::Gqa(g) => 2 * g.num_kv_heads * g.head_dim,
        };
        per_layer * cfg.num_layers * 4
    }

    /// Drops every layer's entries past `len` tokens: undoes a forward step
    /// that failed part-way, so a failed step leaves the sequence as it was.
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        for l in &mut self.layers {
            match l {
                LayerCache::Mla { latent, width } => latent.truncate(len * *width),
                LayerCache::Gqa { k, v, head_dim } => {
                    for x in k.iter_mut().chain(v.iter_mut()) {
                        x.truncate(len * *head_dim);
                    }
                }
            }
        }
    }
}
