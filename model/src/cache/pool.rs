//! The KV block pool: fixed-size blocks of `block_tokens` positions (every
//! layer's entries for those positions in one buffer), counted against a
//! capacity, and the prefix table that shares full blocks between
//! sequences.
//!
//! A block is an `Arc<Page>`. A sequence writes only into pages it holds
//! alone (a shared page is copied first), so full pages can be shared
//! without locks on the forward path; the pool's mutex is taken only to
//! allocate, release and look up blocks. A page's buffer returns to the
//! pool when its last holder drops it.
//!
//! Prefix caching: a full block is keyed by a hash chain over its tokens
//! and every token before it (seeded per pool, so per model), and its
//! tokens are kept to rule out collisions. The table holds one reference;
//! a block whose only holder is the table is free to evict, oldest use
//! first, when an allocation finds the pool full.

use crate::error::{ModelError, Result};
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};

/// How a pool is sized and whether it shares prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Positions per block.
    pub block_tokens: usize,
    /// Most blocks alive at once (`None`: unbounded, as offline runs are).
    pub capacity_blocks: Option<usize>,
    /// Keep full blocks for reuse by later sequences with the same prefix.
    pub prefix_cache: bool,
    pub dtype: KvDtype,
}

/// How cached rows are stored: f32 (exact), or bf16 (half the bytes;
/// rounded once when written, widened when read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    #[default]
    F32,
    Bf16,
}

impl KvDtype {
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 => 2,
        }
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            block_tokens: DEFAULT_BLOCK_TOKENS,
            capacity_blocks: None,
            prefix_cache: false,
            dtype: KvDtype::F32,
        }
    }
}

/// A block's values, `[layer][slot][width]`.
pub(crate) enum PageData {
    F32(Box<[f32]>),
    Bf16(Box<[u16]>),
}

impl PageData {
    fn new(dtype: KvDtype, n: usize) -> Self {
        match dtype {
            KvDtype::F32 => PageData::F32(vec![0f32; n].into_boxed_slice()),
            KvDtype::Bf16 => PageData::Bf16(vec![0u16; n].into_boxed_slice()),
        }
    }

    pub(crate) fn copy_from(&mut self, other: &PageData) {
        match (self, other) {
            (PageData::F32(a), PageData::F32(b)) => a.copy_from_slice(b),
            (PageData::Bf16(a), PageData::Bf16(b)) => a.copy_from_slice(b),
            // One pool has one dtype; pages of two pools never meet.
            _ => {}
        }
    }
}

/// 16 positions a block: 16, 32 and 64 decode and prefill within the
/// measurement's noise (`docs/benchmarks.md`, `tools/kv_block_bench.sh`),
/// and smaller blocks share more of a prefix and waste less at each
/// sequence's tail.
pub const DEFAULT_BLOCK_TOKENS: usize = 16;

/// Counters and levels of a pool, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub capacity_blocks: usize,
    pub used_blocks: usize,
    /// Blocks in the prefix table (in use or not).
    pub cached_blocks: usize,
    /// Prompt tokens looked up, and how many were found cached.
    pub queried_tokens: u64,
    pub hit_tokens: u64,
    pub evictions: u64,
}

/// One block's storage.
pub(crate) struct Page {
    /// `None` only while the page is being dropped.
    pub(crate) data: Option<PageData>,
    pool: Arc<Shared>,
}

impl Drop for Page {
    fn drop(&mut self) {
        let mut st = self.pool.lock();
        st.used -= 1;
        if let Some(d) = self.data.take() {
            st.free.push(d);
        }
    }
}

struct Entry {
    page: Arc<Page>,
    tokens: Box<[u32]>,
    tick: u64,
}

#[derive(Default)]
struct State {
    used: usize,
    free: Vec<PageData>,
    table: HashMap<u64, Entry>,
    /// Last use → chain hash, oldest first.
    lru: BTreeMap<u64, u64>,
    tick: u64,
    stats: PoolStats,
}

pub(crate) struct Shared {
    pub(crate) cfg: PoolConfig,
    /// Values per block: layers × block_tokens × width.
    block_floats: usize,
    seed: u64,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counters that are still
        // consistent (every update is a single statement), so go on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A model's KV block pool. Cheap to clone (a handle).
#[derive(Clone)]
pub struct KvPool(pub(crate) Arc<Shared>);

impl KvPool {
    /// A pool for blocks of `layers × block_tokens × width` floats.
    pub fn new(cfg: PoolConfig, layers: usize, width: usize) -> Result<Self> {
        if cfg.block_tokens == 0 || !cfg.block_tokens.is_power_of_two() {
            return Err(ModelError::InvalidInput(format!("KV block size {} must be a power of two", cfg.block_tokens)));
        }
        if cfg.capacity_blocks == Some(0) {
            return Err(ModelError::InvalidInput("the KV cache budget holds no block".into()));
        }
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
            as u64
            ^ (layers as u64) << 32
            ^ width as u64;
        let state = Mutex::new(State::default());
        Ok(KvPool(Arc::new(Shared { cfg, block_floats: layers * cfg.block_tokens * width, seed, state })))
    }

    pub fn config(&self) -> PoolConfig {
        self.0.cfg
    }

    /// Bytes one block holds.
    pub fn block_bytes(&self) -> usize {
        self.0.block_floats * self.0.cfg.dtype.bytes()
    }

    pub fn stats(&self) -> PoolStats {
        let st = self.0.lock();
        PoolStats {
            capacity_blocks: self.0.cfg.capacity_blocks.unwrap_or(usize::MAX),
            used_blocks: st.used,
            cached_blocks: st.table.len(),
            ..st.stats
        }
    }

    /// Blocks an allocation could get now: unused ones plus cached blocks
    /// no sequence holds.
    pub fn available(&self) -> usize {
        let st = self.0.lock();
        let idle = st.table.values().filter(|e| Arc::strong_count(&e.page) == 1).count();
        self.0.cfg.capacity_blocks.map_or(usize::MAX, |c| c.saturating_sub(st.used) + idle)
    }

    /// A fresh block, evicting the least recently used idle cached block
    /// when the pool is full; `KvCacheFull` when nothing can be evicted.
    pub(crate) fn alloc(&self) -> Result<Arc<Page>> {
        loop {
            let victim = {
                let mut st = self.0.lock();
                if self.0.cfg.capacity_blocks.is_none_or(|c| st.used < c) {
                    st.used += 1;
                    let data = st.free.pop().unwrap_or_else(|| PageData::new(self.0.cfg.dtype, self.0.block_floats));
                    return Ok(Arc::new(Page { data: Some(data), pool: self.0.clone() }));
                }
                let idle = st.lru.values().copied().find(|h| st.table.get(h).is_some_and(idle_entry));
                let Some(h) = idle else {
                    return Err(ModelError::KvCacheFull(format!(
                        "all {} KV blocks are in use",
                        self.0.cfg.capacity_blocks.unwrap_or(0)
                    )));
                };
                let e = st.table.remove(&h);
                if let Some(e) = &e {
                    st.lru.remove(&e.tick);
                }
                st.stats.evictions += 1;
                e
            };
            // Dropped without the lock: the page's release takes it.
            drop(victim);
        }
    }

    /// The chain hash of a full block of `tokens` following `prev`.
    pub(crate) fn chain(&self, prev: Option<u64>, tokens: &[u32]) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        prev.unwrap_or(self.0.seed).hash(&mut h);
        tokens.hash(&mut h);
        h.finish()
    }

    /// Offers a full block to the prefix table (kept if the key is new).
    pub(crate) fn publish(&self, hash: u64, tokens: &[u32], page: &Arc<Page>) {
        if !self.0.cfg.prefix_cache {
            return;
        }
        let mut st = self.0.lock();
        if st.table.contains_key(&hash) {
            return;
        }
        st.tick += 1;
        let tick = st.tick;
        st.lru.insert(tick, hash);
        st.table.insert(hash, Entry { page: page.clone(), tokens: tokens.into(), tick });
    }

    /// The cached blocks that start `prompt`, at most `max_blocks`, with
    /// their chain hashes; counts the lookup in the hit ratio.
    pub(crate) fn lookup(&self, prompt: &[u32], max_blocks: usize) -> Vec<(u64, Arc<Page>)> {
        let b = self.0.cfg.block_tokens;
        let mut found = Vec::new();
        let mut st = self.0.lock();
        st.stats.queried_tokens += prompt.len() as u64;
        if !self.0.cfg.prefix_cache {
            return found;
        }
        let mut prev = None;
        for block in prompt.chunks_exact(b).take(max_blocks) {
            let h = self.chain(prev, block);
            st.tick += 1;
            let tick = st.tick;
            let Some(e) = st.table.get_mut(&h).filter(|e| *e.tokens == *block) else { break };
            let old = std::mem::replace(&mut e.tick, tick);
            let page = e.page.clone();
            st.lru.remove(&old);
            st.lru.insert(tick, h);
            found.push((h, page));
            prev = Some(h);
        }
        st.stats.hit_tokens += (found.len() * b) as u64;
        found
    }
}

fn idle_entry(e: &Entry) -> bool {
    Arc::strong_count(&e.page) == 1
}
