//! The block pool and paged caches under random workloads: what every
//! position holds, no leaked or doubly freed block, prefix sharing, COW,
//! eviction and a full pool.

use super::*;
use crate::config::ModelConfig;
use crate::kernels::rows::Row;
use proptest::prelude::*;

fn cfg() -> ModelConfig {
    ModelConfig::from_json_str(
        r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"num_hidden_layers":2,
        "num_attention_heads":2,"num_key_value_heads":1,"intermediate_size":4}"#,
    )
    .unwrap()
}

/// The value a position's row holds: its position and token, so a block
/// shared by two sequences is right for both only if their prefixes agree.
fn mark(layer: usize, pos: usize, tok: u32) -> f32 {
    (layer * 100_000 + pos * 10 + tok as usize) as f32
}

/// Appends `toks` as a forward step would: reserve, write every layer, advance.
fn grow(c: &mut KvCache, toks: &[u32]) -> Result<()> {
    let before = c.len();
    if let Err(e) = c.reserve(toks.len()) {
        c.truncate(before);
        return Err(e);
    }
    let w = c.width;
    for layer in 0..2 {
        let rows: Vec<f32> = toks.iter().enumerate().flat_map(|(i, &t)| vec![mark(layer, before + i, t); w]).collect();
        c.write(layer, before, &rows)?;
    }
    c.advance(toks);
    Ok(())
}

fn check(c: &KvCache) {
    for layer in 0..2 {
        for (p, &t) in c.tokens.iter().enumerate() {
            let Row::F32(row) = c.row(layer, p) else { panic!("an f32 pool") };
            assert!(row.iter().all(|&v| v == mark(layer, p, t)), "layer {layer} position {p}");
        }
    }
    assert_eq!(c.tokens.len(), c.len());
}

#[derive(Debug, Clone)]
enum Op {
    /// A sequence whose prompt is the first `len` tokens of base `which`.
    Start {
        which: bool,
        len: usize,
    },
    Grow {
        seq: usize,
        tokens: Vec<u32>,
    },
    Truncate {
        seq: usize,
        len: usize,
    },
    Drop {
        seq: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (any::<bool>(), 1..40usize).prop_map(|(which, len)| Op::Start { which, len }),
        (0..6usize, proptest::collection::vec(0..3u32, 1..12)).prop_map(|(seq, tokens)| Op::Grow { seq, tokens }),
        (0..6usize, 0..40usize).prop_map(|(seq, len)| Op::Truncate { seq, len }),
        (0..6usize).prop_map(|seq| Op::Drop { seq }),
    ]
}

fn base(which: bool) -> Vec<u32> {
    (0..40u32).map(|i| if which { i % 3 } else { (i * 7 + 1) % 3 }).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn blocks_are_neither_leaked_nor_shared_wrongly(
        ops in proptest::collection::vec(op(), 1..60),
        prefix in any::<bool>(),
        capacity in 4..24usize,
    ) {
        let cfg = cfg();
        let pool = KvPool::new(PoolConfig { block_tokens: 4, capacity_blocks: Some(capacity), prefix_cache: prefix, ..PoolConfig::default() },
                               cfg.num_layers, row_width(&cfg)).unwrap();
        let mut seqs: Vec<KvCache> = Vec::new();
        for op in ops {
            match op {
                Op::Start { which, len } => {
                    let prompt = &base(which)[..len];
                    let mut c = KvCache::with_prefix(&cfg, &pool, prompt);
                    prop_assert!(c.len() < len || len == 0, "at least one token is left to compute");
                    let rest = prompt[c.len()..].to_vec();
                    if grow(&mut c, &rest).is_ok() {
                        seqs.push(c);
                    }
                }
                Op::Grow { seq, tokens } => {
                    if let Some(c) = seqs.get_mut(seq) {
                        let before = c.len();
                        if grow(c, &tokens).is_err() {
                            prop_assert_eq!(c.len(), before, "a failed step leaves the cache as it was");
                        }
                    }
                }
                Op::Truncate { seq, len } => {
                    if let Some(c) = seqs.get_mut(seq) {
                        c.truncate(len);
                    }
                }
                Op::Drop { seq } => {
                    if seq < seqs.len() {
                        seqs.swap_remove(seq);
                    }
                }
            }
            let st = pool.stats();
            prop_assert!(st.used_blocks <= capacity);
            // Every live block is held by a sequence or the table; no more.
            let mut live: Vec<*const Page> =
                seqs.iter().flat_map(|c| c.pages.iter().map(Arc::as_ptr)).collect();
            live.sort();
            live.dedup();
            prop_assert!(live.len() <= st.used_blocks);
            prop_assert!(st.used_blocks <= live.len() + st.cached_blocks);
            seqs.iter().for_each(check);
        }
        drop(seqs);
        let st = pool.stats();
        // Idle: only the prefix table holds blocks, and all of them may go.
        prop_assert_eq!(st.used_blocks, st.cached_blocks);
        prop_assert!(prefix || st.used_blocks == 0);
        prop_assert_eq!(pool.available(), capacity);
    }
}

#[test]
fn a_shared_prefix_is_found_and_a_full_pool_evicts_the_oldest_idle_block() {
    let cfg = cfg();
    let pcfg = PoolConfig { block_tokens: 4, capacity_blocks: Some(4), prefix_cache: true, ..PoolConfig::default() };
    let pool = KvPool::new(pcfg, cfg.num_layers, row_width(&cfg)).unwrap();
    let prompt: Vec<u32> = (0..9).map(|i| i % 3).collect();
    let mut a = KvCache::new(&cfg, &pool);
    grow(&mut a, &prompt).unwrap();
    assert_eq!((a.blocks(), pool.stats().cached_blocks), (3, 2));
    // Two full blocks are reused; the ninth token is computed.
    let b = KvCache::with_prefix(&cfg, &pool, &prompt);
    assert_eq!(b.len(), 8);
    assert_eq!(pool.stats().hit_tokens, 8);
    // A prompt of exactly two blocks reuses only one: one token must be computed.
    assert_eq!(KvCache::with_prefix(&cfg, &pool, &prompt[..8]).len(), 4);
    drop((a, b));
    assert_eq!(pool.available(), 4);
    // Something else fills the pool: the idle cached blocks are evicted.
    let mut c = KvCache::new(&cfg, &pool);
    grow(&mut c, &[2; 16]).unwrap();
    let st = pool.stats();
    assert_eq!((st.used_blocks, st.evictions), (4, 2));
    assert!(matches!(grow(&mut c, &[1]), Err(ModelError::KvCacheFull(_))));
    check(&c);
}

#[test]
fn writing_into_a_shared_partial_block_copies_it() {
    let cfg = cfg();
    let pool = KvPool::new(PoolConfig { block_tokens: 4, ..PoolConfig::default() }, 2, row_width(&cfg)).unwrap();
    let mut a = KvCache::new(&cfg, &pool);
    grow(&mut a, &[1, 2, 1, 2, 1, 2]).unwrap();
    let mut b = KvCache { pages: a.pages.clone(), tokens: a.tokens.clone(), ..KvCache::new(&cfg, &pool) };
    b.len = a.len;
    grow(&mut b, &[0]).unwrap();
    grow(&mut a, &[2]).unwrap();
    check(&a);
    check(&b);
    assert!(!Arc::ptr_eq(&a.pages[1], &b.pages[1]) && Arc::ptr_eq(&a.pages[0], &b.pages[0]));
}

/// A bf16 pool holds half the bytes and each value rounded once.
#[test]
fn bf16_pools_round_once_and_hold_half() {
    let cfg = cfg();
    let w = row_width(&cfg);
    let f = KvPool::new(PoolConfig { block_tokens: 4, ..PoolConfig::default() }, 2, w).unwrap();
    let pool =
        KvPool::new(PoolConfig { block_tokens: 4, dtype: KvDtype::Bf16, ..PoolConfig::default() }, 2, w).unwrap();
    assert_eq!(pool.block_bytes() * 2, f.block_bytes());
    let mut c = KvCache::new(&cfg, &pool);
    c.reserve(2).unwrap();
    let rows: Vec<f32> = (0..2 * w).map(|i| 1.0 + i as f32 / 7.0).collect();
    c.write(1, 0, &rows).unwrap();
    c.advance(&[3, 4]);
    let Row::Bf16(r) = c.row(1, 1) else { panic!("a bf16 pool") };
    for (got, want) in r.iter().zip(&rows[w..]) {
        assert_eq!(*got, crate::tensor::f32_to_bf16(*want));
    }
}

#[test]
fn bad_pool_sizes_are_refused() {
    let cfg = cfg();
    let w = row_width(&cfg);
    assert!(KvPool::new(PoolConfig { block_tokens: 12, ..PoolConfig::default() }, 2, w).is_err());
    assert!(KvPool::new(PoolConfig { capacity_blocks: Some(0), ..PoolConfig::default() }, 2, w).is_err());
}
