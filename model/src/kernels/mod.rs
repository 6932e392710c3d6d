//! Hand-written matmul kernels: `y[T, N] = x[T, K] · W[N, K]ᵀ` with f32
//! accumulation.
//!
//! Why hand-written: decode is memory-bound, so bf16 weights must be streamed
//! once and widened in registers instead of materialised as f32; prefill and
//! expert batches need every weight load reused across tokens. bf16 weights
//! use the packed layout of [`packed`]; f32 weights (f32 checkpoints, gates,
//! absorbed MLA matrices) use the row-major tiles here. AVX-512 is chosen at
//! run time, then AVX2 + FMA ([`avx2`]); portable loops cover other CPUs
//! (the simple ones are written in 8-lane chunks, so they also run as
//! AVX2 code where the CPU has it). `docs/benchmarks.md` compares
//! them with torch on the same shapes.

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
pub mod fp8;
pub mod packed;
pub mod quant;
#[cfg(target_arch = "x86_64")]
mod quant_simd;
pub mod rows;

use crate::tensor::MatView;
use rayon::prelude::*;

/// Output rows handled together by one row-major micro-kernel call.
const ROWS: usize = 4;
/// Tokens handled together by one row-major micro-kernel call.
const TOKS: usize = 4;

/// `out[t * n + j] = Σ_k x[t * k_dim + k] · w[j * k_dim + k]` for a weight view
/// of `n` rows of `k_dim` columns. `out` is overwritten.
pub fn matmul_into(x: &[f32], t: usize, w: MatView<'_>, n: usize, k_dim: usize, out: &mut [f32]) {
    assert_eq!(x.len(), t * k_dim, "matmul: activation length");
    assert_eq!(w.len(), n * k_dim, "matmul: weight length");
    assert_eq!(out.len(), t * n, "matmul: output length");
    if t == 0 || n == 0 {
        return;
    }
    let out_ptr = SendPtr(out.as_mut_ptr());
    match w {
        MatView::Packed { w, bf16_act, .. } => {
            let acts = packed::prepare(x, t, k_dim, bf16_act);
            // Two blocks per unit: the packed micro-kernel's width.
            par_columns(n, 2 * packed::BLOCK, t * n * k_dim, |j0, j1| {
                // SAFETY: `par_columns` hands out disjoint column ranges.
                unsafe { packed::block(&acts, t, w, n, k_dim, j0, j1, out_ptr.get()) }
            });
        }
        MatView::Fp8(f) => par_columns(n, fp8::BLOCK, t * n * k_dim, |j0, j1| {
            // SAFETY: `par_columns` hands out disjoint column ranges.
            unsafe { fp8::block(x, t, f, j0, j1, out_ptr.get()) }
        }),
        MatView::Quant(q) => {
            let acts = quant::prepare(x, t, k_dim, q);
            par_columns(n, 2 * quant::BLOCK, t * n * k_dim, |j0, j1| {
                // SAFETY: `par_columns` hands out disjoint column ranges.
                unsafe { quant::block(&acts, t, q, j0, j1, out_ptr.get()) }
            });
        }
        MatView::F32(ws) => par_columns(n, ROWS, t * n * k_dim, |j0, j1| {
            // SAFETY: as above.
            unsafe { row_major_block(x, t, ws, n, k_dim, j0, j1, out_ptr.get()) }
        }),
        MatView::Bf16(ws) => par_columns(n, ROWS, t * n * k_dim, |j0, j1| {
            // SAFETY: as above.
            unsafe { row_major_block(x, t, ws, n, k_dim, j0, j1, out_ptr.get()) }
        }),
    }
}

/// Whether the AVX-512 paths run (the CPU has them and
/// `EXPERTMESH_NO_AVX512` is unset); other modules' SIMD follows the same switch.
pub(crate) fn avx512_enabled() -> bool {
    #[cfg(target_arch = "x86_64")]
    return avx512::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether bf16 activations make bf16 products faster on this CPU, which
/// `--precision auto` asks. They need AVX512-BF16, and they pay only where
/// `vdpbf16ps` (32 multiply-adds) issues at the rate of an f32 FMA (16):
/// AMD Zen 4 and later, where bf16 activations measured 1.8× the expert
/// FFN's f32 rate at 256 tokens. Intel cores issue it on one port against
/// two for FMAs, and there the same kernels measured 0.5× at 64–256 tokens
/// and 1.02–1.05× at one (docs/benchmarks.md), so the rule is the vendor.
pub fn bf16_dot_is_fast() -> bool {
    #[cfg(target_arch = "x86_64")]
    return avx512::bf16_dot_available() && cpu_vendor() == *b"AuthenticAMD";
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The CPUID vendor string (leaf 0: EBX, EDX, ECX).
#[cfg(target_arch = "x86_64")]
fn cpu_vendor() -> [u8; 12] {
    // SAFETY: CPUID leaf 0 exists on every x86_64 CPU.
    #[allow(unused_unsafe)]
    let r = unsafe { std::arch::x86_64::__cpuid(0) };
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&r.ebx.to_le_bytes());
    v[4..8].copy_from_slice(&r.edx.to_le_bytes());
    v[8..].copy_from_slice(&r.ecx.to_le_bytes());
    v
}

/// Walks the register tiles of output columns `j0..j1` (16-row blocks, two
/// at a time where two fit and `pair` is set) and of tokens `0..t` (up to
/// `tb` at a time), calling `f(j, blocks, ti, tokens)`: the loop the
/// packed-bf16, quantized and FP8 micro-kernels share.
#[inline(always)]
pub(crate) fn tiles(
    j0: usize,
    j1: usize,
    t: usize,
    pair: bool,
    tb: usize,
    mut f: impl FnMut(usize, usize, usize, usize),
) {
    let mut j = j0;
    while j < j1 {
        let nb = if pair && j + 2 * packed::BLOCK <= j1 { 2 } else { 1 };
        let mut ti = 0;
        while ti < t {
            let n = (t - ti).min(tb);
            f(j, nb, ti, n);
            ti += n;
        }
        j += nb * packed::BLOCK;
    }
}

/// Allocating form of [`matmul_into`].
pub fn matmul(x: &[f32], t: usize, w: MatView<'_>, n: usize, k_dim: usize) -> Vec<f32> {
    let mut out = vec![0.0; t * n];
    matmul_into(x, t, w, n, k_dim, &mut out);
    out
}

/// Splits output columns `0..n` into ranges (multiples of `unit`) and runs
/// `f` on them, in parallel when `work` (multiply-adds) pays for it.
fn par_columns(n: usize, unit: usize, work: usize, f: impl Fn(usize, usize) + Sync) {
    let threads = rayon::current_num_threads();
    // Below this much work the fork/join costs more than it saves.
    if work < 1 << 18 || threads == 1 {
        f(0, n);
        return;
    }
    let per = n.div_ceil(threads * 4).next_multiple_of(unit);
    (0..n.div_ceil(per)).into_par_iter().for_each(|i| f(i * per, ((i + 1) * per).min(n)));
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);

impl SendPtr {
    /// A method (not a field access) so closures capture the Send wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: used only for disjoint writes inside `matmul_into`.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Row-major weights `[n, k]`: output columns `j0..j1` for all tokens.
///
/// # Safety
/// `out` must point to `t * n` floats and no other thread may write columns
/// `j0..j1`.
#[allow(clippy::too_many_arguments)]
unsafe fn row_major_block<W: Lanes>(
    x: &[f32],
    t: usize,
    w: &[W],
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
    out: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        // SAFETY: feature checked above; bounds as documented.
        unsafe { avx512::block(x, t, w, n, k, j0, j1, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: AVX2 checked above; bounds as documented.
        unsafe { row_major_avx2(x, t, w, n, k, j0, j1, out) };
        return;
    }
    // SAFETY: the caller's contract.
    unsafe { row_major_portable(x, t, w, n, k, j0, j1, out) }
}

/// The portable loop of [`row_major_block`], compiled for AVX2.
///
/// # Safety
/// AVX2 available; otherwise as [`row_major_block`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn row_major_avx2<W: Lanes>(
    x: &[f32],
    t: usize,
    w: &[W],
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
    out: *mut f32,
) {
    // SAFETY: forwarded.
    unsafe { row_major_portable(x, t, w, n, k, j0, j1, out) }
}

/// # Safety
/// As [`row_major_block`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn row_major_portable<W: Lanes>(
    x: &[f32],
    t: usize,
    w: &[W],
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
    out: *mut f32,
) {
    for j in j0..j1 {
        for ti in 0..t {
            let s = lanes8(&x[ti * k..(ti + 1) * k], &w[j * k..(j + 1) * k], |a, b| a * b.widen());
            // SAFETY: ti < t, j < n; column j belongs to this block.
            unsafe { *out.add(ti * n + j) = s };
        }
    }
}

/// `Σ f(a[i], b[i])` with term `i` added into lane `i % 8` and the lanes
/// summed at the end: written in 8-lane chunks so that it vectorizes (two
/// SSE or one AVX2 register), with the same sums whatever the width.
#[inline(always)]
pub(crate) fn lanes8<A: Copy, B: Copy>(a: &[A], b: &[B], f: impl Fn(A, B) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += f(xa[l], xb[l]);
        }
    }
    for (l, (&x, &y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += f(x, y);
    }
    acc.iter().sum()
}

/// A weight element type the kernels widen to f32.
pub trait Lanes: Copy + Sync {
    /// # Safety
    /// `p` must point to 16 readable elements; AVX-512F must be available.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
    fn widen(self) -> f32;
}

impl Lanes for f32 {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: per the trait contract.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

/// Raw bf16 bits.
impl Lanes for u16 {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const u16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // bf16 → f32 is a 16-bit left shift of the zero-extended bits.
        // SAFETY: per the trait contract.
        unsafe {
            let h = _mm256_loadu_si256(p as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        crate::tensor::bf16_to_f32(self)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Lanes, ROWS, TOKS};
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn available() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE
            .get_or_init(|| is_x86_feature_detected!("avx512f") && std::env::var_os("EXPERTMESH_NO_AVX512").is_none())
    }

    pub fn bf16_dot_available() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| available() && is_x86_feature_detected!("avx512bf16"))
    }

    pub fn vnni_available() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            available() && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512bw")
        })
    }

    /// # Safety
    /// AVX-512F available; `out` points to `t * n` floats; columns `j0..j1`
    /// belong to the caller alone.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn block<W: Lanes>(
        x: &[f32],
        t: usize,
        w: &[W],
        n: usize,
        k: usize,
        j0: usize,
        j1: usize,
        out: *mut f32,
    ) {
        let mut j = j0;
        while j < j1 {
            let r = (j1 - j).min(ROWS);
            let mut ti = 0;
            while ti < t {
                let tb = (t - ti).min(TOKS);
                // SAFETY: r ≤ ROWS rows from j and tb ≤ TOKS tokens from ti
                // are in bounds by construction.
                unsafe {
                    match (r, tb) {
                        (4, 4) => tile::<W, 4, 4>(x, w, n, k, j, ti, out),
                        (4, 3) => tile::<W, 4, 3>(x, w, n, k, j, ti, out),
                        (4, 2) => tile::<W, 4, 2>(x, w, n, k, j, ti, out),
                        (4, 1) => tile::<W, 4, 1>(x, w, n, k, j, ti, out),
                        _ => {
                            for jj in j..j + r {
                                for tt in ti..ti + tb {
                                    tile::<W, 1, 1>(x, w, n, k, jj, tt, out)
                                }
                            }
                        }
                    }
                }
                ti += tb;
            }
            j += r;
        }
    }

    /// R weight rows × B tokens, 16 lanes at a time, each weight vector loaded
    /// once and used B times.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<W: Lanes, const R: usize, const B: usize>(
        x: &[f32],
        w: &[W],
        n: usize,
        k: usize,
        j: usize,
        ti: usize,
        out: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); B]; R];
        let wp = w.as_ptr();
        let xp = x.as_ptr();
        let main = k - k % 16;
        let mut c = 0;
        while c < main {
            let mut xv = [_mm512_setzero_ps(); B];
            for (b, v) in xv.iter_mut().enumerate() {
                // SAFETY: token ti+b exists and c+16 ≤ k.
                *v = unsafe { _mm512_loadu_ps(xp.add((ti + b) * k + c)) };
            }
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: row j+r exists and c+16 ≤ k.
                let wv = unsafe { W::load16(wp.add((j + r) * k + c)) };
                for (b, a) in row.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(wv, xv[b], *a);
                }
            }
            c += 16;
        }
        for (r, row) in acc.iter().enumerate() {
            for (b, a) in row.iter().enumerate() {
                let mut s = _mm512_reduce_add_ps(*a);
                for cc in main..k {
                    s += w[(j + r) * k + cc].widen() * x[(ti + b) * k + cc];
                }
                // SAFETY: (ti+b, j+r) is inside the output and this block.
                unsafe { *out.add((ti + b) * n + j + r) = s };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::f32_to_bf16;
    use proptest::prelude::*;

    fn reference(x: &[f32], t: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0.0f64; t * n];
        for ti in 0..t {
            for j in 0..n {
                out[ti * n + j] = (0..k).map(|c| x[ti * k + c] as f64 * w[j * k + c] as f64).sum();
            }
        }
        out.into_iter().map(|v| v as f32).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn matches_reference(t in 1usize..9, n in 1usize..23, k in 1usize..70, seed in 0u64..1000) {
            let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let mut next = || { s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5 };
            let x: Vec<f32> = (0..t * k).map(|_| next()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| next()).collect();
            let want = reference(&x, t, &w, n, k);
            let got = matmul(&x, t, MatView::F32(&w), n, k);
            for (a, b) in got.iter().zip(&want) { prop_assert!((a - b).abs() < 1e-4, "{a} vs {b}"); }
            let wb: Vec<u16> = w.iter().map(|&v| f32_to_bf16(v)).collect();
            let wbf: Vec<f32> = wb.iter().map(|&v| crate::tensor::bf16_to_f32(v)).collect();
            let want = reference(&x, t, &wbf, n, k);
            let got = matmul(&x, t, MatView::Bf16(&wb), n, k);
            for (a, b) in got.iter().zip(&want) { prop_assert!((a - b).abs() < 1e-4, "{a} vs {b}"); }

        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn packed_matches_row_major(t in 1usize..11, n in 1usize..70, k in 1usize..75, seed in 0u64..1000) {
            use crate::tensor::{Matrix, Precision};
            let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(7);
            let mut next = || { s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5 };
            let x: Vec<f32> = (0..t * k).map(|_| next()).collect();
            let wb: Vec<u16> = (0..n * k).map(|_| f32_to_bf16(next())).collect();
            // bf16-activation mode equals the exact product of bf16-rounded inputs.
            let xr: Vec<f32> = x.iter().map(|&v| crate::tensor::bf16_to_f32(f32_to_bf16(v))).collect();
            for p in [Precision::F32, Precision::Bf16] {
                let mut m = Matrix::new(n, k, crate::tensor::Storage::Bf16(wb.clone()));
                m.set_precision(p);
                let want = matmul(if p == Precision::Bf16 { &xr } else { &x }, t, m.view(), n, k);
                let packed = m.clone().packed();
                let is_packed = matches!(packed.view(), MatView::Packed { .. });
                prop_assert!(is_packed);
                let got = matmul(&x, t, packed.view(), n, k);
                for (a, b) in got.iter().zip(&want) { prop_assert!((a - b).abs() < 1e-4, "{p:?}: {a} vs {b}"); }
                prop_assert_eq!(packed.to_f32(), m.to_f32());
            }
        }
    }

    #[test]
    fn large_parallel_matches() {
        let (t, n, k) = (5, 300, 515);
        let x: Vec<f32> = (0..t * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 10.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 11 % 17) as f32 - 8.0) / 10.0).collect();
        let want = reference(&x, t, &w, n, k);
        let got = matmul(&x, t, MatView::F32(&w), n, k);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        }
    }
}

/// `Σ a[i] · b[i]` in f32.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        // SAFETY: feature checked; slices of equal length.
        return unsafe { vec512::dot(a, b) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: feature checked.
        return unsafe { dot_avx2(a, b) };
    }
    lanes8(a, b, |x, y| x * y)
}

/// [`lanes8`]'s dot product compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    lanes8(a, b, |x, y| x * y)
}

/// `y += alpha · x`, `x` in f32 or bf16 bits.
#[inline]
pub fn axpy<W: Lanes>(alpha: f32, x: &[W], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len());
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        // SAFETY: feature checked; slices of equal length.
        unsafe { vec512::axpy(alpha, x, y) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: feature checked.
        unsafe { axpy_avx2(alpha, x, y) };
        return;
    }
    axpy_portable(alpha, x, y, W::widen);
}

/// `y[i] += alpha · f(x[i])`: independent lanes, so it vectorizes as written.
#[inline(always)]
pub(crate) fn axpy_portable<X: Copy>(alpha: f32, x: &[X], y: &mut [f32], f: impl Fn(X) -> f32) {
    for (o, v) in y.iter_mut().zip(x) {
        *o += alpha * f(*v);
    }
}

/// [`axpy_portable`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn axpy_avx2<W: Lanes>(alpha: f32, x: &[W], y: &mut [f32]) {
    axpy_portable(alpha, x, y, W::widen)
}

#[cfg(target_arch = "x86_64")]
mod vec512 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let main = n - n % 32;
        let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        while i < main {
            // SAFETY: i + 32 ≤ n for both slices.
            unsafe {
                s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a.as_ptr().add(i)), _mm512_loadu_ps(b.as_ptr().add(i)), s0);
                s1 = _mm512_fmadd_ps(
                    _mm512_loadu_ps(a.as_ptr().add(i + 16)),
                    _mm512_loadu_ps(b.as_ptr().add(i + 16)),
                    s1,
                );
            }
            i += 32;
        }
        let mut s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
        for j in main..n {
            s += a[j] * b[j];
        }
        s
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn axpy<W: super::Lanes>(alpha: f32, x: &[W], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let main = n - n % 16;
        let av = _mm512_set1_ps(alpha);
        let mut i = 0;
        while i < main {
            // SAFETY: i + 16 ≤ n for both slices.
            unsafe {
                let p = y.as_mut_ptr().add(i);
                _mm512_storeu_ps(p, _mm512_fmadd_ps(av, W::load16(x.as_ptr().add(i)), _mm512_loadu_ps(p)));
            }
            i += 16;
        }
        for j in main..n {
            y[j] += alpha * x[j].widen();
        }
    }
}
