//! Attention's two row operations, a query's dot product with a cached key
//! and a weighted sum of cached values, over cache rows held in f32 or in
//! bf16 (`--kv-cache-dtype bf16`: half the bytes, widened in the kernel:
//! a bf16 is the top half of an f32, so widening is a zero-extend and a
//! shift).

use crate::tensor::bf16_to_f32;

/// One cached row, as its pool stores it.
#[derive(Clone, Copy)]
pub enum Row<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl<'a> Row<'a> {
    /// The entries `a..b` of the row.
    #[inline]
    pub fn slice(self, a: usize, b: usize) -> Row<'a> {
        match self {
            Row::F32(r) => Row::F32(&r[a..b]),
            Row::Bf16(r) => Row::Bf16(&r[a..b]),
        }
    }
}

/// `q · row`.
#[inline]
pub fn dot_row(q: &[f32], row: Row<'_>) -> f32 {
    match row {
        Row::F32(r) => super::dot(q, r),
        Row::Bf16(r) => dot_bf16(q, r),
    }
}

/// `y += alpha · row`.
#[inline]
pub fn axpy_row(alpha: f32, row: Row<'_>, y: &mut [f32]) {
    match row {
        Row::F32(r) => super::axpy(alpha, r, y),
        Row::Bf16(r) => super::axpy(alpha, r, y),
    }
}

fn dot_bf16(a: &[f32], b: &[u16]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if super::avx512::available() {
        // SAFETY: feature checked; slices of equal length.
        return unsafe { simd::dot_bf16(a, b) };
    }
    #[cfg(target_arch = "x86_64")]
    if super::avx2::available() {
        // SAFETY: feature checked.
        return unsafe { simd::dot_bf16_avx2(a, b) };
    }
    super::lanes8(a, b, |x, y| x * bf16_to_f32(y))
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use crate::tensor::bf16_to_f32;
    use std::arch::x86_64::*;

    /// The portable loops compiled for AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dot_bf16_avx2(a: &[f32], b: &[u16]) -> f32 {
        crate::kernels::lanes8(a, b, |x, y| x * bf16_to_f32(y))
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_bf16(a: &[f32], b: &[u16]) -> f32 {
        let n = a.len().min(b.len());
        let main = n - n % 16;
        let mut s = _mm512_setzero_ps();
        let mut i = 0;
        while i < main {
            // SAFETY: i + 16 ≤ n for both slices.
            unsafe {
                s = _mm512_fmadd_ps(
                    _mm512_loadu_ps(a.as_ptr().add(i)),
                    <u16 as crate::kernels::Lanes>::load16(b.as_ptr().add(i)),
                    s,
                )
            };
            i += 16;
        }
        let mut t = _mm512_reduce_add_ps(s);
        for j in main..n {
            t += a[j] * bf16_to_f32(b[j]);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::f32_to_bf16;

    /// The bf16 kernels equal the f32 ones on the widened values (odd
    /// lengths cover the vector tails).
    #[test]
    fn bf16_rows_equal_their_widened_f32() {
        for n in [1, 15, 16, 17, 64, 100, 288] {
            let q: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.37).collect();
            let r: Vec<u16> = (0..n).map(|i| f32_to_bf16(((i * 53 % 13) as f32 - 6.0) * 0.21)).collect();
            let w: Vec<f32> = r.iter().map(|&b| bf16_to_f32(b)).collect();
            let (a, b) = (dot_row(&q, Row::Bf16(&r)), dot_row(&q, Row::F32(&w)));
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{n}: {a} vs {b}");
            let (mut y1, mut y2) = (q.clone(), q.clone());
            axpy_row(0.7, Row::Bf16(&r), &mut y1);
            axpy_row(0.7, Row::F32(&w), &mut y2);
            assert_eq!(y1, y2, "{n}");
        }
    }
}
