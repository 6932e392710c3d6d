//! The device path run on the host, for machines without a GPU.
//!
//! The CUDA C kernels are compiled as C++ by the machine's `c++` with a
//! shim for CUDA's built-ins and launched by looping over their grid (they
//! use no shared memory or barriers, so a sequential loop is a faithful
//! schedule). cuBLAS is replaced by the column-major GEMM its documentation
//! defines, fed the very [`Problem`]s and leading dimensions the bank
//! passes. Together they run the whole batch pipeline of [`crate::bank`] on
//! the plan's layout and are checked against the CPU executor: indexing,
//! pointer arithmetic, rounding and summation order, everything but the
//! CUDA and cuBLAS calls themselves.

use crate::kernels::SOURCE;
use crate::plan::{BatchPlan, Problem, Projection};
use expertmesh_model::moe::{ExpertGroup, LocalExperts, Mlp};
use expertmesh_model::tensor::{Matrix, bf16_to_f32, f32_to_bf16};
use std::sync::OnceLock;

const SHIM: &str = r#"
#include <cmath>
#include <cstring>
struct em_dim3 { unsigned x, y, z; };
static em_dim3 blockIdx, blockDim, gridDim, threadIdx;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
"#;

const LAUNCHERS: &str = r#"
template <class F> static void em_launch(unsigned gx, unsigned gy, unsigned bx, F f) {
    gridDim = {gx, gy, 1}; blockDim = {bx, 1, 1};
    for (unsigned y = 0; y < gy; ++y) for (unsigned x = 0; x < gx; ++x) for (unsigned t = 0; t < bx; ++t) {
        blockIdx = {x, y, 0}; threadIdx = {t, 0, 0}; f();
    }
}
extern "C" void emu_gather(unsigned gx, unsigned gy, const float* h, const int* rows, unsigned short* out, int n, int w) {
    em_launch(gx, gy, 256, [&] { em_gather_bf16(h, rows, out, n, w); });
}
extern "C" void emu_swiglu(unsigned gx, const float* gu, unsigned short* act, int n, int inter) {
    em_launch(gx, 1, 256, [&] { em_swiglu_bf16(gu, act, n, inter); });
}
extern "C" void emu_combine(unsigned gx, unsigned gy, const float* y, const int* off, const int* pos, const float* w, float* out, int n, int h) {
    em_launch(gx, gy, 256, [&] { em_combine(y, off, pos, w, out, n, h); });
}
"#;

type Gather = unsafe extern "C" fn(u32, u32, *const f32, *const i32, *mut u16, i32, i32);
type Swiglu = unsafe extern "C" fn(u32, *const f32, *mut u16, i32, i32);
type Combine = unsafe extern "C" fn(u32, u32, *const f32, *const i32, *const i32, *const f32, *mut f32, i32, i32);

/// The kernels built as a host shared library, once per test process.
fn library() -> &'static libloading::Library {
    static LIB: OnceLock<libloading::Library> = OnceLock::new();
    LIB.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("em-kernels-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("emulation dir");
        let src = dir.join("kernels.cpp");
        std::fs::write(&src, format!("{SHIM}\n{SOURCE}\n{LAUNCHERS}")).expect("write kernels.cpp");
        let so = dir.join("libemkernels.so");
        let out = std::process::Command::new("c++")
            .args(["-std=c++17", "-O1", "-shared", "-fPIC", "-Wall", "-Werror", "-ffp-contract=off", "-o"])
            .arg(&so)
            .arg(&src)
            .output()
            .expect("run c++ (build-essential)");
        assert!(out.status.success(), "the kernels do not compile as C++: {}", String::from_utf8_lossy(&out.stderr));
        // SAFETY: a library just built from our own source.
        let lib = unsafe { libloading::Library::new(&so) }.expect("load the emulated kernels");
        // The loaded mapping outlives its file.
        std::fs::remove_dir_all(&dir).expect("remove the emulation dir");
        lib
    })
}

/// The shim's grid built-ins are globals of the library: one launch at a
/// time across the test threads.
static LAUNCH: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn launch_lock() -> std::sync::MutexGuard<'static, ()> {
    LAUNCH.lock().unwrap_or_else(|p| p.into_inner())
}

fn sym<T: Copy>(name: &[u8]) -> T {
    // SAFETY: the symbol's type is declared beside it in LAUNCHERS.
    unsafe { *library().get::<T>(name).expect("emulated kernel") }
}

/// Host buffers standing in for device memory: a "device address" is a
/// buffer's fake base plus a byte offset, so the bank's pointer arithmetic
/// is exercised unchanged.
const X: u64 = 1 << 40;
const GU: u64 = 2 << 40;
const ACT: u64 = 3 << 40;
const Y: u64 = 4 << 40;
const W: u64 = 5 << 40;

/// cuBLAS's `C = op(A) · op(B)` with `op(A) = Aᵀ`, `op(B) = B`, column-major
/// (bf16 A and B, f32 accumulation and C), on the host buffers.
fn gemm(p: &Problem, weights: &[Vec<u16>], input: &[u16], output: &mut [f32]) {
    let (m, n, k, lda, ldb, ldc) = p.cublas_dims();
    let (m, n, k, lda, ldb, ldc) = (m as usize, n as usize, k as usize, lda as usize, ldb as usize, ldc as usize);
    let a = &weights[((p.weight - W) >> 32) as usize];
    let b = &input[((p.input & 0xff_ffff_ffff) / 2) as usize..];
    let c = &mut output[((p.output & 0xff_ffff_ffff) / 4) as usize..];
    for j in 0..n {
        for i in 0..m {
            let mut acc = 0f32;
            for l in 0..k {
                acc += bf16_to_f32(a[l + i * lda]) * bf16_to_f32(b[l + j * ldb]);
            }
            c[i + j * ldc] = acc;
        }
    }
}

/// The bank's batch (steps 2–6) on the host.
fn pipeline(mlps: &[&Mlp], groups: &[ExpertGroup], hidden: &[f32], h: usize, i: usize) -> Vec<f32> {
    let n = hidden.len() / h;
    let plan = BatchPlan::new(groups, n).unwrap();
    let r = plan.rows();
    let (mut x, mut gu, mut act, mut y, mut out) =
        (vec![0u16; r * h], vec![0f32; r * 2 * i], vec![0u16; r * i], vec![0f32; r * h], vec![0f32; n * h]);
    let bits = |m: &Matrix| m.to_f32().into_iter().map(f32_to_bf16).collect::<Vec<u16>>();
    let up: Vec<Vec<u16>> = mlps.iter().map(|m| bits(&m.gate_up)).collect();
    let down: Vec<Vec<u16>> = mlps.iter().map(|m| bits(&m.down)).collect();
    let wptr: Vec<u64> = (0..mlps.len() as u64).map(|g| W + (g << 32)).collect();
    let blocks = |work: usize, cap| crate::kernels::blocks(work, cap);
    let _one = launch_lock();
    // SAFETY: buffers sized as the bank sizes its device buffers.
    unsafe {
        sym::<Gather>(b"emu_gather")(
            blocks(h, 64),
            r.clamp(1, 65_535) as u32,
            hidden.as_ptr(),
            plan.gather.as_ptr(),
            x.as_mut_ptr(),
            r as i32,
            h as i32,
        );
    }
    let proj = |input, in_f, output, out_f| Projection {
        plan: &plan,
        weights: &wptr,
        in_features: in_f,
        out_features: out_f,
        input,
        in_bytes: 2,
        output,
        out_bytes: 4,
    };
    for p in proj(X, h, GU, 2 * i).problems().iter().filter(|p| p.tokens > 0) {
        gemm(p, &up, &x, &mut gu);
    }
    unsafe { sym::<Swiglu>(b"emu_swiglu")(blocks(r * i, 4096), gu.as_ptr(), act.as_mut_ptr(), r as i32, i as i32) };
    for p in proj(ACT, i, Y, h).problems().iter().filter(|p| p.tokens > 0) {
        gemm(p, &down, &act, &mut y);
    }
    unsafe {
        sym::<Combine>(b"emu_combine")(
            blocks(h, 64),
            n.clamp(1, 65_535) as u32,
            y.as_ptr(),
            plan.offsets.as_ptr(),
            plan.pos.as_ptr(),
            plan.weights.as_ptr(),
            out.as_mut_ptr(),
            n as i32,
            h as i32,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: &mut u64) -> f32 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        (*seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    #[test]
    fn emulated_kernels_round_gather_and_activate_like_the_cpu() {
        let (h, n) = (300, 5);
        let mut s = 9;
        let hidden: Vec<f32> = (0..n * h).map(|_| rng(&mut s) * 4.0).collect();
        let rows = [4i32, 0, 4, 2];
        let mut x = vec![0u16; rows.len() * h];
        let _one = launch_lock();
        unsafe { sym::<Gather>(b"emu_gather")(2, 3, hidden.as_ptr(), rows.as_ptr(), x.as_mut_ptr(), 4, h as i32) };
        for (r, &src) in rows.iter().enumerate() {
            for c in 0..h {
                assert_eq!(x[r * h + c], f32_to_bf16(hidden[src as usize * h + c]), "row {r} col {c}");
            }
        }
        let inter = 70;
        let gu: Vec<f32> = (0..3 * 2 * inter).map(|_| rng(&mut s) * 6.0).collect();
        let mut act = vec![0u16; 3 * inter];
        unsafe { sym::<Swiglu>(b"emu_swiglu")(1, gu.as_ptr(), act.as_mut_ptr(), 3, inter as i32) };
        let mut want = Vec::new();
        expertmesh_model::ops::swiglu(&gu, inter, &mut want);
        for (j, (a, w)) in act.iter().zip(&want).enumerate() {
            // One bf16 rounding, allowed to land on either neighbour of the
            // CPU's polynomial exp.
            assert!(
                (bf16_to_f32(*a) - w).abs() <= w.abs() * 2f32.powi(-7) + 1e-30,
                "{} vs {w} at {j}",
                bf16_to_f32(*a)
            );
        }
    }

    #[test]
    fn emulated_batch_matches_the_cpu_executor_within_the_stated_tolerance() {
        let (h, i, experts, tokens, k) = (64, 48, 6, 23, 3);
        let mut s = 77;
        let mut m = |rows, cols| {
            Matrix::from_f32(rows, cols, (0..rows * cols).map(|_| rng(&mut s) / (cols as f32).sqrt()).collect())
        };
        let mlps: Vec<Mlp> = (0..experts).map(|_| Mlp::new(m(i, h), m(i, h), m(h, i), None)).collect();
        let mut cpu = LocalExperts::new(Vec::new());
        for (e, mlp) in mlps.iter().enumerate() {
            cpu.insert(
                0,
                e,
                Mlp::new(
                    Matrix::from_f32(i, h, mlp.gate_up.to_f32()[..i * h].to_vec()),
                    Matrix::from_f32(i, h, mlp.gate_up.to_f32()[i * h..].to_vec()),
                    Matrix::from_f32(h, i, mlp.down.to_f32()),
                    None,
                ),
            );
        }
        let hidden: Vec<f32> = (0..tokens * h).map(|_| rng(&mut s)).collect();
        let (mut ids, mut weights) = (Vec::new(), Vec::new());
        for t in 0..tokens {
            for j in 0..k {
                ids.push(((t * 7 + j * 5) % experts) as u32);
                weights.push(0.2 + 0.1 * j as f32);
            }
        }
        let routing = expertmesh_model::moe::Routing { top_k: k, ids, weights };
        let groups = expertmesh_model::moe::group_by_expert(&routing);
        let (want, _) = cpu.compute_timed(0, &hidden, h, &groups).unwrap();
        let used: Vec<&Mlp> = groups.iter().map(|g| &mlps[g.expert as usize]).collect();
        let got = pipeline(&used, &groups, &hidden, h, i);
        let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
        let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        eprintln!("emulated bf16 batch: max error {err:e}, {:.2e} of the output scale {scale:e}", err / scale);
        assert!(scale > 0.01, "a meaningful output scale: {scale}");
        // The tolerance the GPU check states for bf16 GEMMs (3e-2 of the
        // output's scale); this emulation lands well inside it.
        assert!(err <= 3e-2 * scale, "max error {err} against a scale of {scale}");
        assert!(err > 0.0, "bf16 rounding must show: the emulation would otherwise not be rounding");
    }
}
