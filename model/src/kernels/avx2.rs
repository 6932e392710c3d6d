//! AVX2 + FMA micro-kernels for CPUs without AVX-512 (AMD Zen 2/3, Intel
//! client cores before Sapphire Rapids): the packed-bf16 and the int8/int4
//! products, on the same layouts as the AVX-512 ones. A 16-row block is
//! taken as two halves of 8 rows (one 256-bit register each), so every
//! accumulator lane is still one output row and no horizontal sums are
//! needed.
//!
//! Both follow the AVX-512 kernels' order of operations, so their results
//! are bit-identical: the bf16 product is the same chain of fused
//! multiply-adds, and the quantized one the same exact integer sums
//! scaled by the same f32 steps. `EXPERTMESH_NO_AVX2` turns them off (the
//! portable loops run), as `EXPERTMESH_NO_AVX512` turns off the wider ones.

use super::packed::{self, BLOCK};
use super::quant::{QuantAct, QuantFormat, QuantMatrix};
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Rows of a half block: one register of eight f32 or i32 lanes.
const HALF: usize = 8;
/// Tokens per micro-kernel call: `B` accumulators (two for the quantized
/// kernel) beside the weights, within the 16 registers.
const TB: usize = 6;
const TB_QUANT: usize = 4;

/// Whether these kernels run: AVX2, FMA and F16C (the f16 group scales),
/// unless `EXPERTMESH_NO_AVX2` is set.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
            && std::env::var_os("EXPERTMESH_NO_AVX2").is_none()
    })
}

/// Stores 8 lanes at output columns `c..c+8`, only those below `n`.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn store(out: *mut f32, n: usize, row: usize, c: usize, v: __m256) {
    let live = n.saturating_sub(c).min(HALF);
    if live == HALF {
        // SAFETY: the caller owns columns c..c+8 of `row`.
        unsafe { _mm256_storeu_ps(out.add(row * n + c), v) };
    } else {
        let mut lanes = [0f32; HALF];
        // SAFETY: `lanes` holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
        for (i, l) in lanes.iter().take(live).enumerate() {
            // SAFETY: c + i < n, a column this caller owns.
            unsafe { *out.add(row * n + c + i) = *l };
        }
    }
}

/// Packed bf16 weights, f32 activations padded to `2·⌈k/2⌉`: output
/// columns `j0..j1` (block-aligned) for all `t` tokens.
///
/// # Safety
/// AVX2 and FMA available; otherwise as [`packed::block`].
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn packed_block(x: &[f32], t: usize, w: &[u16], n: usize, k: usize, j0: usize, j1: usize, out: *mut f32) {
    let kp = packed::pairs(k);
    super::tiles(j0, j1, t, false, TB, |j, _, ti, tb| {
        if tb == 1 {
            // SAFETY: as below.
            unsafe { packed_one(x, w, n, kp, j, ti, out) };
            return;
        }
        for half in 0..2 {
            // SAFETY: block j/16 and tokens ti..ti+tb are in range; the
            // caller owns columns j0..j1.
            unsafe {
                match tb {
                    1 => packed_tile::<1>(x, w, n, kp, j, half, ti, out),
                    2 => packed_tile::<2>(x, w, n, kp, j, half, ti, out),
                    3 => packed_tile::<3>(x, w, n, kp, j, half, ti, out),
                    4 => packed_tile::<4>(x, w, n, kp, j, half, ti, out),
                    5 => packed_tile::<5>(x, w, n, kp, j, half, ti, out),
                    _ => packed_tile::<6>(x, w, n, kp, j, half, ti, out),
                }
            }
        }
    });
}

/// All 16 rows of block `j` for the one token `ti` (batch-1 decode): both
/// halves in one loop, so two independent chains of fused multiply-adds
/// hide their latency (one chain per half left the FMA units idle and
/// decode at half the memory bandwidth). Each row's order of operations is
/// that of [`packed_tile`], so results are unchanged.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn packed_one(x: &[f32], w: &[u16], n: usize, kp: usize, j: usize, ti: usize, out: *mut f32) {
    let hi = _mm256_set1_epi32(0xffff_0000u32 as i32);
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let base = (j / BLOCK) * kp * 2 * BLOCK;
    for p in 0..kp {
        // SAFETY: block j/16 exists (rows padded to 16), p < kp, and token
        // ti's row is padded to 2·kp.
        let (v0, v1, xe, xo) = unsafe {
            let line = w.as_ptr().add(base + p * 2 * BLOCK);
            let px = x.as_ptr().add(ti * 2 * kp + 2 * p);
            (
                _mm256_loadu_si256(line as *const __m256i),
                _mm256_loadu_si256(line.add(2 * HALF) as *const __m256i),
                _mm256_set1_ps(*px),
                _mm256_set1_ps(*px.add(1)),
            )
        };
        let (we0, wo0) =
            (_mm256_castsi256_ps(_mm256_slli_epi32::<16>(v0)), _mm256_castsi256_ps(_mm256_and_si256(v0, hi)));
        let (we1, wo1) =
            (_mm256_castsi256_ps(_mm256_slli_epi32::<16>(v1)), _mm256_castsi256_ps(_mm256_and_si256(v1, hi)));
        a0 = _mm256_fmadd_ps(wo0, xo, _mm256_fmadd_ps(we0, xe, a0));
        a1 = _mm256_fmadd_ps(wo1, xo, _mm256_fmadd_ps(we1, xe, a1));
    }
    // SAFETY: token ti exists; these columns are the caller's.
    unsafe {
        store(out, n, ti, j, a0);
        store(out, n, ti, j + HALF, a1);
    }
}

/// Rows `j + 8·half ..+8` for `B` tokens from `ti`. Each 32-bit lane of a
/// loaded pair line holds one row's two bf16 columns: the even one is a
/// 16-bit shift away from f32, the odd one a mask.
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn packed_tile<const B: usize>(
    x: &[f32],
    w: &[u16],
    n: usize,
    kp: usize,
    j: usize,
    half: usize,
    ti: usize,
    out: *mut f32,
) {
    let kk = 2 * kp;
    let hi = _mm256_set1_epi32(0xffff_0000u32 as i32);
    let mut acc = [_mm256_setzero_ps(); B];
    let base = (j / BLOCK) * kp * 2 * BLOCK + half * 2 * HALF;
    for p in 0..kp {
        // SAFETY: block j/16 exists (rows padded to 16) and p < kp.
        let v = unsafe { _mm256_loadu_si256(w.as_ptr().add(base + p * 2 * BLOCK) as *const __m256i) };
        let we = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v));
        let wo = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
        for (b, a) in acc.iter_mut().enumerate() {
            // SAFETY: token ti+b exists; x rows are padded to 2·kp.
            let (xe, xo) = unsafe {
                let px = x.as_ptr().add((ti + b) * kk + 2 * p);
                (_mm256_set1_ps(*px), _mm256_set1_ps(*px.add(1)))
            };
            *a = _mm256_fmadd_ps(wo, xo, _mm256_fmadd_ps(we, xe, *a));
        }
    }
    for (b, a) in acc.iter().enumerate() {
        // SAFETY: token ti+b exists; these columns are the caller's.
        unsafe { store(out, n, ti + b, j + half * HALF, *a) };
    }
}

/// Quantized weights: output columns `j0..j1` (block-aligned) for all `t`
/// tokens.
///
/// # Safety
/// AVX2, FMA and F16C available; otherwise as [`super::quant::block`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quant_block(x: &QuantAct, t: usize, w: &QuantMatrix, j0: usize, j1: usize, out: *mut f32) {
    super::tiles(j0, j1, t, false, TB_QUANT, |j, _, ti, tb| {
        for half in 0..2 {
            // SAFETY: block j/16 and tokens ti..ti+tb are in range; the
            // caller owns columns j0..j1.
            unsafe {
                match (w.format, tb) {
                    (QuantFormat::Int8, 1) => quant_tile::<1, false>(x, w, j, half, ti, out),
                    (QuantFormat::Int8, 2) => quant_tile::<2, false>(x, w, j, half, ti, out),
                    (QuantFormat::Int8, 3) => quant_tile::<3, false>(x, w, j, half, ti, out),
                    (QuantFormat::Int8, _) => quant_tile::<4, false>(x, w, j, half, ti, out),
                    (QuantFormat::Int4, 1) => quant_tile::<1, true>(x, w, j, half, ti, out),
                    (QuantFormat::Int4, 2) => quant_tile::<2, true>(x, w, j, half, ti, out),
                    (QuantFormat::Int4, 3) => quant_tile::<3, true>(x, w, j, half, ti, out),
                    (QuantFormat::Int4, _) => quant_tile::<4, true>(x, w, j, half, ti, out),
                }
            }
        }
    });
}

/// Rows `j + 8·half ..+8` for `B` tokens from `ti`. `vpmaddubsw` takes
/// unsigned × signed bytes into saturating 16-bit pair sums, so:
/// - int4 codes (0..15, offset 8) go in as they are; the accumulator
///   starts at `-8·Σx`, as in the other paths;
/// - int8 codes (offset 128) would overflow 16 bits, so they are made
///   signed (`^ 0x80`), and the product is taken as `|w| · (x·sign w)`
///   (at most 2·128·127 < 2¹⁵); the offset then needs no correction.
///
/// `vpmaddwd` by ones widens the pairs into each row's 32-bit lane. Either
/// way the integer sums are exact, equal to the other paths'.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn quant_tile<const B: usize, const INT4: bool>(
    x: &QuantAct,
    w: &QuantMatrix,
    j: usize,
    half: usize,
    ti: usize,
    out: *mut f32,
) {
    let (group, groups) = (w.group, w.groups);
    let (block_bytes, per) = (w.block_bytes(), if INT4 { 8 } else { 4 });
    let lines = group / per;
    let (nibble, flip, ones) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(-128), _mm256_set1_epi16(1));
    let b0 = j / BLOCK;
    let mut acc = [_mm256_setzero_ps(); B];
    for g in 0..groups {
        // SAFETY: block b0 exists (rows padded to 16) and g < groups.
        let sw = unsafe {
            _mm256_cvtph_ps(_mm_loadu_si128(w.scales.as_ptr().add((b0 * groups + g) * BLOCK + half * HALF) as *const _))
        };
        let mut ia = [_mm256_setzero_si256(); B];
        if INT4 {
            for (b, a) in ia.iter_mut().enumerate() {
                *a = _mm256_set1_epi32(x.start[(ti + b) * groups + g]);
            }
        }
        for line in 0..lines {
            // SAFETY: the line's half lies inside block b0.
            let v = unsafe {
                _mm256_loadu_si256(
                    w.data.as_ptr().add(b0 * block_bytes + (g * lines + line) * 64 + half * 32) as *const __m256i
                )
            };
            let (lo, hi) = if INT4 {
                (_mm256_and_si256(v, nibble), _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble))
            } else {
                let s = _mm256_xor_si256(v, flip);
                (_mm256_abs_epi8(s), s)
            };
            for (b, a) in ia.iter_mut().enumerate() {
                // SAFETY: token ti+b exists; codes are padded to whole groups.
                let p = unsafe { x.q.as_ptr().add((ti + b) * x.kpad + g * group + line * per) as *const i32 };
                // SAFETY: as above: 4 (int8) or 8 (int4) codes at p.
                let x0 = _mm256_set1_epi32(unsafe { p.read_unaligned() });
                let pairs = if INT4 {
                    // SAFETY: as above.
                    let x1 = _mm256_set1_epi32(unsafe { p.add(1).read_unaligned() });
                    // Each term is at most 2·15·127: their sum fits 16 bits.
                    _mm256_add_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_maddubs_epi16(hi, x1))
                } else {
                    _mm256_maddubs_epi16(lo, _mm256_sign_epi8(x0, hi))
                };
                *a = _mm256_add_epi32(*a, _mm256_madd_epi16(pairs, ones));
            }
        }
        for (b, a) in acc.iter_mut().enumerate() {
            let dx = _mm256_set1_ps(x.d[(ti + b) * groups + g]);
            *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[b]), _mm256_mul_ps(sw, dx), *a);
        }
    }
    for (b, a) in acc.iter().enumerate() {
        // SAFETY: token ti+b exists; these columns are the caller's.
        unsafe { store(out, w.rows, ti + b, j + half * HALF, *a) };
    }
}
