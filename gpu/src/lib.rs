//! ExpertMesh's CUDA backend: everything that touches a GPU lives here.
//!
//! - [`libs`]: which CUDA libraries this machine has, checked before any
//!   cudarc call (cudarc loads them at run time and panics on a missing one).
//! - [`device`]: `--device cpu|cuda:N`, the context, stream and cuBLAS handle.
//! - [`kernels`]: CUDA C sources compiled once per process with NVRTC.
//! - [`plan`]: the host-side layout of one dispatch batch (gather order,
//!   expert offsets, combine lists, grouped-GEMM arrays), unit-tested
//!   without a GPU.
//! - [`bank`]: [`CudaExperts`], the [`ExpertBank`](expertmesh_model::moe::ExpertBank)
//!   whose weights sit in device memory as bf16.
//! - [`nccl`]: the communicator, per-peer send/recv schedules and the fault
//!   state machine that keeps every wait bounded.
//!
//! The crate builds and is linted on machines without CUDA; only running
//! its device paths needs a GPU.

pub mod bank;
pub mod buffers;
pub mod device;
#[cfg(test)]
mod emulated;
pub mod error;
pub mod kernels;
pub mod libs;
pub mod nccl;
pub mod plan;

pub use bank::CudaExperts;
pub use device::{Device, DeviceSpec};
pub use error::{GpuError, Result};
