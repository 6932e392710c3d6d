//! AVX-512 VNNI micro-kernels for [`super::quant`]: `vpdpbusd` multiplies a
//! 64-byte line of unsigned weight codes (16 rows × 4 columns) by the
//! token's four broadcast int8 activations and adds each row's four
//! products into its 32-bit lane, 64 multiply-adds per instruction (twice
//! `vdpbf16ps`). Per group, the integer sums are scaled into f32 once.

use super::quant::{BLOCK, QuantAct, QuantFormat, QuantMatrix};
use std::arch::x86_64::*;

/// Tokens per micro-kernel call: 2 blocks × 4 tokens keep 16 accumulators
/// (8 integer, 8 float) in registers beside the weights.
const TB: usize = 4;

/// # Safety
/// AVX-512F and AVX512-VNNI available; otherwise as [`super::quant::block`].
#[target_feature(enable = "avx512f,avx512vnni,avx512bw")]
pub unsafe fn block(x: &QuantAct, t: usize, w: &QuantMatrix, j0: usize, j1: usize, out: *mut f32) {
    super::tiles(j0, j1, t, true, TB, |j, nb, ti, tb| {
        // SAFETY: blocks j.. and tokens ti..ti+tb are in range; the caller
        // owns columns j0..j1.
        unsafe {
            macro_rules! go {
                ($($b:literal)*) => {
                    match (w.format, nb, tb) {
                        $((QuantFormat::Int8, 2, $b) => tile::<2, $b, false>(x, w, j, ti, out),
                          (QuantFormat::Int8, _, $b) => tile::<1, $b, false>(x, w, j, ti, out),
                          (QuantFormat::Int4, 2, $b) => tile::<2, $b, true>(x, w, j, ti, out),
                          (QuantFormat::Int4, _, $b) => tile::<1, $b, true>(x, w, j, ti, out),)*
                        _ => unreachable!("tb is in 1..=TB"),
                    }
                };
            }
            go!(1 2 3 4);
        }
    });
}

/// `NB` blocks of 16 rows from row `j`, `B` tokens from `ti`.
#[target_feature(enable = "avx512f,avx512vnni,avx512bw")]
#[inline]
// `b` indexes a column of the 2-D register tile, not one slice.
#[allow(clippy::needless_range_loop)]
unsafe fn tile<const NB: usize, const B: usize, const INT4: bool>(
    x: &QuantAct,
    w: &QuantMatrix,
    j: usize,
    ti: usize,
    out: *mut f32,
) {
    let (group, groups) = (w.group, w.groups);
    let block_bytes = w.block_bytes();
    let lines = group / if INT4 { 8 } else { 4 };
    let nibble = _mm512_set1_epi8(0x0f);
    let mut acc = [[_mm512_setzero_ps(); B]; NB];
    let b0 = j / BLOCK;
    for g in 0..groups {
        let mut sw = [_mm512_setzero_ps(); NB];
        for (blk, s) in sw.iter_mut().enumerate() {
            // SAFETY: block b0+blk exists (rows are padded to 16) and g < groups.
            *s = unsafe {
                _mm512_cvtph_ps(_mm256_loadu_si256(
                    w.scales.as_ptr().add(((b0 + blk) * groups + g) * BLOCK) as *const __m256i
                ))
            };
        }
        let mut ia = [[_mm512_setzero_si512(); B]; NB];
        for b in 0..B {
            let start = _mm512_set1_epi32(x.start[(ti + b) * groups + g]);
            for row in ia.iter_mut() {
                row[b] = start;
            }
        }
        for line in 0..lines {
            let mut lo = [_mm512_setzero_si512(); NB];
            let mut hi = [_mm512_setzero_si512(); NB];
            for blk in 0..NB {
                // SAFETY: the line lies inside block b0+blk.
                let v = unsafe {
                    _mm512_loadu_si512(
                        w.data.as_ptr().add((b0 + blk) * block_bytes + (g * lines + line) * 64) as *const _
                    )
                };
                if INT4 {
                    lo[blk] = _mm512_and_si512(v, nibble);
                    hi[blk] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble);
                } else {
                    lo[blk] = v;
                }
            }
            let per = if INT4 { 8 } else { 4 };
            for b in 0..B {
                // SAFETY: token ti+b exists; codes are padded to whole groups.
                let (x0, x1) = unsafe {
                    let p = x.q.as_ptr().add((ti + b) * x.kpad + g * group + line * per) as *const i32;
                    (
                        _mm512_set1_epi32(p.read_unaligned()),
                        if INT4 { _mm512_set1_epi32(p.add(1).read_unaligned()) } else { _mm512_setzero_si512() },
                    )
                };
                for blk in 0..NB {
                    ia[blk][b] = _mm512_dpbusd_epi32(ia[blk][b], lo[blk], x0);
                    if INT4 {
                        ia[blk][b] = _mm512_dpbusd_epi32(ia[blk][b], hi[blk], x1);
                    }
                }
            }
        }
        for b in 0..B {
            let dx = _mm512_set1_ps(x.d[(ti + b) * groups + g]);
            for blk in 0..NB {
                acc[blk][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[blk][b]), _mm512_mul_ps(sw[blk], dx), acc[blk][b]);
            }
        }
    }
    let n = w.rows;
    for (blk, row) in acc.iter().enumerate() {
        for (b, a) in row.iter().enumerate() {
            let c = j + blk * BLOCK;
            let live = n.saturating_sub(c).min(BLOCK);
            let mask: __mmask16 = if live == BLOCK { 0xffff } else { (1u16 << live) - 1 };
            // SAFETY: token ti+b exists; only the in-range lanes of columns
            // c.. (this caller's) are written.
            unsafe { _mm512_mask_storeu_ps(out.add((ti + b) * n + c), mask, *a) };
        }
    }
}
