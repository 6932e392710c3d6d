//! The backend's CUDA C kernels and their NVRTC compilation.
//!
//! The sources use no headers (bf16 is carried as raw `unsigned short`
//! bits, rounded to nearest even as torch rounds), so NVRTC compiles them
//! with nothing but `libnvrtc` on any x86 machine: CI compiles them for
//! sm_80 and sm_90 on every run. PTX is compiled once per process and
//! architecture and cached; the driver JITs it for the device at load.

use crate::error::{GpuError, Result};
use std::collections::HashMap;
use std::ffi::CString;
use std::sync::{Arc, Mutex, OnceLock};

/// Kernel names, as `load_function` takes them.
pub const GATHER_BF16: &str = "em_gather_bf16";
pub const SWIGLU_BF16: &str = "em_swiglu_bf16";
pub const COMBINE: &str = "em_combine";
pub const ALL: [&str; 3] = [GATHER_BF16, SWIGLU_BF16, COMBINE];

/// Threads per block of every kernel (a multiple of the warp size that
/// keeps occupancy high for the memory-bound loops below).
pub const BLOCK: u32 = 256;

/// The CUDA C source of every kernel.
pub const SOURCE: &str = r#"
// bf16 as raw bits: round to nearest even; NaN stays a (quiet) NaN.
__device__ __forceinline__ unsigned short em_f2bf(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// out[r, :] = bf16(hidden[rows[r], :]): each expert's tokens laid out
// contiguously, in the plan's order, as the GEMM's input.
extern "C" __global__ void em_gather_bf16(const float* __restrict__ hidden, const int* __restrict__ rows,
                                          unsigned short* __restrict__ out, int n_out, int h) {
    for (int r = blockIdx.y; r < n_out; r += gridDim.y) {
        const float* src = hidden + (long long)rows[r] * h;
        unsigned short* dst = out + (long long)r * h;
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < h; c += gridDim.x * blockDim.x) {
            dst[c] = em_f2bf(src[c]);
        }
    }
}

// act[r, c] = bf16(silu(gu[r, c]) * gu[r, inter + c]): gate rows first, then
// up rows, as the fused gate_up weight is stacked.
extern "C" __global__ void em_swiglu_bf16(const float* __restrict__ gu, unsigned short* __restrict__ act,
                                          int n, int inter) {
    long long total = (long long)n * inter;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i / inter, c = i % inter;
        float g = gu[r * 2 * inter + c];
        float u = gu[r * 2 * inter + inter + c];
        act[i] = em_f2bf(g / (1.0f + expf(-g)) * u);
    }
}

// out[t, :] = sum_j w[j] * y[pos[j], :] over token t's entries
// offsets[t]..offsets[t+1], in expert order: the CPU executor's summation
// order, and deterministic (no atomics).
extern "C" __global__ void em_combine(const float* __restrict__ y, const int* __restrict__ offsets,
                                      const int* __restrict__ pos, const float* __restrict__ w,
                                      float* __restrict__ out, int n_tokens, int h) {
    for (int t = blockIdx.y; t < n_tokens; t += gridDim.y) {
        int a = offsets[t], b = offsets[t + 1];
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < h; c += gridDim.x * blockDim.x) {
            float acc = 0.0f;
            for (int j = a; j < b; ++j) acc += w[j] * y[(long long)pos[j] * h + c];
            out[(long long)t * h + c] = acc;
        }
    }
}
"#;

/// `compute_XY` for a compute capability.
pub fn arch(capability: (i32, i32)) -> String {
    format!("compute_{}{}", capability.0, capability.1)
}

/// PTX of [`SOURCE`] for `arch` (`compute_90`), compiled once per process.
pub fn ptx(arch: &str) -> Result<Arc<String>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<String>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(p) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(arch) {
        return Ok(p.clone());
    }
    let p = Arc::new(compile(SOURCE, arch)?);
    cache.lock().unwrap_or_else(|p| p.into_inner()).insert(arch.to_string(), p.clone());
    Ok(p)
}

/// Compiles `src` to PTX for `arch` with NVRTC. A warning is an error too:
/// the log of a successful compile is checked, so kernels stay clean.
pub fn compile(src: &str, arch: &str) -> Result<String> {
    crate::libs::require(&[crate::libs::Lib::Nvrtc])?;
    let err = |log: String| GpuError::Compile { kernel: "expertmesh kernels".into(), arch: arch.into(), log };
    let csrc = CString::new(src).map_err(|e| err(e.to_string()))?;
    let name = c"expertmesh_kernels.cu";
    let prog = cudarc::nvrtc::result::create_program(&csrc, Some(name)).map_err(|e| err(format!("{e:?}")))?;
    let opts = [format!("--gpu-architecture={arch}"), "--std=c++17".into(), "--restrict".into()];
    // SAFETY: `prog` was just created and is destroyed below, once.
    let compiled = unsafe { cudarc::nvrtc::result::compile_program(prog, &opts) };
    let log = unsafe { cudarc::nvrtc::result::get_program_log(prog) }.map(|l| c_chars(&l)).unwrap_or_default();
    let ptx = compiled.map_err(|e| format!("{e:?}")).and_then(|()| {
        unsafe { cudarc::nvrtc::result::get_ptx(prog) }.map(|p| c_chars(&p)).map_err(|e| format!("{e:?}"))
    });
    if let Err(e) = unsafe { cudarc::nvrtc::result::destroy_program(prog) } {
        tracing::warn!(error = ?e, "destroying an NVRTC program");
    }
    let ptx = ptx.map_err(|e| err(format!("{e}: {log}")))?;
    if log.to_ascii_lowercase().contains("warning") {
        return Err(err(log));
    }
    Ok(ptx)
}

/// A NUL-terminated C string from NVRTC, as text.
fn c_chars(v: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = v.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Grid size for `work` items of `BLOCK`-thread blocks, capped where the
/// kernels loop (grid-stride) anyway.
pub fn blocks(work: usize, cap: u32) -> u32 {
    (work.div_ceil(BLOCK as usize) as u32).clamp(1, cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Makes `libnvrtc.so.12` loadable: from `EXPERTMESH_NVRTC` (a file
    /// path), else from the project's venv (`tools/pyenv.sh` installs the
    /// `nvidia-cuda-nvrtc-cu12` wheel there), else whatever the library path
    /// has. Never skips: no NVRTC is a failure.
    fn nvrtc() {
        static ONCE: OnceLock<()> = OnceLock::new();
        ONCE.get_or_init(|| {
            if crate::libs::Lib::Nvrtc.present() {
                return;
            }
            let path = match std::env::var_os("EXPERTMESH_NVRTC") {
                Some(p) => std::path::PathBuf::from(p),
                None => venv_nvrtc(),
            };
            crate::libs::preload(&path).unwrap_or_else(|e| panic!("NVRTC for the kernel tests: {e}"));
        });
    }

    fn venv_nvrtc() -> std::path::PathBuf {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = std::process::Command::new(root.join("tools/pyenv.sh")).output().expect("run tools/pyenv.sh");
        assert!(out.status.success(), "tools/pyenv.sh: {}", String::from_utf8_lossy(&out.stderr));
        let python = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let out = std::process::Command::new(python)
            .args(["-c", "import nvidia.cuda_nvrtc as m; print(list(m.__path__)[0])"])
            .output()
            .expect("run the venv's python");
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(!dir.is_empty(), "nvidia-cuda-nvrtc-cu12 is not in the venv: {}", String::from_utf8_lossy(&out.stderr));
        std::path::Path::new(&dir).join("lib/libnvrtc.so.12")
    }

    #[test]
    fn nvrtc_compiles_every_kernel_for_sm80_and_sm90() {
        nvrtc();
        for arch in ["compute_80", "compute_90"] {
            let ptx = compile(SOURCE, arch).unwrap_or_else(|e| panic!("{e}"));
            for k in ALL {
                assert!(ptx.contains(&format!(".entry {k}")), "{k} missing from the {arch} PTX");
            }
            assert!(ptx.contains(&format!(".target sm_{}", &arch[8..])), "{arch}");
        }
    }

    #[test]
    fn nvrtc_reports_errors_and_warnings() {
        nvrtc();
        let e = compile("extern \"C\" __global__ void k() { undeclared(); }", "compute_90").unwrap_err();
        assert!(e.to_string().contains("undeclared"), "{e}");
        // An unused variable is a warning NVRTC prints; it must fail too.
        let w = compile("extern \"C\" __global__ void k(int* p) { int unused = 3; p[0] = 1; }", "compute_90");
        let e = w.expect_err("a warning must fail the compile").to_string();
        assert!(e.contains("warning") && e.contains("unused"), "{e}");
    }

    #[test]
    fn nvrtc_ptx_is_cached_per_arch() {
        nvrtc();
        let a = ptx("compute_80").unwrap();
        let b = ptx("compute_80").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(arch((9, 0)), "compute_90");
        assert_eq!(blocks(0, 8), 1);
        assert_eq!(blocks(257, 8), 2);
        assert_eq!(blocks(1 << 30, 8), 8);
    }
}
