//! Group-quantized weights (`--quantize int8|int4`) and their products.
//!
//! **Format.** Each row is cut into groups of `group` columns (32 by
//! default, as llama.cpp's Q8_0/Q4_0); a group keeps one f16 scale and
//! symmetric integer codes: int8 in `[-127, 127]`, int4 in `[-8, 7]` (the
//! value of largest magnitude maps to ±127 or to -8 exactly). Codes are
//! stored *unsigned* (plus 128 or 8), which is what the VNNI instruction
//! `vpdpbusd` (u8 × i8 → i32) wants on its first operand. At 32 columns a
//! group costs 1.0625 bytes per weight for int8 and 0.5625 for int4, the
//! same as Q8_0 and Q4_0.
//!
//! **Products.** Activations are quantized per token with the same groups
//! (int8, scale `max|x| / 127`), so each group's dot product is exact
//! integer arithmetic; the offset of the unsigned codes is removed by
//! starting the integer accumulator at `-zero · Σ x_q` instead of 0. The
//! integer sum is then scaled by `d_w · d_x` into an f32 accumulator.
//!
//! **Layout** (rows in blocks of 16, like [`super::packed`]): for block
//! `b`, group `g`, one 64-byte line holds the 16 rows × 4 consecutive
//! columns (int8), or × 8 columns as nibbles (int4: byte `i` of a row holds
//! column `i` in its low nibble and column `4 + i` in its high one). One
//! load then feeds 16 outputs and the token's four activation bytes are
//! broadcast: no horizontal sums. Padding rows have scale 0, padding
//! columns code 0 (stored as the offset).

use rayon::prelude::*;

/// Rows per block.
pub const BLOCK: usize = 16;
/// Group sizes `--quantize-group` accepts.
pub const GROUPS: [usize; 4] = [32, 64, 128, 256];

/// A quantized weight format (`--quantize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantFormat {
    /// 8-bit codes per group (Q8_0-like).
    Int8,
    /// 4-bit codes per group (Q4_0-like).
    Int4,
}

impl QuantFormat {
    /// The offset added to the signed codes to store them unsigned.
    fn zero(self) -> i32 {
        match self {
            QuantFormat::Int8 => 128,
            QuantFormat::Int4 => 8,
        }
    }

    /// Columns one 64-byte line covers per row.
    fn cols_per_line(self) -> usize {
        match self {
            QuantFormat::Int8 => 4,
            QuantFormat::Int4 => 8,
        }
    }
}

/// A `[rows, cols]` matrix of group-quantized weights in the blocked layout.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    pub(crate) format: QuantFormat,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) group: usize,
    /// Groups per row (the last one zero-padded).
    pub(crate) groups: usize,
    pub(crate) data: Vec<u8>,
    /// f16 bits, `[block][group][row in block]`.
    pub(crate) scales: Vec<u16>,
}

impl QuantMatrix {
    /// Quantizes a matrix whose row `r` is written into the buffer by
    /// `row(r, buf)` (`buf` holds `cols` values). Blocks run in parallel.
    ///
    /// # Panics
    /// If `group` is not one of [`GROUPS`] (callers validate the flag).
    pub fn quantize(
        format: QuantFormat,
        rows: usize,
        cols: usize,
        group: usize,
        row: impl Fn(usize, &mut [f32]) + Sync,
    ) -> QuantMatrix {
        assert!(GROUPS.contains(&group), "quantization group {group}");
        let groups = cols.div_ceil(group);
        let blocks = rows.div_ceil(BLOCK);
        let block_bytes = block_bytes(format, groups, group);
        let mut data = vec![0u8; blocks * block_bytes];
        let mut scales = vec![0u16; blocks * groups * BLOCK];
        data.par_chunks_mut(block_bytes).zip(scales.par_chunks_mut(groups * BLOCK)).enumerate().for_each(
            |(b, (data, scales))| {
                let mut buf = vec![0f32; groups * group];
                let mut codes = vec![0i32; group];
                data.fill(0);
                for r in 0..BLOCK {
                    let rr = b * BLOCK + r;
                    buf.fill(0.0);
                    if rr < rows {
                        row(rr, &mut buf[..cols]);
                    }
                    for g in 0..groups {
                        let d = quantize_group(format, &buf[g * group..(g + 1) * group], &mut codes);
                        scales[g * BLOCK + r] = half::f16::from_f32(d).to_bits();
                        for (c, &q) in codes.iter().enumerate() {
                            let (at, shift) = position(format, group, g, r, c);
                            data[at] |= ((q + format.zero()) as u8) << shift;
                        }
                    }
                }
            },
        );
        QuantMatrix { format, rows, cols, group, groups, data, scales }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn format(&self) -> QuantFormat {
        self.format
    }

    /// Bytes of codes and scales.
    pub fn size_bytes(&self) -> usize {
        self.data.len() + 2 * self.scales.len()
    }

    /// Bytes of codes per 16-row block.
    pub(crate) fn block_bytes(&self) -> usize {
        block_bytes(self.format, self.groups, self.group)
    }

    /// The signed code of `(r, c)`.
    fn code(&self, r: usize, c: usize) -> i32 {
        let (g, cc) = (c / self.group, c % self.group);
        let (at, shift) = position(self.format, self.group, g, r % BLOCK, cc);
        let byte = self.data[(r / BLOCK) * self.block_bytes() + at];
        let raw = match self.format {
            QuantFormat::Int8 => byte as i32,
            QuantFormat::Int4 => ((byte >> shift) & 0xf) as i32,
        };
        raw - self.format.zero()
    }

    fn scale(&self, r: usize, g: usize) -> f32 {
        half::f16::from_bits(self.scales[((r / BLOCK) * self.groups + g) * BLOCK + r % BLOCK]).to_f32()
    }

    /// Element `(r, c)`, dequantized.
    pub fn get(&self, r: usize, c: usize) -> f32 {
        self.scale(r, c / self.group) * self.code(r, c) as f32
    }
}

/// Bytes of codes per 16-row block of `groups` groups of `group` columns.
fn block_bytes(f: QuantFormat, groups: usize, group: usize) -> usize {
    let row = groups * group;
    BLOCK
        * match f {
            QuantFormat::Int8 => row,
            QuantFormat::Int4 => row / 2,
        }
}

/// Byte offset inside a block, and bit shift, of row `r`'s column `c` of
/// group `g`.
#[inline]
fn position(f: QuantFormat, group: usize, g: usize, r: usize, c: usize) -> (usize, u32) {
    let per = f.cols_per_line();
    let line = g * (group / per) + c / per;
    let within = c % per;
    match f {
        QuantFormat::Int8 => (line * 64 + r * 4 + within, 0),
        QuantFormat::Int4 => (line * 64 + r * 4 + within % 4, 4 * (within / 4) as u32),
    }
}

/// Symmetric codes for one group; returns the scale (rounded to f16, the
/// precision it is stored in, before the codes are chosen).
fn quantize_group(f: QuantFormat, x: &[f32], codes: &mut [i32]) -> f32 {
    let (lo, hi) = match f {
        QuantFormat::Int8 => (-127, 127),
        QuantFormat::Int4 => (-8, 7),
    };
    // The value of largest magnitude maps to an end code exactly: ±127, or
    // -8 for int4 (the asymmetric end gives one more step of resolution).
    let m = x.iter().copied().fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
    let d = match f {
        QuantFormat::Int8 => m.abs() / 127.0,
        QuantFormat::Int4 => m / -8.0,
    };
    let d = half::f16::from_f32(d).to_f32();
    let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
    for (q, &v) in codes.iter_mut().zip(x) {
        *q = ((v * inv).round() as i32).clamp(lo, hi);
    }
    d
}

/// Activations quantized per token and group for one product.
pub struct QuantAct {
    /// `[t, groups · group]` int8 codes, zero past `k`.
    pub(crate) q: Vec<i8>,
    /// `[t, groups]` scales.
    pub(crate) d: Vec<f32>,
    /// `[t, groups]`: `-zero · Σ codes`, the integer accumulator's start.
    pub(crate) start: Vec<i32>,
    pub(crate) kpad: usize,
}

/// One token's slices of a [`QuantAct`] (codes, scales, accumulator
/// starts) beside its activations.
type TokenRow<'a> = (((&'a mut [i8], &'a mut [f32]), &'a mut [i32]), &'a [f32]);

/// Quantizes `t` rows of `k` activations for products with `w`; tokens in
/// parallel when there are many (a 512-token prefill would otherwise spend
/// a fifth of each product here on one thread).
pub fn prepare(x: &[f32], t: usize, k: usize, w: &QuantMatrix) -> QuantAct {
    let (group, groups) = (w.group, w.groups);
    let kpad = groups * group;
    let mut act = QuantAct { q: vec![0; t * kpad], d: vec![0.0; t * groups], start: vec![0; t * groups], kpad };
    if t == 0 || kpad == 0 {
        return act;
    }
    let zero = w.format.zero();
    let row = |(((q, d), start), x): TokenRow<'_>| {
        for g in 0..groups {
            let (c0, c1) = (g * group, ((g + 1) * group).min(k));
            let xs = &x[c0..c1];
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / 127.0;
            let inv = if scale == 0.0 { 0.0 } else { 1.0 / scale };
            let mut sum = 0i32;
            for (dst, &v) in q[c0..c1].iter_mut().zip(xs) {
                // Round to nearest even by the 1.5·2²³ trick: exact for
                // |v·inv| ≤ 127, and no libm call per element.
                let r = ((v * inv + 12582912.0) - 12582912.0) as i32;
                *dst = r.clamp(-127, 127) as i8;
                sum += *dst as i32;
            }
            d[g] = scale;
            start[g] = -zero * sum;
        }
    };
    if t * k >= 1 << 16 {
        let rows = act.q.par_chunks_mut(kpad).zip(act.d.par_chunks_mut(groups)).zip(act.start.par_chunks_mut(groups));
        rows.zip(x.par_chunks(k)).for_each(row);
    } else {
        let rows = act.q.chunks_mut(kpad).zip(act.d.chunks_mut(groups)).zip(act.start.chunks_mut(groups));
        rows.zip(x.chunks(k)).for_each(row);
    }
    act
}

/// Output columns `j0..j1` (block-aligned) of `x · wᵀ` for all `t` tokens.
///
/// # Safety
/// `out` holds `t * w.rows` floats and no other thread writes columns
/// `j0..j1`.
pub unsafe fn block(x: &QuantAct, t: usize, w: &QuantMatrix, j0: usize, j1: usize, out: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    if super::avx512::vnni_available() {
        // SAFETY: features checked; the caller's contract is forwarded.
        unsafe { super::quant_simd::block(x, t, w, j0, j1, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::avx2::available() {
        // SAFETY: features checked; the caller's contract is forwarded.
        unsafe { super::avx2::quant_block(x, t, w, j0, j1, out) };
        return;
    }
    let n = w.rows;
    for j in j0..j1.min(n) {
        for ti in 0..t {
            let mut acc = 0f32;
            for g in 0..w.groups {
                let mut i = x.start[ti * w.groups + g];
                for c in g * w.group..(g + 1) * w.group {
                    let (at, shift) = position(w.format, w.group, g, j % BLOCK, c - g * w.group);
                    let byte = w.data[(j / BLOCK) * w.block_bytes() + at];
                    let raw = match w.format {
                        QuantFormat::Int8 => byte as i32,
                        QuantFormat::Int4 => ((byte >> shift) & 0xf) as i32,
                    };
                    i += raw * x.q[ti * x.kpad + c] as i32;
                }
                // The same rounding steps as the SIMD path: the scale product
                // first, then one fused multiply-add.
                acc = (i as f32).mul_add(w.scale(j, g) * x.d[ti * w.groups + g], acc);
            }
            // SAFETY: (ti, j) lies in this caller's columns.
            unsafe { *out.add(ti * n + j) = acc };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn noise(seed: u64, len: usize) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(11);
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    }

    /// The product of the dequantized weights and dequantized activations,
    /// in f64: what the kernels must compute up to f32 rounding.
    fn reference(x: &[f32], t: usize, k: usize, w: &QuantMatrix) -> Vec<f32> {
        let a = prepare(x, t, k, w);
        let mut out = vec![0f32; t * w.rows];
        for ti in 0..t {
            for j in 0..w.rows {
                let s: f64 = (0..k)
                    .map(|c| {
                        let xv = a.q[ti * a.kpad + c] as f64 * a.d[ti * w.groups + c / w.group] as f64;
                        xv * w.get(j, c) as f64
                    })
                    .sum();
                out[ti * w.rows + j] = s as f32;
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        /// Odd shapes: rows not a multiple of 16, columns not a multiple of
        /// the group, 1..9 tokens, both formats and every group size.
        #[test]
        fn kernels_match_the_dequantized_product(
            t in 1usize..10, n in 1usize..40, k in 1usize..300, seed in 0u64..1000,
            int4 in any::<bool>(), gi in 0usize..4,
        ) {
            let format = if int4 { QuantFormat::Int4 } else { QuantFormat::Int8 };
            let wf = noise(seed, n * k);
            let x = noise(seed + 1, t * k);
            let w = QuantMatrix::quantize(format, n, k, GROUPS[gi], |r, buf| buf.copy_from_slice(&wf[r * k..(r + 1) * k]));
            let want = reference(&x, t, k, &w);
            let got = crate::kernels::matmul(&x, t, crate::tensor::MatView::Quant(&w), n, k);
            for (a, b) in got.iter().zip(&want) {
                prop_assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }

        /// Dequantized weights are within half a step of the originals (int4:
        /// one step, for values clamped at +7 opposite a -8 extreme).
        #[test]
        fn codes_round_to_nearest(n in 1usize..20, k in 1usize..100, seed in 0u64..1000, int4 in any::<bool>()) {
            let format = if int4 { QuantFormat::Int4 } else { QuantFormat::Int8 };
            let wf = noise(seed, n * k);
            let w = QuantMatrix::quantize(format, n, k, 32, |r, buf| buf.copy_from_slice(&wf[r * k..(r + 1) * k]));
            for r in 0..n {
                for c in 0..k {
                    let step = w.scale(r, c / 32).abs() * if int4 { 1.0 } else { 0.5 };
                    prop_assert!((w.get(r, c) - wf[r * k + c]).abs() <= step * 1.01 + 1e-7);
                }
            }
        }
    }

    #[test]
    fn portable_and_simd_paths_agree_exactly() {
        let (t, n, k) = (5, 37, 200);
        let wf = noise(3, n * k);
        let x = noise(4, t * k);
        for format in [QuantFormat::Int8, QuantFormat::Int4] {
            let w = QuantMatrix::quantize(format, n, k, 64, |r, buf| buf.copy_from_slice(&wf[r * k..(r + 1) * k]));
            let a = prepare(&x, t, k, &w);
            let got = crate::kernels::matmul(&x, t, crate::tensor::MatView::Quant(&w), n, k);
            let mut portable = vec![0f32; t * n];
            // The portable loop, forced: the same integer sums and roundings.
            for j in 0..n {
                for ti in 0..t {
                    let mut acc = 0f32;
                    for g in 0..w.groups {
                        let mut i = a.start[ti * w.groups + g];
                        for c in g * 64..((g + 1) * 64).min(k) {
                            i += (w.code(j, c) + format.zero()) * a.q[ti * a.kpad + c] as i32;
                        }
                        acc = (i as f32).mul_add(w.scale(j, g) * a.d[ti * w.groups + g], acc);
                    }
                    portable[ti * n + j] = acc;
                }
            }
            assert_eq!(got, portable, "{format:?}");
        }
    }

    #[test]
    fn sizes_match_llama_cpp_block_formats() {
        let w = QuantMatrix::quantize(QuantFormat::Int8, 32, 256, 32, |_, b| b.fill(1.0));
        assert_eq!(w.size_bytes() * 10000 / (32 * 256), 10625);
        let w = QuantMatrix::quantize(QuantFormat::Int4, 32, 256, 32, |_, b| b.fill(1.0));
        assert_eq!(w.size_bytes() * 10000 / (32 * 256), 5625);
        assert_eq!(w.get(3, 7), 1.0);
    }
}
