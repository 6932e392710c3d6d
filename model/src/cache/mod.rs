//! Per-sequence KV cache, paged: a table of fixed-size blocks from the
//! model's [`KvPool`].
//!
//! MLA layers keep only the compressed latent: `kv_lora_rank` normalised
//! latent values plus `qk_rope_head_dim` rotated key values per token, which
//! is what makes DeepSeek's cache small. GQA layers keep each token's keys
//! then values over all KV heads. A position's row for layer `l` lives in
//! block `pos / block_tokens` at `[l][pos % block_tokens]`.

mod pool;

pub use pool::{DEFAULT_BLOCK_TOKENS, KvDtype, KvPool, PoolConfig, PoolStats};

use crate::config::{AttentionConfig, ModelConfig};
use crate::error::{ModelError, Result};
use crate::kernels::rows::Row;
use crate::tensor::f32_to_bf16;
use pool::{Page, PageData};
use std::sync::Arc;

/// Floats one position takes in one layer.
pub fn row_width(cfg: &ModelConfig) -> usize {
    match &cfg.attention {
        AttentionConfig::Mla(m) => m.kv_lora_rank + m.qk_rope_head_dim,
        AttentionConfig::Gqa(g) => 2 * g.num_kv_heads * g.head_dim,
    }
}

/// The cache of one sequence: every position before `len()` has been run
/// through the model.
pub struct KvCache {
    len: usize,
    pages: Vec<Arc<Page>>,
    /// The tokens of the cached positions (the prefix table's keys).
    tokens: Vec<u32>,
    /// Chain hash of each full block so far.
    hashes: Vec<u64>,
    pool: KvPool,
    width: usize,
    /// log2 of the block size.
    shift: u32,
}

impl KvCache {
    /// An empty cache drawing blocks from `pool`.
    pub fn new(cfg: &ModelConfig, pool: &KvPool) -> Self {
        let b = pool.config().block_tokens;
        KvCache {
            len: 0,
            pages: Vec::new(),
            tokens: Vec::new(),
            hashes: Vec::new(),
            pool: pool.clone(),
            width: row_width(cfg),
            shift: b.trailing_zeros(),
        }
    }

    /// A cache that starts with the longest cached prefix of `prompt` in
    /// whole blocks, leaving at least one prompt token to compute (its
    /// logits are the first prediction).
    pub fn with_prefix(cfg: &ModelConfig, pool: &KvPool, prompt: &[u32]) -> Self {
        let mut c = KvCache::new(cfg, pool);
        let max_blocks = prompt.len().saturating_sub(1) >> c.shift;
        for (h, page) in pool.lookup(prompt, max_blocks) {
            c.hashes.push(h);
            c.pages.push(page);
        }
        c.len = c.pages.len() << c.shift;
        c.tokens.extend_from_slice(&prompt[..c.len]);
        c
    }

    /// Tokens cached so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Blocks this cache holds (shared ones included).
    pub fn blocks(&self) -> usize {
        self.pages.len()
    }

    fn block_tokens(&self) -> usize {
        1 << self.shift
    }

    /// Blocks that `n` more positions need beyond those held.
    pub fn blocks_needed(&self, n: usize) -> usize {
        (self.len + n).div_ceil(self.block_tokens()).saturating_sub(self.pages.len())
    }

    /// Makes room for `n` more positions: new blocks, and a private copy of
    /// a partly filled block that another holder shares. On failure the
    /// cache is as it was, except for blocks already added (released by
    /// [`truncate`](Self::truncate) or drop).
    pub fn reserve(&mut self, n: usize) -> Result<()> {
        let b = self.block_tokens();
        if !self.len.is_multiple_of(b) {
            let last = self.len >> self.shift;
            if Arc::strong_count(&self.pages[last]) > 1 {
                let mut fresh = self.pool.alloc()?;
                let copy =
                    Arc::get_mut(&mut fresh).ok_or_else(|| ModelError::KvCacheFull("fresh block shared".into()))?;
                if let (Some(dst), Some(src)) = (copy.data.as_mut(), self.pages[last].data.as_ref()) {
                    dst.copy_from(src);
                }
                self.pages[last] = fresh;
            }
        }
        for _ in 0..self.blocks_needed(n) {
            let p = self.pool.alloc()?;
            self.pages.push(p);
        }
        Ok(())
    }

    /// Writes `rows` (whole rows of this layer) at positions `pos..`; the
    /// blocks must have been reserved.
    pub(crate) fn write(&mut self, layer: usize, pos: usize, rows: &[f32]) -> Result<()> {
        let (w, b) = (self.width, self.block_tokens());
        for (i, row) in rows.chunks_exact(w).enumerate() {
            let p = pos + i;
            let page = self
                .pages
                .get_mut(p >> self.shift)
                .and_then(Arc::get_mut)
                .ok_or_else(|| ModelError::KvCacheFull(format!("position {p} has no private block reserved")))?;
            let off = (layer * b + (p & (b - 1))) * w;
            match page.data.as_mut() {
                Some(PageData::F32(d)) => d[off..off + w].copy_from_slice(row),
                Some(PageData::Bf16(d)) => d[off..off + w].iter_mut().zip(row).for_each(|(o, v)| *o = f32_to_bf16(*v)),
                None => {}
            }
        }
        Ok(())
    }

    /// Layer `layer`'s row at position `pos` (written before).
    #[inline]
    pub(crate) fn row(&self, layer: usize, pos: usize) -> Row<'_> {
        let (w, b) = (self.width, self.block_tokens());
        let off = (layer * b + (pos & (b - 1))) * w;
        match self.pages[pos >> self.shift].data.as_ref() {
            Some(PageData::F32(d)) => Row::F32(&d[off..off + w]),
            Some(PageData::Bf16(d)) => Row::Bf16(&d[off..off + w]),
            None => Row::F32(&[]),
        }
    }

    /// After a forward step wrote `tokens` at the end: the positions count,
    /// and each block they filled is offered to the prefix table.
    pub(crate) fn advance(&mut self, tokens: &[u32]) {
        self.len += tokens.len();
        self.tokens.extend_from_slice(tokens);
        let b = self.block_tokens();
        while self.hashes.len() < self.len / b {
            let i = self.hashes.len();
            let block = &self.tokens[i * b..(i + 1) * b];
            let h = self.pool.chain(self.hashes.last().copied(), block);
            self.pool.publish(h, block, &self.pages[i]);
            self.hashes.push(h);
        }
    }

    /// Bytes one more token costs over all layers, for KV-cache memory
    /// budgets.
    pub fn bytes_per_token(cfg: &ModelConfig, dtype: KvDtype) -> usize {
        Self::layer_bytes_per_token(cfg, dtype) * cfg.num_layers
    }

    /// Bytes one more token costs in one layer (the MTP module's cache has
    /// one).
    pub fn layer_bytes_per_token(cfg: &ModelConfig, dtype: KvDtype) -> usize {
        row_width(cfg) * dtype.bytes()
    }

    /// Drops every position past `len` (and the blocks they alone used):
    /// undoes a forward step that failed part-way, so a failed step leaves
    /// the sequence as it was.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        self.tokens.truncate(self.len);
        self.hashes.truncate(self.len >> self.shift);
        self.pages.truncate(self.len.div_ceil(self.block_tokens()));
    }
}

#[cfg(test)]
mod tests;
