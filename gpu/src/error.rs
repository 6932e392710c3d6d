//! The crate's one error type.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum GpuError {
    /// A CUDA library this operation needs is not on the library path.
    #[error("{0}")]
    Missing(String),
    #[error("bad device {spec:?}: {message}")]
    BadDevice { spec: String, message: String },
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("cuBLAS: {0}")]
    Blas(String),
    #[error("NVRTC compiling {kernel} for {arch}: {log}")]
    Compile { kernel: String, arch: String, log: String },
    #[error("NCCL: {0}")]
    Nccl(String),
    /// A bounded wait ran out (NCCL init, a send/recv group).
    #[error("{what} did not finish within {seconds:.3} s")]
    Deadline { what: String, seconds: f64 },
    /// The communicator was aborted (deadline, dead peer) and must be rebuilt.
    #[error("communicator aborted: {0}")]
    Aborted(String),
    /// The batch does not fit what the bank holds.
    #[error("{0}")]
    Invalid(String),
    #[error("device out of memory: {0}")]
    OutOfMemory(String),
}

pub type Result<T> = std::result::Result<T, GpuError>;

impl From<cudarc::driver::DriverError> for GpuError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            return GpuError::OutOfMemory(format!("{e:?}"));
        }
        GpuError::Driver(format!("{e:?}"))
    }
}

impl From<cudarc::cublas::result::CublasError> for GpuError {
    fn from(e: cudarc::cublas::result::CublasError) -> Self {
        GpuError::Blas(format!("{e:?}"))
    }
}

impl From<cudarc::nccl::result::NcclError> for GpuError {
    fn from(e: cudarc::nccl::result::NcclError) -> Self {
        GpuError::Nccl(format!("{:?}", e.0))
    }
}

impl From<GpuError> for expertmesh_model::ModelError {
    fn from(e: GpuError) -> Self {
        expertmesh_model::ModelError::Executor(e.to_string())
    }
}
