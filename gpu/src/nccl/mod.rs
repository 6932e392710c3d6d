//! NCCL for expert dispatch: token rows moved GPU to GPU.
//!
//! - [`schedule`]: which rows go to and come from each peer in one layer's
//!   exchange, and where they sit in the send and receive buffers (NCCL has
//!   no variable-count all-to-all: one `ncclSend`/`ncclRecv` per peer inside
//!   one group).
//! - [`fault`]: the state machine that keeps every wait bounded: a deadline
//!   or a dead peer aborts the communicator, the layer falls back to the
//!   TCP/gRPC transport, and a new communicator without the dead node is
//!   built in the background (with backoff), driven by an injectable clock.
//! - [`comm`]: the communicator itself over cudarc's raw NCCL bindings,
//!   created non-blocking so that its setup has a deadline too, and
//!   [`comm::NcclLink`], which stages host rows through device buffers.
//! - [`peer`]: the expert node's communicators, one per router.

pub mod comm;
pub mod fault;
pub mod peer;
pub mod schedule;

/// The id a router creates and sends to its nodes out of band (in the
/// control link's init call), as bytes.
pub fn id_bytes(id: &cudarc::nccl::Id) -> Vec<u8> {
    id.internal().iter().map(|&c| c as u8).collect()
}

/// An id received from a router; refuses anything but NCCL's 128 bytes.
pub fn id_from_bytes(bytes: &[u8]) -> crate::Result<cudarc::nccl::Id> {
    let raw: [u8; 128] =
        bytes.try_into().map_err(|_| crate::GpuError::Nccl(format!("an NCCL id is 128 bytes, got {}", bytes.len())))?;
    Ok(cudarc::nccl::Id::uninit(raw.map(|b| b as std::ffi::c_char)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_refuse_other_lengths() {
        let raw: [std::ffi::c_char; 128] = std::array::from_fn(|i| (i as u8).wrapping_mul(7) as std::ffi::c_char);
        let id = cudarc::nccl::Id::uninit(raw);
        let b = id_bytes(&id);
        assert_eq!(b.len(), 128);
        assert_eq!(id_from_bytes(&b).unwrap().internal(), &raw);
        assert!(id_from_bytes(&b[..100]).is_err());
    }
}
