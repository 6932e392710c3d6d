//! `--device cpu|cuda:N` and an opened CUDA device: its context, one
//! stream and one cuBLAS handle bound to that stream.

use crate::error::{GpuError, Result};
use crate::libs::{self, Lib};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaStream};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Where a node computes its experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                _ => Err(format!("{other:?}: expected cpu or cuda:N")),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// An opened CUDA device.
pub struct Device {
    pub ordinal: usize,
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    /// `cuda:N (NVIDIA H200, sm_90)`.
    pub name: String,
    /// `(major, minor)` compute capability.
    pub capability: (i32, i32),
}

impl Device {
    /// Opens `cuda:ordinal`, checking first that the driver, cuBLAS and
    /// NVRTC can be loaded and that the device exists, so that a machine
    /// without a GPU gets an error naming what is missing instead of a
    /// panic inside cudarc.
    pub fn open(ordinal: usize) -> Result<Device> {
        libs::require(&[Lib::Driver, Lib::Cublas, Lib::Nvrtc])?;
        let spec = format!("cuda:{ordinal}");
        cudarc::driver::result::init()?;
        let count = CudaContext::device_count()?;
        if ordinal >= count.max(0) as usize {
            return Err(GpuError::BadDevice { spec, message: format!("this machine has {count} CUDA device(s)") });
        }
        let ctx = CudaContext::new(ordinal)?;
        // Every user of a device works on its one stream and synchronises
        // it before host memory is reused, and passes raw addresses to
        // cuBLAS and NCCL: cudarc's per-buffer event tracking would only add
        // work (and would not see those raw uses anyway).
        // SAFETY: no buffer exists yet on this context.
        unsafe { ctx.disable_event_tracking() };
        let capability = ctx.compute_capability()?;
        let stream = ctx.new_stream()?;
        let blas = CudaBlas::new(stream.clone())?;
        let name = format!("{spec} ({}, sm_{}{})", ctx.name()?, capability.0, capability.1);
        Ok(Device { ordinal, ctx, stream, blas, name, capability })
    }

    /// Free and total device memory, in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        Ok(self.ctx.mem_get_info()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_specs() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:-1", "cuda:x", ""] {
            assert!(bad.parse::<DeviceSpec>().is_err(), "{bad}");
        }
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn opening_a_device_without_cuda_is_an_error_not_a_panic() {
        if libs::require(&[Lib::Driver, Lib::Cublas, Lib::Nvrtc]).is_ok() {
            return; // a CUDA machine: the GPU check script covers it.
        }
        let e = Device::open(0).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("not found"), "{e}");
    }
}
