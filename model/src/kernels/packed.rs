//! Matrix products on bf16 weights in the packed layout.
//!
//! Layout: rows in blocks of 16; inside a block, for each pair of columns
//! `(2p, 2p+1)`, the 16 rows' two values are stored together:
//! `block · (kp · 32) + p · 32 + row_in_block · 2 + (col & 1)`, with
//! `kp = ⌈k/2⌉` and zero padding past the last row and column. One 64-byte
//! load then holds 16 output rows × 2 columns, the activations are
//! broadcast, and each accumulator lane is one output: no horizontal sums,
//! and every weight byte is read once per group of up to eight tokens.

/// Rows per packed block.
pub const BLOCK: usize = 16;

/// Number of column pairs.
pub fn pairs(k: usize) -> usize {
    k.div_ceil(2)
}

/// Packs a row-major bf16 `[n, k]` matrix.
pub fn pack(w: &[u16], n: usize, k: usize) -> Vec<u16> {
    let kp = pairs(k);
    let nb = n.div_ceil(BLOCK);
    let mut out = vec![0u16; nb * kp * 2 * BLOCK];
    for r in 0..n {
        for c in 0..k {
            out[index(r, c, kp)] = w[r * k + c];
        }
    }
    out
}

/// Position of element `(r, c)` in the packed data.
#[inline]
pub fn index(r: usize, c: usize, kp: usize) -> usize {
    (r / BLOCK) * kp * 2 * BLOCK + (c / 2) * 2 * BLOCK + (r % BLOCK) * 2 + (c & 1)
}

/// Activations padded to `2 · kp` columns (zeros), as f32 and, for the
/// bf16-activation mode, as rounded bf16.
pub enum PackedAct {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

/// Without bf16 dot products (`vdpbf16ps`) the rounded bf16 activations
/// are handed over widened to f32, the exact same values.
pub fn prepare(x: &[f32], t: usize, k: usize, bf16_act: bool) -> PackedAct {
    let kk = 2 * pairs(k);
    if bf16_act && !bf16_dots() {
        let mut v = vec![0f32; t * kk];
        for (dst, src) in v.chunks_exact_mut(kk).zip(x.chunks_exact(k)) {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = crate::tensor::bf16_to_f32(crate::tensor::f32_to_bf16(*s));
            }
        }
        PackedAct::F32(v)
    } else if bf16_act {
        let mut v = vec![0u16; t * kk];
        for (dst, src) in v.chunks_exact_mut(kk).zip(x.chunks_exact(k)) {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = crate::tensor::f32_to_bf16(*s);
            }
        }
        PackedAct::Bf16(v)
    } else {
        let mut v = vec![0f32; t * kk];
        for (dst, src) in v.chunks_exact_mut(kk).zip(x.chunks_exact(k)) {
            dst[..k].copy_from_slice(src);
        }
        PackedAct::F32(v)
    }
}

fn bf16_dots() -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::avx512::bf16_dot_available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Computes output columns `j0..j1` (a multiple of [`BLOCK`] apart, `j0`
/// block-aligned) for all `t` tokens.
///
/// # Safety
/// `out` holds `t * n` floats and no other thread writes columns `j0..j1`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn block(x: &PackedAct, t: usize, w: &[u16], n: usize, k: usize, j0: usize, j1: usize, out: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    {
        let fast = match x {
            PackedAct::F32(_) => super::avx512::available(),
            PackedAct::Bf16(_) => super::avx512::bf16_dot_available(),
        };
        if fast {
            // SAFETY: features checked; the caller's contract is forwarded.
            unsafe { simd::block(x, t, w, n, k, j0, j1, out) };
            return;
        }
        if let (PackedAct::F32(v), true) = (x, super::avx2::available()) {
            // SAFETY: features checked; the caller's contract is forwarded.
            unsafe { super::avx2::packed_block(v, t, w, n, k, j0, j1, out) };
            return;
        }
    }
    let kp = pairs(k);
    let kk = 2 * kp;
    for j in j0..j1.min(n) {
        for ti in 0..t {
            let s: f32 = match x {
                PackedAct::F32(v) => {
                    (0..k).map(|c| v[ti * kk + c] * crate::tensor::bf16_to_f32(w[index(j, c, kp)])).sum()
                }
                PackedAct::Bf16(v) => (0..k)
                    .map(|c| {
                        crate::tensor::bf16_to_f32(v[ti * kk + c]) * crate::tensor::bf16_to_f32(w[index(j, c, kp)])
                    })
                    .sum(),
            };
            // SAFETY: (ti, j) lies in this caller's columns.
            unsafe { *out.add(ti * n + j) = s };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{BLOCK, PackedAct, pairs};
    use std::arch::x86_64::*;

    /// Tokens per micro-kernel call.
    const TB: usize = 8;

    /// # Safety
    /// AVX-512F available, and AVX512-BF16 when `x` is bf16; otherwise as
    /// [`super::block`].
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn block(x: &PackedAct, t: usize, w: &[u16], n: usize, k: usize, j0: usize, j1: usize, out: *mut f32) {
        let kp = pairs(k);
        crate::kernels::tiles(j0, j1, t, true, TB, |j, nb, ti, tb| {
            // SAFETY: blocks j.. and tokens ti..ti+tb are in range; the
            // caller owns columns j0..j1.
            unsafe {
                macro_rules! go {
                    ($($b:literal)*) => {
                        match (x, nb, tb) {
                            $((PackedAct::F32(v), 2, $b) => tile_f32::<2, $b>(v, w, n, kp, j, ti, out),
                              (PackedAct::F32(v), _, $b) => tile_f32::<1, $b>(v, w, n, kp, j, ti, out),
                              (PackedAct::Bf16(v), 2, $b) => tile_bf16::<2, $b>(v, w, n, kp, j, ti, out),
                              (PackedAct::Bf16(v), _, $b) => tile_bf16::<1, $b>(v, w, n, kp, j, ti, out),)*
                            _ => unreachable!("tb is in 1..=TB"),
                        }
                    };
                }
                go!(1 2 3 4 5 6 7 8);
            }
        });
    }

    /// Stores 16 lanes at output columns `j..j+16`, masking past `n`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn store(out: *mut f32, n: usize, row: usize, j: usize, v: __m512) {
        let live = n.saturating_sub(j).min(BLOCK);
        let mask: __mmask16 = if live == BLOCK { 0xffff } else { (1u16 << live) - 1 };
        // SAFETY: only the `live` in-range lanes are written.
        unsafe { _mm512_mask_storeu_ps(out.add(row * n + j), mask, v) };
    }

    /// f32 activations: each 32-bit lane holds one row's bf16 pair; the odd
    /// column is the high half (mask), the even one a 16-bit shift away.
    #[target_feature(enable = "avx512f")]
    #[inline]
    // `b` indexes a column of the 2-D register tile, not one slice.
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile_f32<const NB: usize, const B: usize>(
        x: &[f32],
        w: &[u16],
        n: usize,
        kp: usize,
        j: usize,
        ti: usize,
        out: *mut f32,
    ) {
        let kk = 2 * kp;
        let hi = _mm512_set1_epi32(0xffff_0000u32 as i32);
        let mut acc = [[_mm512_setzero_ps(); B]; NB];
        let base = (j / BLOCK) * kp * 2 * BLOCK;
        for p in 0..kp {
            let mut we = [_mm512_setzero_ps(); NB];
            let mut wo = [_mm512_setzero_ps(); NB];
            for blk in 0..NB {
                // SAFETY: block j/16+blk exists (padded) and p < kp.
                let v = unsafe {
                    _mm512_loadu_si512(w.as_ptr().add(base + blk * kp * 2 * BLOCK + p * 2 * BLOCK) as *const _)
                };
                we[blk] = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
                wo[blk] = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
            }
            for b in 0..B {
                // SAFETY: token ti+b exists; x rows are padded to 2·kp.
                let (xe, xo) = unsafe {
                    let px = x.as_ptr().add((ti + b) * kk + 2 * p);
                    (_mm512_set1_ps(*px), _mm512_set1_ps(*px.add(1)))
                };
                for blk in 0..NB {
                    acc[blk][b] = _mm512_fmadd_ps(wo[blk], xo, _mm512_fmadd_ps(we[blk], xe, acc[blk][b]));
                }
            }
        }
        for (blk, row) in acc.iter().enumerate() {
            for (b, a) in row.iter().enumerate() {
                // SAFETY: token ti+b exists; columns j+16·blk.. are ours.
                unsafe { store(out, n, ti + b, j + blk * BLOCK, *a) };
            }
        }
    }

    /// bf16 activations: `vdpbf16ps` multiplies each row's pair with the
    /// token's broadcast pair and adds both products into the row's lane.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    // `b` indexes a column of the 2-D register tile, not one slice.
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile_bf16<const NB: usize, const B: usize>(
        x: &[u16],
        w: &[u16],
        n: usize,
        kp: usize,
        j: usize,
        ti: usize,
        out: *mut f32,
    ) {
        let kk = 2 * kp;
        let mut acc = [[_mm512_setzero_ps(); B]; NB];
        let base = (j / BLOCK) * kp * 2 * BLOCK;
        for p in 0..kp {
            let mut wv = [_mm512_setzero_si512(); NB];
            for (blk, v) in wv.iter_mut().enumerate() {
                // SAFETY: block j/16+blk exists (padded) and p < kp.
                *v = unsafe {
                    _mm512_loadu_si512(w.as_ptr().add(base + blk * kp * 2 * BLOCK + p * 2 * BLOCK) as *const _)
                };
            }
            for b in 0..B {
                // SAFETY: token ti+b exists; x rows are padded to 2·kp.
                let pair = unsafe { (x.as_ptr().add((ti + b) * kk + 2 * p) as *const u32).read_unaligned() };
                let xv = _mm512_set1_epi32(pair as i32);
                for blk in 0..NB {
                    // SAFETY: __m512i and __m512bh are the same 512 bits.
                    let (a, c) = unsafe {
                        (
                            std::mem::transmute::<__m512i, __m512bh>(wv[blk]),
                            std::mem::transmute::<__m512i, __m512bh>(xv),
                        )
                    };
                    acc[blk][b] = _mm512_dpbf16_ps(acc[blk][b], a, c);
                }
            }
        }
        for (blk, row) in acc.iter().enumerate() {
            for (b, a) in row.iter().enumerate() {
                // SAFETY: token ti+b exists; columns j+16·blk.. are ours.
                unsafe { store(out, n, ti + b, j + blk * BLOCK, *a) };
            }
        }
    }
}
