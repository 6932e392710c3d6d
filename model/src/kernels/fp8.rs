//! FP8 weights kept as DeepSeek ships them: float8_e4m3fn bytes with one
//! f32 scale (`weight_scale_inv`) per `br × bc` block, decoded inside the
//! kernel. A quarter of the memory (and of the bytes a decode step streams)
//! of the f32 widening they replace, with the same numbers: each 16-lane
//! decode is exact, the block scale is applied once per block of columns,
//! so products equal the dequantized-f32 product up to f32 rounding.
//!
//! **Layout**: rows in blocks of 16; inside a block, column by column, the
//! 16 rows' bytes together (`block · cols · 16 + col · 16 + row`), so one
//! 16-byte load is 16 outputs' weights for one activation, which is
//! broadcast. Scales are kept per 16-row block and column block, which is
//! why a checkpoint block height must be a multiple of 16 (DeepSeek's is
//! 128); other checkpoints are widened to f32 as before.
//!
//! **Decode**: e4m3 `s.eeee.mmm` is f16 `s.0eeee.mmm0000000` times 2⁸
//! (the exponent biases are 7 and 15), subnormals included, so
//! `vcvtph2ps` does the work and the 2⁸ is folded into the block scale.

use crate::weights::fp8_e4m3_to_f32;

/// Rows per block.
pub const BLOCK: usize = 16;

/// A `[rows, cols]` FP8 matrix in the blocked layout.
#[derive(Debug, Clone)]
pub struct Fp8Matrix {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    /// Columns per scale block.
    pub(crate) bc: usize,
    pub(crate) codes: Vec<u8>,
    /// `[row block of 16][column block]`.
    pub(crate) scales: Vec<f32>,
}

impl Fp8Matrix {
    /// From a checkpoint's row-major bytes and `[⌈rows/br⌉, ⌈cols/bc⌉]`
    /// scales; `None` when `br` is not a multiple of 16.
    pub fn from_checkpoint(
        bytes: &[u8],
        scales: &[f32],
        rows: usize,
        cols: usize,
        (br, bc): (usize, usize),
    ) -> Option<Fp8Matrix> {
        if !br.is_multiple_of(BLOCK) || bc == 0 {
            return None;
        }
        let (blocks, ncb) = (rows.div_ceil(BLOCK), cols.div_ceil(bc));
        let mut codes = vec![0u8; blocks * cols * BLOCK];
        for r in 0..rows {
            let (b, rr) = (r / BLOCK, r % BLOCK);
            for (c, &v) in bytes[r * cols..(r + 1) * cols].iter().enumerate() {
                codes[(b * cols + c) * BLOCK + rr] = v;
            }
        }
        let mut s = vec![0f32; blocks * ncb];
        for b in 0..blocks {
            for cb in 0..ncb {
                s[b * ncb + cb] = scales[(b * BLOCK / br) * ncb + cb];
            }
        }
        Some(Fp8Matrix { rows, cols, bc, codes, scales: s })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn size_bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len()
    }

    /// Element `(r, c)`, dequantized (`lut[byte] · scale`, as transformers
    /// dequantizes).
    pub fn get(&self, r: usize, c: usize) -> f32 {
        let ncb = self.cols.div_ceil(self.bc);
        let b = r / BLOCK;
        fp8_e4m3_to_f32(self.codes[(b * self.cols + c) * BLOCK + r % BLOCK]) * self.scales[b * ncb + c / self.bc]
    }

    /// Rows of `a` then rows of `b`, when both keep whole 16-row blocks and
    /// the same column blocks; `None` otherwise.
    pub fn vstack(a: &Fp8Matrix, b: &Fp8Matrix) -> Option<Fp8Matrix> {
        if !a.rows.is_multiple_of(BLOCK) || a.cols != b.cols || a.bc != b.bc {
            return None;
        }
        Some(Fp8Matrix {
            rows: a.rows + b.rows,
            cols: a.cols,
            bc: a.bc,
            codes: [&a.codes[..], &b.codes].concat(),
            scales: [&a.scales[..], &b.scales].concat(),
        })
    }
}

/// Output columns `j0..j1` (16-aligned) of `x · wᵀ`, `x` being `[t, k]` f32.
///
/// # Safety
/// `out` holds `t * w.rows` floats and no other thread writes columns
/// `j0..j1`.
pub unsafe fn block(x: &[f32], t: usize, w: &Fp8Matrix, j0: usize, j1: usize, out: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    if super::avx512::available() {
        // SAFETY: feature checked; the caller's contract is forwarded.
        unsafe { simd::block(x, t, w, j0, j1, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::avx2::available() {
        // SAFETY: feature checked; the caller's contract is forwarded.
        unsafe { portable_fma(x, t, w, j0, j1, out) };
        return;
    }
    // SAFETY: the caller's contract.
    unsafe { portable(x, t, w, j0, j1, out) }
}

/// [`portable`] compiled with FMA, so its `mul_add`s are one instruction
/// each rather than calls into libm.
///
/// # Safety
/// FMA available; otherwise as [`block`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn portable_fma(x: &[f32], t: usize, w: &Fp8Matrix, j0: usize, j1: usize, out: *mut f32) {
    // SAFETY: forwarded.
    unsafe { portable(x, t, w, j0, j1, out) }
}

/// # Safety
/// As [`block`].
#[inline(always)]
unsafe fn portable(x: &[f32], t: usize, w: &Fp8Matrix, j0: usize, j1: usize, out: *mut f32) {
    let (n, k, ncb) = (w.rows, w.cols, w.cols.div_ceil(w.bc));
    for j in j0..j1.min(n) {
        let b = j / BLOCK;
        for ti in 0..t {
            let mut acc = 0f32;
            for cb in 0..ncb {
                let mut part = 0f32;
                for c in cb * w.bc..((cb + 1) * w.bc).min(k) {
                    part = x[ti * k + c].mul_add(fp8_e4m3_to_f32(w.codes[(b * k + c) * BLOCK + j % BLOCK]), part);
                }
                acc = part.mul_add(w.scales[b * ncb + cb], acc);
            }
            // SAFETY: (ti, j) lies in this caller's columns.
            unsafe { *out.add(ti * n + j) = acc };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{BLOCK, Fp8Matrix};
    use std::arch::x86_64::*;

    /// Tokens per micro-kernel call: each decoded weight vector is used by
    /// up to 8 tokens (16 accumulators: 8 per block of columns, 8 overall).
    const TB: usize = 8;

    /// # Safety
    /// AVX-512F available; otherwise as [`super::block`].
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn block(x: &[f32], t: usize, w: &Fp8Matrix, j0: usize, j1: usize, out: *mut f32) {
        crate::kernels::tiles(j0, j1, t, false, TB, |j, _, ti, tb| {
            // SAFETY: block j/16 and tokens ti..ti+tb are in range.
            unsafe {
                match tb {
                    1 => tile::<1>(x, w, j, ti, out),
                    2 => tile::<2>(x, w, j, ti, out),
                    3 => tile::<3>(x, w, j, ti, out),
                    4 => tile::<4>(x, w, j, ti, out),
                    5 => tile::<5>(x, w, j, ti, out),
                    6 => tile::<6>(x, w, j, ti, out),
                    7 => tile::<7>(x, w, j, ti, out),
                    _ => tile::<8>(x, w, j, ti, out),
                }
            }
        });
    }

    /// 16 e4m3 bytes → 16 f32 values divided by 2⁸.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn decode(p: *const u8) -> __m512 {
        // SAFETY: the caller guarantees 16 readable bytes.
        let v = _mm256_cvtepu8_epi16(unsafe { _mm_loadu_si128(p as *const __m128i) });
        let sign = _mm256_slli_epi16::<8>(_mm256_and_si256(v, _mm256_set1_epi16(0x80)));
        let rest = _mm256_slli_epi16::<7>(_mm256_and_si256(v, _mm256_set1_epi16(0x7f)));
        _mm512_cvtph_ps(_mm256_or_si256(sign, rest))
    }

    /// 16 rows from `j` (block-aligned) × `B` tokens from `ti`.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn tile<const B: usize>(x: &[f32], w: &Fp8Matrix, j: usize, ti: usize, out: *mut f32) {
        let (n, k, bc) = (w.rows, w.cols, w.bc);
        let ncb = k.div_ceil(bc);
        let b = j / BLOCK;
        let mut acc = [_mm512_setzero_ps(); B];
        for cb in 0..ncb {
            let mut part = [_mm512_setzero_ps(); B];
            for c in cb * bc..((cb + 1) * bc).min(k) {
                // SAFETY: block b holds `k` columns of 16 bytes each.
                let v = unsafe { decode(w.codes.as_ptr().add((b * k + c) * BLOCK)) };
                for (i, p) in part.iter_mut().enumerate() {
                    // SAFETY: token ti+i exists and c < k.
                    *p = _mm512_fmadd_ps(_mm512_set1_ps(unsafe { *x.get_unchecked((ti + i) * k + c) }), v, *p);
                }
            }
            // The 2⁸ of the decode is exact in the scale.
            let s = _mm512_set1_ps(w.scales[b * ncb + cb] * 256.0);
            for (a, p) in acc.iter_mut().zip(&part) {
                *a = _mm512_fmadd_ps(*p, s, *a);
            }
        }
        let live = n.saturating_sub(j).min(BLOCK);
        let mask: __mmask16 = if live == BLOCK { 0xffff } else { (1u16 << live) - 1 };
        for (i, a) in acc.iter().enumerate() {
            // SAFETY: token ti+i exists; only this block's in-range lanes.
            unsafe { _mm512_mask_storeu_ps(out.add((ti + i) * n + j), mask, *a) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        /// Every byte value but NaN, odd shapes, partial scale blocks: the
        /// kernel equals the product with the dequantized f32 twin.
        #[test]
        fn matches_the_dequantized_twin(t in 1usize..12, n in 1usize..40, k in 1usize..300, seed in 0u64..1000) {
            let (br, bc) = (32, 48);
            let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(5);
            let mut next = || { s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (s >> 33) as u32 };
            let bytes: Vec<u8> = (0..n * k).map(|_| { let b = next() as u8; if b & 0x7f == 0x7f { 0 } else { b } }).collect();
            let scales: Vec<f32> = (0..n.div_ceil(br) * k.div_ceil(bc)).map(|_| (next() % 1000) as f32 / 3e4 + 1e-4).collect();
            let x: Vec<f32> = (0..t * k).map(|_| (next() % 2000) as f32 / 1000.0 - 1.0).collect();
            let m = Fp8Matrix::from_checkpoint(&bytes, &scales, n, k, (br, bc)).unwrap();
            let twin: Vec<f32> = (0..n * k).map(|i| fp8_e4m3_to_f32(bytes[i]) * scales[(i / k / br) * k.div_ceil(bc) + (i % k) / bc]).collect();
            for (i, &v) in twin.iter().enumerate() { prop_assert_eq!(m.get(i / k, i % k), v); }
            let want = crate::kernels::matmul(&x, t, crate::tensor::MatView::F32(&twin), n, k);
            let got = crate::kernels::matmul(&x, t, crate::tensor::MatView::Fp8(&m), n, k);
            let scale = twin.iter().fold(0f32, |a, v| a.max(v.abs())) * k as f32;
            for (a, b) in got.iter().zip(&want) { prop_assert!((a - b).abs() <= 1e-6 * scale + 1e-7, "{a} vs {b}"); }
        }
    }

    #[test]
    fn refuses_block_heights_that_split_a_row_block_and_stacks_whole_blocks() {
        assert!(Fp8Matrix::from_checkpoint(&[0; 8], &[1.0], 2, 4, (8, 4)).is_none());
        let a = Fp8Matrix::from_checkpoint(&[0x38; 64], &[2.0], 16, 4, (128, 128)).unwrap();
        let b = Fp8Matrix::from_checkpoint(&[0xb8; 8], &[3.0], 2, 4, (128, 128)).unwrap();
        let ab = Fp8Matrix::vstack(&a, &b).unwrap();
        assert_eq!((ab.rows(), ab.get(0, 0), ab.get(17, 3)), (18, 2.0, -3.0));
        assert!(Fp8Matrix::vstack(&b, &a).is_none(), "b ends inside a 16-row block");
    }
}
