//! Hand-written matmul kernels: `y[T, N] = x[T, K] · W[N, K]ᵀ` with f32
//! activations, bf16 or f32 weights and f32 accumulation.
//!
//! Why hand-written: decode is memory-bound, so the kernel must stream bf16
//! weights once and widen them in registers (a shift) instead of materialising
//! f32 copies; for prefill it reuses each weight tile across four tokens. The
//! AVX-512 path is chosen at run time; a portable path covers other CPUs.
//! `docs/benchmarks.md` compares it with torch on the same shapes.

pub mod packed;

use crate::tensor::{MatView, bf16_to_f32, f32_to_bf16};
use rayon::prelude::*;

/// Output rows handled together by one micro-kernel call.
const ROWS: usize = 4;
/// Tokens handled together by one micro-kernel call.
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
    if let MatView::Packed { w, bf16_act, .. } = w {
        matmul_packed(x, t, w, n, k_dim, bf16_act, out);
        return;
    }
    let flops = t * n * k_dim;
    // Below this much work the fork/join costs more than it saves.
    let par = flops >= 1 << 18 && rayon::current_num_threads() > 1;
    let block = if par {
        let per = n.div_ceil(rayon::current_num_threads() * 4);
        per.next_multiple_of(8).max(8)
    } else {
        n
    };
    // bf16 weights on AVX-512: activations are pre-permuted once so each
    // 32-weight load widens with one AND and one shift (see `avx512::pairs`).
    #[cfg(target_arch = "x86_64")]
    let xperm = match w {
        MatView::Bf16(_) if avx512::available() => Some(avx512::permute_pairs(x, t, k_dim)),
        _ => None,
    };
    // bf16-activation mode: round the activations once per call.
    let xb: Option<Vec<u16>> = match w {
        MatView::Bf16Act(_) => Some(x.iter().map(|&v| f32_to_bf16(v)).collect()),
        _ => None,
    };
    let xb = xb.as_deref();
    #[cfg(not(target_arch = "x86_64"))]
    let xperm: Option<Vec<f32>> = None;
    let xperm = xperm.as_deref();
    let out_ptr = SendPtr(out.as_mut_ptr());
    let run = |j0: usize| {
        let j1 = (j0 + block).min(n);
        // SAFETY: every task writes only columns j0..j1 of `out`, disjoint
        // from all other tasks, and `out` outlives the parallel loop.
        unsafe { matmul_block(x, xperm, xb, t, w, n, k_dim, j0, j1, out_ptr) }
    };
    if par {
        (0..n.div_ceil(block)).into_par_iter().for_each(|b| run(b * block));
    } else {
        run(0);
    }
}

fn matmul_packed(x: &[f32], t: usize, w: &[u16], n: usize, k: usize, bf16_act: bool, out: &mut [f32]) {
    let acts = packed::prepare(x, t, k, bf16_act);
    let blocks = n.div_ceil(packed::BLOCK);
    let par = t * n * k >= 1 << 18 && rayon::current_num_threads() > 1;
    // Whole 32-row pairs of blocks per task where possible (the micro-kernel's width).
    let per = if par { blocks.div_ceil(rayon::current_num_threads() * 4).next_multiple_of(2) } else { blocks };
    let out_ptr = SendPtr(out.as_mut_ptr());
    let run = |b0: usize| {
        let (j0, j1) = (b0 * packed::BLOCK, ((b0 + per) * packed::BLOCK).min(blocks * packed::BLOCK));
        // SAFETY: tasks own disjoint column ranges; `out` outlives the loop.
        unsafe { packed::block(&acts, t, w, n, k, j0, j1, out_ptr.get()) }
    };
    if par {
        (0..blocks.div_ceil(per)).into_par_iter().for_each(|i| run(i * per));
    } else {
        run(0);
    }
}

/// Allocating form of [`matmul_into`].
pub fn matmul(x: &[f32], t: usize, w: MatView<'_>, n: usize, k_dim: usize) -> Vec<f32> {
    let mut out = vec![0.0; t * n];
    matmul_into(x, t, w, n, k_dim, &mut out);
    out
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

/// # Safety
/// `out` must point to `t * n` floats and no other thread may write columns
/// `j0..j1`.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_block(
    x: &[f32],
    xperm: Option<&[f32]>,
    xb: Option<&[u16]>,
    t: usize,
    w: MatView<'_>,
    n: usize,
    k_dim: usize,
    j0: usize,
    j1: usize,
    out: SendPtr,
) {
    if let (MatView::Bf16Act(ws), Some(xb)) = (w, xb) {
        #[cfg(target_arch = "x86_64")]
        if avx512::bf16_dot_available() {
            // SAFETY: features checked; bounds as documented.
            unsafe { avx512::dot_bf16::block(xb, t, ws, n, k_dim, j0, j1, out.0) };
            return;
        }
        for j in j0..j1 {
            for ti in 0..t {
                let xr = &xb[ti * k_dim..(ti + 1) * k_dim];
                let wr = &ws[j * k_dim..(j + 1) * k_dim];
                let s: f32 = xr.iter().zip(wr).map(|(&a, &b)| bf16_to_f32(a) * bf16_to_f32(b)).sum();
                // SAFETY: ti < t, j < n; column j belongs to this block.
                unsafe { *out.0.add(ti * n + j) = s };
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        // SAFETY: feature checked above; bounds as documented.
        unsafe {
            match (w, xperm) {
                (MatView::Bf16(ws), Some(xp)) => avx512::pairs::block(x, xp, t, ws, n, k_dim, j0, j1, out.0),
                (MatView::F32(ws), _) => avx512::block(x, t, ws, n, k_dim, j0, j1, out.0),
                (MatView::Bf16(ws) | MatView::Bf16Act(ws), _) => avx512::block(x, t, ws, n, k_dim, j0, j1, out.0),
                // Packed weights never get here: `matmul_into` sends them to `matmul_packed`.
                (MatView::Packed { .. }, _) => {}
            }
        }
        return;
    }
    for j in j0..j1 {
        for ti in 0..t {
            let xr = &x[ti * k_dim..(ti + 1) * k_dim];
            let mut acc = [0f32; 8];
            for (c, xv) in xr.iter().enumerate() {
                acc[c % 8] += xv * w.get(j * k_dim + c);
            }
            // SAFETY: ti < t, j < n; column j belongs to this block.
            unsafe { *out.0.add(ti * n + j) = acc.iter().sum() };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{ROWS, TOKS};
    use crate::tensor::bf16_to_f32;
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn available() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE
            .get_or_init(|| is_x86_feature_detected!("avx512f") && std::env::var_os("EXPERTMESH_NO_AVX512").is_none())
    }

    /// A weight element type the kernel can widen to f32 lanes.
    pub trait Lanes: Copy {
        /// # Safety
        /// `p` must point to 16 readable elements; AVX-512F must be available.
        unsafe fn load16(p: *const Self) -> __m512;
        fn widen(self) -> f32;
    }

    impl Lanes for f32 {
        #[inline(always)]
        unsafe fn load16(p: *const f32) -> __m512 {
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        fn widen(self) -> f32 {
            self
        }
    }

    impl Lanes for u16 {
        #[inline(always)]
        unsafe fn load16(p: *const u16) -> __m512 {
            // bf16 → f32 is a 16-bit left shift of the zero-extended bits.
            unsafe {
                let h = _mm256_loadu_si256(p as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
        }
        #[inline(always)]
        fn widen(self) -> f32 {
            bf16_to_f32(self)
        }
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
        if t == 1 {
            // Batch-1 decode is bandwidth-bound: eight rows in flight keep
            // more loads outstanding than four.
            while j + 8 <= j1 {
                // SAFETY: rows j..j+8 exist and token 0 exists.
                unsafe { tile::<W, 8, 1>(x, w, n, k, j, 0, out) };
                j += 8;
            }
        }
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
                        (_, 4) => {
                            for jj in j..j + r {
                                tile::<W, 1, 4>(x, w, n, k, jj, ti, out)
                            }
                        }
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

    pub fn bf16_dot_available() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| available() && is_x86_feature_detected!("avx512bf16"))
    }

    /// bf16 × bf16 products with `vdpbf16ps` (pairs of products summed into
    /// f32 lanes): twice the multiply rate of the f32 path.
    pub mod dot_bf16 {
        use super::{ROWS, TOKS};
        use crate::tensor::bf16_to_f32;
        use std::arch::x86_64::*;

        /// # Safety
        /// AVX-512F and AVX512-BF16 available; `out` holds `t * n` floats;
        /// columns `j0..j1` belong to the caller alone.
        #[target_feature(enable = "avx512f,avx512bf16")]
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn block(xb: &[u16], t: usize, w: &[u16], n: usize, k: usize, j0: usize, j1: usize, out: *mut f32) {
            let mut j = j0;
            // SAFETY (all calls below): row and token ranges are in bounds by
            // construction and columns j0..j1 belong to the caller.
            while j < j1 {
                let r = (j1 - j).min(ROWS);
                let mut ti = 0;
                while ti < t {
                    let tb = (t - ti).min(TOKS);
                    unsafe {
                        match (r, tb) {
                            (4, 4) => tile::<4, 4>(xb, w, n, k, j, ti, out),
                            (4, 3) => tile::<4, 3>(xb, w, n, k, j, ti, out),
                            (4, 2) => tile::<4, 2>(xb, w, n, k, j, ti, out),
                            (4, 1) => tile::<4, 1>(xb, w, n, k, j, ti, out),
                            _ => {
                                for jj in j..j + r {
                                    for tt in ti..ti + tb {
                                        tile::<1, 1>(xb, w, n, k, jj, tt, out)
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

        #[target_feature(enable = "avx512f,avx512bf16")]
        #[inline]
        unsafe fn tile<const R: usize, const B: usize>(
            xb: &[u16],
            w: &[u16],
            n: usize,
            k: usize,
            j: usize,
            ti: usize,
            out: *mut f32,
        ) {
            let mut acc = [[_mm512_setzero_ps(); B]; R];
            let main = k - k % 32;
            let mut c = 0;
            while c < main {
                let mut xv = [_mm512_setzero_si512(); B];
                for (b, v) in xv.iter_mut().enumerate() {
                    // SAFETY: token ti+b exists and c+32 ≤ k.
                    *v = unsafe { _mm512_loadu_si512(xb.as_ptr().add((ti + b) * k + c) as *const _) };
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    // SAFETY: row j+r exists and c+32 ≤ k.
                    let wv = unsafe { _mm512_loadu_si512(w.as_ptr().add((j + r) * k + c) as *const _) };
                    for (b, a) in row.iter_mut().enumerate() {
                        // SAFETY: __m512i and __m512bh are the same 512 bits.
                        let (wb, xv): (__m512bh, __m512bh) = unsafe {
                            (
                                std::mem::transmute::<__m512i, __m512bh>(wv),
                                std::mem::transmute::<__m512i, __m512bh>(xv[b]),
                            )
                        };
                        *a = _mm512_dpbf16_ps(*a, wb, xv);
                    }
                }
                c += 32;
            }
            for (r, row) in acc.iter().enumerate() {
                for (b, a) in row.iter().enumerate() {
                    let mut s = _mm512_reduce_add_ps(*a);
                    for cc in main..k {
                        s += bf16_to_f32(w[(j + r) * k + cc]) * bf16_to_f32(xb[(ti + b) * k + cc]);
                    }
                    // SAFETY: (ti+b, j+r) is inside the output and this block.
                    unsafe { *out.add((ti + b) * n + j + r) = s };
                }
            }
        }
    }

    /// Activations with each 32-wide chunk reordered as `[x0 x2 … x30 | x1 x3 … x31]`
    /// (the tail past the last full chunk unchanged).
    pub fn permute_pairs(x: &[f32], t: usize, k: usize) -> Vec<f32> {
        let main = k - k % 32;
        let mut out = x.to_vec();
        for row in 0..t {
            let (src, dst) = (&x[row * k..row * k + main], &mut out[row * k..row * k + main]);
            for (s, d) in src.chunks_exact(32).zip(dst.chunks_exact_mut(32)) {
                for i in 0..16 {
                    d[i] = s[2 * i];
                    d[16 + i] = s[2 * i + 1];
                }
            }
        }
        out
    }

    /// bf16 kernels that widen 32 weights per load: in each 32-bit lane the
    /// odd element is the high half (mask the low half off) and the even
    /// element becomes the high half after a 16-bit shift. Exact, and about
    /// half the instructions per byte of the widen-per-16 path.
    pub mod pairs {
        use super::{ROWS, TOKS};
        use crate::tensor::bf16_to_f32;
        use std::arch::x86_64::*;

        /// # Safety
        /// As [`super::block`]; `xp` is `permute_pairs(x)`.
        #[target_feature(enable = "avx512f")]
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn block(
            x: &[f32],
            xp: &[f32],
            t: usize,
            w: &[u16],
            n: usize,
            k: usize,
            j0: usize,
            j1: usize,
            out: *mut f32,
        ) {
            let mut j = j0;
            // SAFETY (all calls below): the row and token ranges are in bounds
            // by construction and columns j0..j1 belong to the caller.
            if t == 1 {
                while j + 8 <= j1 {
                    unsafe { tile::<8, 1>(x, xp, w, n, k, j, 0, out) };
                    j += 8;
                }
            }
            while j < j1 {
                let r = (j1 - j).min(ROWS);
                let mut ti = 0;
                while ti < t {
                    let tb = (t - ti).min(TOKS);
                    unsafe {
                        match (r, tb) {
                            (4, 4) => tile::<4, 4>(x, xp, w, n, k, j, ti, out),
                            (4, 3) => tile::<4, 3>(x, xp, w, n, k, j, ti, out),
                            (4, 2) => tile::<4, 2>(x, xp, w, n, k, j, ti, out),
                            (4, 1) => tile::<4, 1>(x, xp, w, n, k, j, ti, out),
                            _ => {
                                for jj in j..j + r {
                                    for tt in ti..ti + tb {
                                        tile::<1, 1>(x, xp, w, n, k, jj, tt, out)
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

        #[target_feature(enable = "avx512f")]
        #[inline]
        #[allow(clippy::too_many_arguments)]
        unsafe fn tile<const R: usize, const B: usize>(
            x: &[f32],
            xp: &[f32],
            w: &[u16],
            n: usize,
            k: usize,
            j: usize,
            ti: usize,
            out: *mut f32,
        ) {
            let mut acc = [[_mm512_setzero_ps(); B]; R];
            let hi = _mm512_set1_epi32(0xffff_0000u32 as i32);
            let wp = w.as_ptr();
            let xq = xp.as_ptr();
            let main = k - k % 32;
            let mut c = 0;
            while c < main {
                let mut xe = [_mm512_setzero_ps(); B];
                let mut xo = [_mm512_setzero_ps(); B];
                for b in 0..B {
                    // SAFETY: token ti+b exists and c+32 ≤ k.
                    unsafe {
                        xe[b] = _mm512_loadu_ps(xq.add((ti + b) * k + c));
                        xo[b] = _mm512_loadu_ps(xq.add((ti + b) * k + c + 16));
                    }
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    // SAFETY: row j+r exists and c+32 ≤ k.
                    let v = unsafe { _mm512_loadu_si512(wp.add((j + r) * k + c) as *const _) };
                    let we = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
                    let wo = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
                    for (b, a) in row.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(wo, xo[b], _mm512_fmadd_ps(we, xe[b], *a));
                    }
                }
                c += 32;
            }
            for (r, row) in acc.iter().enumerate() {
                for (b, a) in row.iter().enumerate() {
                    let mut s = _mm512_reduce_add_ps(*a);
                    for cc in main..k {
                        s += bf16_to_f32(w[(j + r) * k + cc]) * x[(ti + b) * k + cc];
                    }
                    // SAFETY: (ti+b, j+r) is inside the output and this block.
                    unsafe { *out.add((ti + b) * n + j + r) = s };
                }
            }
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
            // bf16-activation mode equals the product of bf16-rounded inputs.
            let xr: Vec<f32> = x.iter().map(|&v| crate::tensor::bf16_to_f32(f32_to_bf16(v))).collect();
            let want = reference(&xr, t, &wbf, n, k);
            let got = matmul(&x, t, MatView::Bf16Act(&wb), n, k);
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
            for p in [Precision::F32, Precision::Bf16] {
                let mut m = Matrix::new(n, k, crate::tensor::Storage::Bf16(wb.clone()));
                m.set_precision(p);
                let want = matmul(&x, t, m.view(), n, k);
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
    let mut acc = [0f32; 8];
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        acc[i % 8] += x * y;
    }
    acc.iter().sum()
}

/// `y += alpha · x`.
#[inline]
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len());
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        // SAFETY: feature checked; slices of equal length.
        unsafe { vec512::axpy(alpha, x, y) };
        return;
    }
    for (o, v) in y.iter_mut().zip(x) {
        *o += alpha * v;
    }
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
    pub unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let main = n - n % 16;
        let av = _mm512_set1_ps(alpha);
        let mut i = 0;
        while i < main {
            // SAFETY: i + 16 ≤ n for both slices.
            unsafe {
                let p = y.as_mut_ptr().add(i);
                _mm512_storeu_ps(p, _mm512_fmadd_ps(av, _mm512_loadu_ps(x.as_ptr().add(i)), _mm512_loadu_ps(p)));
            }
            i += 16;
        }
        for j in main..n {
            y[j] += alpha * x[j];
        }
    }
}
