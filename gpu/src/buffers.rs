//! Buffers reused across calls: device and pinned host memory that grow to
//! the largest request seen, shared by the expert bank and the NCCL link.

use crate::error::Result;
use cudarc::driver::{CudaSlice, DevicePtr, PinnedHostSlice};

/// The device address of a buffer (event tracking is off: no sync object).
pub fn ptr<T>(s: &CudaSlice<T>, stream: &cudarc::driver::CudaStream) -> u64 {
    s.device_ptr(stream).0
}

/// `slot`, reallocated to at least `len` elements when smaller.
pub fn grow<'a, T: cudarc::driver::DeviceRepr>(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    slot: &'a mut Option<CudaSlice<T>>,
    len: usize,
) -> Result<&'a CudaSlice<T>> {
    // Free a small one first: the old and new buffer need not coexist.
    slot.take_if(|s| s.len() < len);
    match slot {
        Some(s) => Ok(s),
        // SAFETY: every buffer is written by a copy or kernel before it is read.
        None => Ok(slot.insert(unsafe { stream.alloc::<T>(len.max(1)) }?)),
    }
}

/// A pinned host buffer of at least `len` floats.
pub fn pinned<'a>(
    ctx: &std::sync::Arc<cudarc::driver::CudaContext>,
    slot: &'a mut Option<PinnedHostSlice<f32>>,
    len: usize,
    flags: u32,
) -> Result<&'a mut PinnedHostSlice<f32>> {
    slot.take_if(|s| s.len() < len);
    match slot {
        Some(s) => Ok(s),
        // SAFETY: written before it is read (a host copy or a D2H copy).
        None => Ok(slot.insert(unsafe { ctx.alloc_pinned_with_flags::<f32>(len.max(1), flags) }?)),
    }
}
