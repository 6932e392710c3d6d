//! [`CudaExperts`]: routed experts in device memory, computed with cuBLAS.
//!
//! Weights are uploaded once, as bf16 (`gate_up` fused, `[2·inter, h]`, and
//! `down`, `[h, inter]`, row-major as the checkpoint stores them). A batch
//! runs on one stream:
//! 1. token rows host → device through a pinned buffer reused across calls;
//! 2. `em_gather_bf16` lays out each expert's rows contiguously, in bf16;
//! 3. one grouped GEMM (`cublasGemmGroupedBatchedEx`, cuBLAS ≥ 12.5; one
//!    `cublasGemmEx` per expert before that) for every expert's `gate_up`,
//!    bf16 × bf16 with f32 accumulation and f32 output;
//! 4. `em_swiglu_bf16` over all rows at once;
//! 5. the grouped GEMM again for `down`, f32 output;
//! 6. `em_combine` sums each token's weighted outputs in expert order;
//! 7. combined rows device → host through a second pinned buffer.
//!
//! Scratch buffers grow to the largest batch seen and are reused. The
//! batch's device time comes from CUDA events around steps 2–6 and is split
//! over its experts by their share of rows (their share of the FLOPs).

use crate::buffers::{grow, pinned, ptr};
use crate::device::Device;
use crate::error::{GpuError, Result};
use crate::kernels;
use crate::plan::{BatchPlan, GroupedArrays, Problem, Projection};
use cudarc::cublas::sys as blas;
use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PinnedHostSlice, PushKernelArg};
use expertmesh_model::moe::{ExpertBank, ExpertGroup, Mlp};
use expertmesh_model::tensor::f32_to_bf16;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// One expert's weights on the device.
struct DeviceMlp {
    gate_up: CudaSlice<u16>,
    down: CudaSlice<u16>,
}

/// Buffers reused across batches, grown on demand.
#[derive(Default)]
struct Scratch {
    pinned_in: Option<PinnedHostSlice<f32>>,
    pinned_out: Option<PinnedHostSlice<f32>>,
    hidden: Option<CudaSlice<f32>>,
    indices: Option<CudaSlice<i32>>,
    weights: Option<CudaSlice<f32>>,
    x: Option<CudaSlice<u16>>,
    gu: Option<CudaSlice<f32>>,
    act: Option<CudaSlice<u16>>,
    y: Option<CudaSlice<f32>>,
    out: Option<CudaSlice<f32>>,
    pointers: Option<CudaSlice<u64>>,
}

struct Kernels {
    gather: CudaFunction,
    swiglu: CudaFunction,
    combine: CudaFunction,
}

struct Inner {
    dev: Device,
    kernels: Kernels,
    scratch: Scratch,
}

/// Routed experts on one CUDA device.
pub struct CudaExperts {
    inner: Mutex<Inner>,
    experts: BTreeMap<(usize, usize), DeviceMlp>,
    name: String,
    hidden: usize,
    inter: usize,
    /// cuBLAS has `cublasGemmGroupedBatchedEx` (12.5 and later) and took
    /// these types: cleared, with a warning, the first time it refuses them
    /// (its documented type list is narrower than `cublasGemmEx`'s), after
    /// which every batch loops over `cublasGemmEx`.
    grouped: std::sync::atomic::AtomicBool,
}

// SAFETY: the device handles are only used under `inner`'s lock or through
// `&mut self`; cudarc's context, stream and slices are themselves Send/Sync.
unsafe impl Sync for CudaExperts {}

impl CudaExperts {
    /// Opens `cuda:ordinal` for experts of `hidden × inter`, compiling the
    /// kernels for its architecture.
    pub fn open(ordinal: usize, hidden: usize, inter: usize) -> Result<CudaExperts> {
        let dev = Device::open(ordinal)?;
        let ptx = kernels::ptx(&kernels::arch(dev.capability))?;
        let module = dev.ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx.as_str()))?;
        let kernels = Kernels {
            gather: module.load_function(kernels::GATHER_BF16)?,
            swiglu: module.load_function(kernels::SWIGLU_BF16)?,
            combine: module.load_function(kernels::COMBINE)?,
        };
        let mut version = 0;
        // SAFETY: a valid handle and an out-pointer.
        unsafe { blas::cublasGetVersion_v2(*dev.blas.handle(), &mut version) }.result()?;
        let name = dev.name.clone();
        tracing::info!(device = %name, cublas = version, "CUDA expert bank open");
        Ok(CudaExperts {
            inner: Mutex::new(Inner { dev, kernels, scratch: Scratch::default() }),
            experts: BTreeMap::new(),
            name,
            hidden,
            inter,
            grouped: std::sync::atomic::AtomicBool::new(version >= 120_500),
        })
    }

    /// Free and total device memory.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.lock()?.dev.memory()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>> {
        Ok(self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// `grouped` (one `cublasGemmGroupedBatchedEx` per projection) or
    /// `loop` (one `cublasGemmEx` per expert).
    pub fn gemm_path(&self) -> &'static str {
        if self.grouped.load(std::sync::atomic::Ordering::Relaxed) { "grouped" } else { "loop" }
    }

    /// Runs one projection's GEMMs: grouped where cuBLAS has it and takes
    /// these types, else one call per expert.
    fn gemms(&self, inner: &mut Inner, problems: &[Problem]) -> Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.grouped.load(Relaxed) && problems.len() > 1 {
            match self.grouped_gemm(inner, problems) {
                Ok(()) => return Ok(()),
                // Refused at the call (types or sizes): nothing was queued.
                Err(e) => {
                    tracing::warn!(error = %e, "cublasGemmGroupedBatchedEx refused bf16→f32; one cublasGemmEx per expert from now on");
                    self.grouped.store(false, Relaxed);
                }
            }
        }
        self.gemm_loop(inner, problems)
    }

    fn grouped_gemm(&self, inner: &mut Inner, problems: &[Problem]) -> Result<()> {
        let handle = *inner.dev.blas.handle();
        {
            let g = GroupedArrays::new(problems);
            if g.groups() == 0 {
                return Ok(());
            }
            let stream = inner.dev.stream.clone();
            let ptrs = grow(&stream, &mut inner.scratch.pointers, g.pointers.len())?;
            let base = ptr(ptrs, &stream);
            // SAFETY: `ptrs` holds at least `pointers.len()` u64s; the stream
            // is synchronised before the host vector is dropped (end of batch).
            unsafe { cudarc::driver::result::memcpy_htod_async(base, &g.pointers, stream.cu_stream()) }?;
            let n = g.groups() as u64;
            let (ops_t, ops_n) = (
                vec![blas::cublasOperation_t::CUBLAS_OP_T; g.groups()],
                vec![blas::cublasOperation_t::CUBLAS_OP_N; g.groups()],
            );
            // SAFETY: host arrays of `groups` entries; device pointer arrays
            // A, B, C at base, base + n, base + 2n; every matrix in bounds by
            // construction of the plan.
            unsafe {
                blas::cublasGemmGroupedBatchedEx(
                    handle,
                    ops_t.as_ptr(),
                    ops_n.as_ptr(),
                    g.m.as_ptr(),
                    g.n.as_ptr(),
                    g.k.as_ptr(),
                    g.alpha.as_ptr().cast(),
                    base as *const *const std::ffi::c_void,
                    blas::cudaDataType_t::CUDA_R_16BF,
                    g.lda.as_ptr(),
                    (base + 8 * n) as *const *const std::ffi::c_void,
                    blas::cudaDataType_t::CUDA_R_16BF,
                    g.ldb.as_ptr(),
                    g.beta.as_ptr().cast(),
                    (base + 16 * n) as *const *mut std::ffi::c_void,
                    blas::cudaDataType_t::CUDA_R_32F,
                    g.ldc.as_ptr(),
                    g.groups() as i32,
                    g.group_size.as_ptr(),
                    blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                )
            }
            .result()?;
            // The host arrays must outlive the call's reads of them, which
            // happen at launch: cuBLAS copies them before returning.
            Ok(())
        }
    }

    fn gemm_loop(&self, inner: &mut Inner, problems: &[Problem]) -> Result<()> {
        let handle = *inner.dev.blas.handle();
        let (alpha, beta) = (1f32, 0f32);
        for p in problems.iter().filter(|p| p.tokens > 0) {
            let (m, n, k, lda, ldb, ldc) = p.cublas_dims();
            // SAFETY: pointers from the plan, in bounds of their buffers.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    handle,
                    blas::cublasOperation_t::CUBLAS_OP_T,
                    blas::cublasOperation_t::CUBLAS_OP_N,
                    m,
                    n,
                    k,
                    (&alpha as *const f32).cast(),
                    p.weight as *const _,
                    blas::cudaDataType_t::CUDA_R_16BF,
                    lda,
                    p.input as *const _,
                    blas::cudaDataType_t::CUDA_R_16BF,
                    ldb,
                    (&beta as *const f32).cast(),
                    p.output as *mut _,
                    blas::cudaDataType_t::CUDA_R_32F,
                    ldc,
                    blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }?;
        }
        Ok(())
    }
}

/// A grid for `rows × width` work: x over the row, y over rows.
fn grid(width: usize, rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (kernels::blocks(width, 64), rows.clamp(1, 65_535) as u32, 1),
        block_dim: (kernels::BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn bf16_bits(m: &expertmesh_model::tensor::Matrix) -> Vec<u16> {
    m.to_f32().into_iter().map(f32_to_bf16).collect()
}

impl ExpertBank for CudaExperts {
    fn device(&self) -> String {
        self.name.clone()
    }

    fn has(&self, layer: usize, expert: usize) -> bool {
        self.experts.contains_key(&(layer, expert))
    }

    fn insert(&mut self, layer: usize, expert: usize, mlp: Mlp) -> expertmesh_model::Result<()> {
        let (h, i) = (self.hidden, self.inter);
        if mlp.bias.is_some() || mlp.gate_up.cols() != h || mlp.gate_up.rows() != 2 * i || mlp.down.rows() != h {
            return Err(
                GpuError::Invalid(format!("expert {expert} of layer {layer}: not a bias-free {h}×{i} SwiGLU")).into()
            );
        }
        let (gu, down) = (bf16_bits(&mlp.gate_up), bf16_bits(&mlp.down));
        drop(mlp);
        let inner = self.lock()?;
        let stream = &inner.dev.stream;
        let w = DeviceMlp {
            gate_up: stream.clone_htod(&gu).map_err(GpuError::from)?,
            down: stream.clone_htod(&down).map_err(GpuError::from)?,
        };
        stream.synchronize().map_err(GpuError::from)?;
        drop(inner);
        self.experts.insert((layer, expert), w);
        Ok(())
    }

    fn remove(&mut self, layer: usize, expert: usize) -> bool {
        self.experts.remove(&(layer, expert)).is_some()
    }

    fn loaded(&self) -> Vec<(usize, usize)> {
        self.experts.keys().copied().collect()
    }

    fn size_bytes(&self) -> usize {
        self.experts.len() * 2 * 3 * self.hidden * self.inter
    }

    fn bytes_for(&self, _mlp: &Mlp) -> usize {
        2 * 3 * self.hidden * self.inter
    }

    fn compute_timed(
        &self,
        layer: usize,
        hidden: &[f32],
        h: usize,
        groups: &[ExpertGroup],
    ) -> expertmesh_model::Result<(Vec<f32>, Vec<f64>)> {
        Ok(self.run(layer, hidden, h, groups)?)
    }
}

impl CudaExperts {
    fn run(&self, layer: usize, hidden: &[f32], h: usize, groups: &[ExpertGroup]) -> Result<(Vec<f32>, Vec<f64>)> {
        if h != self.hidden || !hidden.len().is_multiple_of(h.max(1)) {
            return Err(GpuError::Invalid(format!("rows of {h} values for experts of width {}", self.hidden)));
        }
        let n = hidden.len() / h;
        let mut weights = Vec::with_capacity(groups.len());
        for g in groups {
            let w = self
                .experts
                .get(&(layer, g.expert as usize))
                .ok_or_else(|| GpuError::Invalid(format!("expert {} of layer {layer} is not loaded here", g.expert)))?;
            weights.push(w);
        }
        let plan = BatchPlan::new(groups, n)?;
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        let stream = inner.dev.stream.clone();
        let up_ptrs: Vec<u64> = weights.iter().map(|w| ptr(&w.gate_up, &stream)).collect();
        let down_ptrs: Vec<u64> = weights.iter().map(|w| ptr(&w.down, &stream)).collect();
        let out = self.device_batch(inner, &plan, hidden, n, &up_ptrs, &down_ptrs)?;
        let rows = plan.rows().max(1) as f64;
        let seconds = (0..groups.len()).map(|g| out.1 * plan.group_rows(g) as f64 / rows).collect();
        Ok((out.0, seconds))
    }

    /// Steps 1–7 of the module doc; returns the combined rows and the
    /// device seconds of the compute.
    fn device_batch(
        &self,
        inner: &mut Inner,
        plan: &BatchPlan,
        hidden: &[f32],
        n: usize,
        up: &[u64],
        down: &[u64],
    ) -> Result<(Vec<f32>, f64)> {
        let (h, i, r) = (self.hidden, self.inter, plan.rows());
        let stream = inner.dev.stream.clone();
        let ctx = inner.dev.ctx.clone();
        let s = &mut inner.scratch;
        let pin = pinned(&ctx, &mut s.pinned_in, n * h, cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED)?;
        pin.as_mut_slice()?[..n * h].copy_from_slice(hidden);
        let d_hidden = ptr(grow(&stream, &mut s.hidden, n * h)?, &stream);
        let (indices, at) = plan.packed_indices();
        let d_idx = ptr(grow(&stream, &mut s.indices, indices.len())?, &stream);
        let d_w = ptr(grow(&stream, &mut s.weights, r)?, &stream);
        let x = ptr(grow(&stream, &mut s.x, r * h)?, &stream);
        let gu = ptr(grow(&stream, &mut s.gu, r * 2 * i)?, &stream);
        let act = ptr(grow(&stream, &mut s.act, r * i)?, &stream);
        let y = ptr(grow(&stream, &mut s.y, r * h)?, &stream);
        let d_out = ptr(grow(&stream, &mut s.out, n * h)?, &stream);
        let cu = stream.cu_stream();
        // SAFETY: every destination was just sized for its source; the host
        // sources live until the synchronise at the end of this function.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(d_hidden, &pin.as_slice()?[..n * h], cu)?;
            cudarc::driver::result::memcpy_htod_async(d_idx, &indices, cu)?;
            cudarc::driver::result::memcpy_htod_async(d_w, &plan.weights, cu)?;
        }
        let start = ctx.new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = ctx.new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        start.record(&stream)?;
        let k = &inner.kernels;
        let (ni, hi, ii, ri) = (n as i32, h as i32, i as i32, r as i32);
        let (gather_at, offsets_at, pos_at) =
            (d_idx + 4 * at[0] as u64, d_idx + 4 * at[1] as u64, d_idx + 4 * at[2] as u64);
        if r > 0 {
            // SAFETY: arguments match the kernels' signatures; sizes as above.
            unsafe {
                stream
                    .launch_builder(&k.gather)
                    .arg(&d_hidden)
                    .arg(&gather_at)
                    .arg(&x)
                    .arg(&ri)
                    .arg(&hi)
                    .launch(grid(h, r))
            }?;
        }
        let proj = |input, in_f, in_b, output, out_f, weights| Projection {
            plan,
            weights,
            in_features: in_f,
            out_features: out_f,
            input,
            in_bytes: in_b,
            output,
            out_bytes: 4,
        };
        self.gemms(inner, &proj(x, h, 2, gu, 2 * i, up).problems())?;
        let k = &inner.kernels;
        if r > 0 {
            let cfg = LaunchConfig {
                grid_dim: (kernels::blocks(r * i, 4096), 1, 1),
                block_dim: (kernels::BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: as above.
            unsafe { stream.launch_builder(&k.swiglu).arg(&gu).arg(&act).arg(&ri).arg(&ii).launch(cfg) }?;
        }
        self.gemms(inner, &proj(act, i, 2, y, h, down).problems())?;
        let k = &inner.kernels;
        // SAFETY: as above.
        unsafe {
            stream
                .launch_builder(&k.combine)
                .arg(&y)
                .arg(&offsets_at)
                .arg(&pos_at)
                .arg(&d_w)
                .arg(&d_out)
                .arg(&ni)
                .arg(&hi)
                .launch(grid(h, n))
        }?;
        end.record(&stream)?;
        let s = &mut inner.scratch;
        let pout = pinned(&ctx, &mut s.pinned_out, n * h, 0)?;
        // SAFETY: `pout` holds n·h floats; synchronised below before reading.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut pout.as_mut_slice()?[..n * h], d_out, cu) }?;
        stream.synchronize()?;
        let seconds = f64::from(start.elapsed_ms(&end)?) / 1e3;
        Ok((pout.as_slice()?[..n * h].to_vec(), seconds))
    }
}
