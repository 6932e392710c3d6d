//! Element-wise and row-wise operations of the forward pass.

use crate::config::{RopeConfig, RopeScaling};

/// RMSNorm over each `dim`-wide row, in place: `w * x / sqrt(mean(x²) + eps)`.
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    let dim = weight.len();
    for row in x.chunks_exact_mut(dim) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v = w * (*v * inv);
        }
    }
}

/// `silu(gate) * up` for rows laid out `[gate | up]` of width `2 * inter`,
/// written compactly into `out` (`[rows, inter]`).
pub fn swiglu(gate_up: &[f32], inter: usize, out: &mut Vec<f32>) {
    out.clear();
    out.resize(gate_up.len() / 2, 0.0);
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::avx512_enabled() {
        // SAFETY: feature checked.
        unsafe { swiglu_avx512(gate_up, inter, out) };
        return;
    }
    swiglu_rows(gate_up, inter, out);
}

/// Compiled with AVX-512 enabled so the branch-free `exp` vectorises.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn swiglu_avx512(gate_up: &[f32], inter: usize, out: &mut [f32]) {
    swiglu_rows(gate_up, inter, out);
}

#[inline(always)]
fn swiglu_rows(gate_up: &[f32], inter: usize, out: &mut [f32]) {
    for (row, o) in gate_up.chunks_exact(2 * inter).zip(out.chunks_exact_mut(inter)) {
        let (g, u) = row.split_at(inter);
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + exp(-g)) * u;
        }
    }
}

/// `eˣ` within 2 ulp for finite results, branch-free so loops over it
/// vectorise (libm's `expf` is a call per element). Cody–Waite reduction by
/// ln 2 and a degree-6 minimax polynomial, as in Cephes.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(EXP_MIN, EXP_MAX);
    let n = (x * std::f32::consts::LOG2_E).round();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = EXP_POLY[1..].iter().fold(EXP_POLY[0], |p, &k| p * r + k);
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

// `exp`'s constants, shared with its vector form. Beyond the bounds 2ⁿ
// leaves the normal range; results there only feed silu, where they round
// to 0 or x anyway, or a softmax's sum, where they are negligible.
const EXP_MIN: f32 = -87.3;
const EXP_MAX: f32 = 88.0;
/// ln 2 split in two (Cody–Waite), so `x − n·ln 2` keeps its precision.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// The minimax polynomial's coefficients, highest degree first.
const EXP_POLY: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];

/// Numerically stable softmax in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// `log(sum(exp(x)))` in f64, so tiny probabilities keep precision.
pub fn log_sum_exp(x: &[f32]) -> f64 {
    let max = max_of(x);
    if !max.is_finite() {
        return max as f64;
    }
    exp_sum(x, max).ln() + max as f64
}

/// `log_softmax(x)[i]`.
pub fn log_softmax_at(x: &[f32], i: usize) -> f32 {
    (x[i] as f64 - log_sum_exp(x)) as f32
}

/// The index of the largest value, the first of equals, NaN never chosen
/// (index 0 when none is a number): greedy decoding's token.
pub fn argmax(x: &[f32]) -> usize {
    let max = max_of(x);
    if max == f32::NEG_INFINITY {
        return 0;
    }
    x.iter().position(|&v| v == max).unwrap_or(0)
}

// Every sampled token runs `max_of` and `exp_sum` over the whole vocabulary
// (129k entries at DeepSeek's), so on x86-64 with AVX2 they are vector
// loops: the portable ones call libm per element (`roundf` in `exp`).

/// The largest value, NaN skipped (−∞ for none).
fn max_of(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::avx2::available() {
        // SAFETY: the CPU has AVX2.
        return unsafe { simd::max_of(x) };
    }
    x.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// `Σ exp(x − shift)` for `shift` ≥ every entry: each term is at most 1,
/// summed in f64.
fn exp_sum(x: &[f32], shift: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::avx2::available() {
        // SAFETY: the CPU has AVX2.
        return unsafe { simd::exp_sum(x, shift) };
    }
    // Blocks of 16 so the exponentials vectorise; each block sums in f32
    // (terms ≤ 1: good to ~1e-6 relative), the blocks in f64.
    let mut total = 0f64;
    for c in x.chunks(16) {
        let mut e = [0f32; 16];
        for (o, &v) in e.iter_mut().zip(c) {
            *o = exp(v - shift);
        }
        total += e[..c.len()].iter().map(|&v| v as f64).sum::<f64>();
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2 available.
    #[target_feature(enable = "avx2")]
    pub unsafe fn max_of(x: &[f32]) -> f32 {
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut chunks = x.chunks_exact(8);
        for c in &mut chunks {
            // SAFETY: 8 floats; maxps keeps its second operand when the
            // first is NaN, so NaN is skipped.
            m = _mm256_max_ps(unsafe { _mm256_loadu_ps(c.as_ptr()) }, m);
        }
        let mut lanes = [0f32; 8];
        // SAFETY: 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
        lanes.iter().chain(chunks.remainder()).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
    }

    /// [`super::exp`] 8 lanes at a time (the same reduction and
    /// polynomial; ties round to even), summed in f64.
    ///
    /// # Safety
    /// AVX2 and FMA available.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_sum(x: &[f32], shift: f32) -> f64 {
        // Constants hoisted as values: a closure would not inherit this
        // function's target features, and every `set1` would be a call.
        use super::{EXP_MAX, EXP_MIN, EXP_POLY, LN2_HI, LN2_LO};
        let (sh, lo_x, hi_x, log2e) = (
            _mm256_set1_ps(shift),
            _mm256_set1_ps(EXP_MIN),
            _mm256_set1_ps(EXP_MAX),
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        );
        let (ln2_hi, ln2_lo, one, bias) =
            (_mm256_set1_ps(LN2_HI), _mm256_set1_ps(LN2_LO), _mm256_set1_ps(1.0), _mm256_set1_epi32(127));
        let poly = EXP_POLY.map(|k| _mm256_set1_ps(k));
        let (mut lo, mut hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        let mut chunks = x.chunks_exact(8);
        for ch in &mut chunks {
            // SAFETY: 8 floats.
            let v = _mm256_sub_ps(unsafe { _mm256_loadu_ps(ch.as_ptr()) }, sh);
            let v = _mm256_min_ps(_mm256_max_ps(v, lo_x), hi_x);
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(v, log2e));
            let r = _mm256_fnmadd_ps(n, ln2_lo, _mm256_fnmadd_ps(n, ln2_hi, v));
            let mut p = poly[0];
            for k in &poly[1..] {
                p = _mm256_fmadd_ps(p, r, *k);
            }
            let e = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, one));
            let pow = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), bias));
            let e = _mm256_mul_ps(e, _mm256_castsi256_ps(pow));
            lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
            hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(e)));
        }
        let mut lanes = [0f64; 4];
        // SAFETY: 4 doubles.
        unsafe { _mm256_storeu_pd(lanes.as_mut_ptr(), _mm256_add_pd(lo, hi)) };
        lanes.iter().sum::<f64>() + chunks.remainder().iter().map(|&v| super::exp(v - shift) as f64).sum::<f64>()
    }
}

/// Rotary embedding tables, computed the way transformers does (f32 inverse
/// frequencies, f32 angles).
pub struct Rope {
    inv_freq: Vec<f32>,
    attention_factor: f32,
    interleaved: bool,
}

impl Rope {
    pub fn new(cfg: &RopeConfig) -> Self {
        let dim = cfg.dim;
        let half = dim / 2;
        let base = cfg.theta as f32;
        let pos_freqs: Vec<f32> = (0..half).map(|i| base.powf((2 * i) as f32 / dim as f32)).collect();
        let (inv_freq, attention_factor) = match &cfg.scaling {
            RopeScaling::Default => (pos_freqs.iter().map(|p| 1.0 / p).collect(), 1.0),
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
                ..
            } => {
                let corr = |rot: f64| {
                    dim as f64 * (*original_max_position_embeddings as f64 / (rot * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * cfg.theta.ln())
                };
                let (mut low, mut high) = (corr(*beta_fast), corr(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0) as f32;
                let mut high = high.min(dim as f64 - 1.0) as f32;
                if low == high {
                    high += 0.001;
                }
                let inv = pos_freqs
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                        let extra = 1.0 - ramp;
                        let interp = 1.0 / (*factor as f32 * p);
                        interp * (1.0 - extra) + (1.0 / p) * extra
                    })
                    .collect();
                (inv, *attention_factor as f32)
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                // In f64, then rounded once: transformers computes these in
                // float32 from float32 inv_freq, which agrees to ~1 ulp.
                let old = *original_max_position_embeddings as f64;
                let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
                let inv = pos_freqs
                    .iter()
                    .map(|p| {
                        let f = (1.0 / p) as f64;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        };
                        scaled as f32
                    })
                    .collect();
                (inv, 1.0)
            }
        };
        Rope { inv_freq, attention_factor, interleaved: cfg.interleaved }
    }

    /// Rotates one head vector `x` (length `dim`) for position `pos`.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let half = self.inv_freq.len();
        for (i, f) in self.inv_freq.iter().enumerate() {
            let angle = pos as f32 * f;
            let (cos, sin) = (angle.cos() * self.attention_factor, angle.sin() * self.attention_factor);
            let (a, b) = if self.interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
            let (x1, x2) = (x[a], x[b]);
            x[a] = x1 * cos - x2 * sin;
            x[b] = x2 * cos + x1 * sin;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_preserves_norm_and_relative_angle() {
        let cfg = RopeConfig { theta: 10000.0, dim: 8, interleaved: true, scaling: RopeScaling::Default };
        let r = Rope::new(&cfg);
        let q: Vec<f32> = (0..8).map(|i| i as f32 * 0.3 - 1.0).collect();
        let k: Vec<f32> = (0..8).map(|i| 1.0 - i as f32 * 0.2).collect();
        let dot = |p: usize, s: usize| {
            let (mut a, mut b) = (q.clone(), k.clone());
            r.apply(&mut a, p);
            r.apply(&mut b, s);
            a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>()
        };
        assert!((dot(5, 2) - dot(13, 10)).abs() < 1e-4);
    }

    #[test]
    fn llama3_rope_keeps_high_frequencies_and_divides_low_ones() {
        let (dim, theta) = (16, 10000.0);
        let plain = Rope::new(&RopeConfig { theta, dim, interleaved: false, scaling: RopeScaling::Default });
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 32,
        };
        let r = Rope::new(&RopeConfig { theta, dim, interleaved: false, scaling });
        // Wavelengths 2π·10000^(2i/16): 6.3 (< 32/4: kept), 19.9 (blended), ≥ 62.8 (> 32: divided by 8).
        assert_eq!(r.inv_freq[0], plain.inv_freq[0]);
        let (f, wl) = (plain.inv_freq[1] as f64, 2.0 * std::f64::consts::PI / plain.inv_freq[1] as f64);
        let smooth = (32.0 / wl - 1.0) / 3.0;
        assert!(((r.inv_freq[1] as f64) - ((1.0 - smooth) * f / 8.0 + smooth * f)).abs() < 1e-7);
        for i in 2..8 {
            assert!((r.inv_freq[i] - plain.inv_freq[i] / 8.0).abs() <= plain.inv_freq[i] * 1e-6, "{i}");
        }
    }

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f32;
        for i in -8700..8800 {
            let x = i as f32 / 100.0 + 0.003;
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 3e-7, "relative error {worst}");
    }

    #[test]
    fn softmax_and_log_softmax_agree() {
        let mut x = vec![1.0, 2.0, 3.0];
        let l = log_softmax_at(&x, 2);
        softmax(&mut x);
        assert!((x[2].ln() - l).abs() < 1e-6);
    }

    proptest::proptest! {
        /// The sampler's fast paths against their definitions: `argmax` is
        /// the NaN-safe first-of-equals top-1, and the blocked f32
        /// `log_sum_exp` is the plain f64 sum's to 1e-6 (rows of 1 to 3000,
        /// masked entries at −∞ among them).
        #[test]
        fn argmax_and_log_sum_exp_match_their_definitions(
            v in proptest::collection::vec(
                proptest::prop_oneof![8 => -30f32..30.0, 1 => proptest::strategy::Just(f32::NEG_INFINITY),
                                      1 => proptest::strategy::Just(f32::NAN)], 1..3000)
        ) {
            proptest::prop_assert_eq!(argmax(&v), crate::moe::top_k_indices(&v, 1)[0]);
            let finite: Vec<f32> = v.iter().copied().filter(|x| !x.is_nan()).collect();
            proptest::prop_assume!(finite.iter().any(|x| x.is_finite()));
            let max = finite.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let want = finite.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
            proptest::prop_assert!((log_sum_exp(&finite) - want).abs() < 1e-6 * want.abs().max(1.0));
        }
    }
}
