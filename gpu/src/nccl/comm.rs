//! The NCCL communicator over cudarc's raw bindings, with every wait
//! bounded.
//!
//! cudarc's safe `Comm` initialises in blocking mode (a rank that never
//! arrives blocks `ncclCommInitRank` forever) and panics if an abort fails
//! on drop, so this wraps the C API directly: the communicator is created
//! non-blocking (`blocking = 0`) and polled with `ncclCommGetAsyncError`
//! up to a deadline; a send/recv group is followed by a CUDA event polled
//! up to a deadline; past either, the communicator is aborted
//! (`ncclCommAbort`, which also releases kernels stuck on a dead peer) and
//! the caller falls back (see [`super::fault`]).

use super::schedule::{Op, Schedule};
use crate::buffers::{grow, pinned, ptr};
use crate::error::{GpuError, Result};
use crate::libs::{self, Lib};
use cudarc::driver::{CudaSlice, CudaStream, PinnedHostSlice};
use cudarc::nccl::sys;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `NCCL_CONFIG_UNDEF_INT`: leave the setting to NCCL.
const UNDEF: i32 = i32::MIN;

/// A communicator of one rank.
pub struct Communicator {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    aborted: bool,
}

// SAFETY: an NCCL communicator may be used from any thread, one at a time;
// `&mut self` on every operation keeps it to one.
unsafe impl Send for Communicator {}

/// The non-blocking config: everything else as NCCL decides.
fn config(runtime_version: i32) -> sys::ncclConfig_t {
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        // The layout these bindings declare (2.28), or the runtime's when it
        // is older: NCCL reads only the fields of the version it is told.
        version: runtime_version.clamp(21_700, 22_800) as u32,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

/// A new unique id (rank 0 creates it and sends it to the others).
pub fn new_id() -> Result<cudarc::nccl::Id> {
    libs::require(&[Lib::Nccl])?;
    Ok(cudarc::nccl::Id::new()?)
}

impl Communicator {
    /// Joins the communicator `id` as `rank` of `world`, waiting at most
    /// `deadline` for every rank to arrive.
    pub fn init(
        stream: Arc<CudaStream>,
        rank: usize,
        world: usize,
        id: &cudarc::nccl::Id,
        deadline: Duration,
    ) -> Result<Self> {
        libs::require(&[Lib::Nccl])?;
        if rank >= world {
            return Err(GpuError::Nccl(format!("rank {rank} of a world of {world}")));
        }
        let version = cudarc::nccl::result::get_nccl_version()?;
        let mut cfg = config(version);
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        stream.context().bind_to_thread()?;
        let raw = sys::ncclUniqueId { internal: *id.internal() };
        // SAFETY: out-pointer and config live across the call; NCCL copies both.
        unsafe { cudarc::nccl::result::comm_init_rank_config(&mut comm, world as i32, raw, rank as i32, &mut cfg) }?;
        let mut c = Communicator { comm, stream, rank, world, aborted: false };
        c.settle("communicator init", Instant::now() + deadline)?;
        Ok(c)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Polls the communicator until its last operation is no longer in
    /// progress; aborts it on an error or at `deadline`.
    fn settle(&mut self, what: &str, deadline: Instant) -> Result<()> {
        let start = Instant::now();
        loop {
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator and an out-pointer.
            let polled = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) }.result();
            match (polled, state) {
                (Err(e), _) => return Err(self.fail(format!("{what}: {:?}", e.0))),
                (Ok(_), sys::ncclResult_t::ncclSuccess) => return Ok(()),
                (Ok(_), sys::ncclResult_t::ncclInProgress) => {}
                (Ok(_), other) => return Err(self.fail(format!("{what}: {other:?}"))),
            }
            if Instant::now() >= deadline {
                self.abort(what);
                return Err(GpuError::Deadline { what: what.into(), seconds: start.elapsed().as_secs_f64() });
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    fn fail(&mut self, message: String) -> GpuError {
        self.abort(&message);
        GpuError::Aborted(message)
    }

    /// Aborts the communicator (idempotent). Pending operations end with an
    /// error; nothing waits on it again.
    pub fn abort(&mut self, reason: &str) {
        if self.aborted {
            return;
        }
        self.aborted = true;
        tracing::warn!(rank = self.rank, world = self.world, reason, "aborting the NCCL communicator");
        // SAFETY: a communicator not yet aborted or destroyed.
        if let Err(e) = unsafe { cudarc::nccl::result::comm_abort(self.comm) } {
            tracing::error!(error = ?e.0, "ncclCommAbort failed");
        }
    }

    pub fn is_aborted(&self) -> bool {
        self.aborted
    }

    /// Posts `sched` as one group on the communicator's stream, from `send`
    /// into `recv` (device addresses of f32 buffers), and waits at most
    /// `deadline` for it to complete on the device.
    pub fn exchange(&mut self, sched: &Schedule, send: u64, recv: u64, deadline: Duration) -> Result<()> {
        if self.aborted {
            return Err(GpuError::Aborted("the communicator was aborted".into()));
        }
        let end = Instant::now() + deadline;
        let cu = self.stream.cu_stream() as sys::cudaStream_t;
        cudarc::nccl::result::group_start()?;
        let mut posted = Ok(());
        for op in &sched.ops {
            // SAFETY: offsets within the buffers the schedule sized.
            let r = unsafe {
                match *op {
                    Op::Send { peer, offset, len } => cudarc::nccl::result::send(
                        (send + 4 * offset as u64) as *const _,
                        len,
                        sys::ncclDataType_t::ncclFloat32,
                        peer as i32,
                        self.comm,
                        cu,
                    ),
                    Op::Recv { peer, offset, len } => cudarc::nccl::result::recv(
                        (recv + 4 * offset as u64) as *mut _,
                        len,
                        sys::ncclDataType_t::ncclFloat32,
                        peer as i32,
                        self.comm,
                        cu,
                    ),
                }
            };
            if let Err(e) = r {
                posted = Err(e);
                break;
            }
        }
        // The group is always closed, even after a failed post.
        let closed = cudarc::nccl::result::group_end();
        if let Err(e) = posted.and(closed) {
            return Err(self.fail(format!("posting the exchange: {:?}", e.0)));
        }
        self.settle("posting the exchange", end)?;
        let done = self.stream.context().new_event(None)?;
        done.record(&self.stream)?;
        let start = Instant::now();
        while !done.try_is_complete()? {
            if Instant::now() >= end {
                self.abort("exchange deadline");
                return Err(GpuError::Deadline {
                    what: "NCCL exchange".into(),
                    seconds: start.elapsed().as_secs_f64(),
                });
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        Ok(())
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        // Abort rather than finalize: finalize waits on peers, and a drop
        // must not hang on a dead one.
        self.abort("dropped");
    }
}

/// A communicator plus the host and device buffers of the router side's
/// exchanges, reused across layers: rows are staged host → device through
/// pinned memory, exchanged, and staged back.
pub struct NcclLink {
    pub comm: Communicator,
    pinned_send: Option<PinnedHostSlice<f32>>,
    pinned_recv: Option<PinnedHostSlice<f32>>,
    send: Option<CudaSlice<f32>>,
    recv: Option<CudaSlice<f32>>,
}

impl NcclLink {
    pub fn new(comm: Communicator) -> Self {
        NcclLink { comm, pinned_send: None, pinned_recv: None, send: None, recv: None }
    }

    /// Sends `sends[p]` (rows of `width` floats) to rank `p` and receives
    /// `recv_rows[p]` rows from each, within `deadline`.
    pub fn exchange(
        &mut self,
        sends: &[Vec<f32>],
        recv_rows: &[usize],
        width: usize,
        deadline: Duration,
    ) -> Result<Vec<Vec<f32>>> {
        if let Some(bad) = sends.iter().position(|s| !s.len().is_multiple_of(width.max(1))) {
            return Err(GpuError::Invalid(format!("rows for rank {bad} are not whole rows of {width}")));
        }
        let send_rows: Vec<usize> = sends.iter().map(|s| s.len() / width.max(1)).collect();
        let sched = Schedule::new(&send_rows, recv_rows, width);
        let stream = self.comm.stream.clone();
        let ctx = stream.context().clone();
        let ps =
            pinned(&ctx, &mut self.pinned_send, sched.send_len, cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED)?;
        let mut at = 0;
        for s in sends {
            ps.as_mut_slice()?[at..at + s.len()].copy_from_slice(s);
            at += s.len();
        }
        let d_send = ptr(grow(&stream, &mut self.send, sched.send_len)?, &stream);
        let d_recv = ptr(grow(&stream, &mut self.recv, sched.recv_len)?, &stream);
        // One direction is empty on an expert node (it receives, computes,
        // then sends): no zero-length copies.
        if sched.send_len > 0 {
            // SAFETY: sized by the schedule; synchronised before the host reads.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(d_send, &ps.as_slice()?[..sched.send_len], stream.cu_stream())
            }?;
        }
        self.comm.exchange(&sched, d_send, d_recv, deadline)?;
        let pr = pinned(&ctx, &mut self.pinned_recv, sched.recv_len, 0)?;
        if sched.recv_len > 0 {
            // SAFETY: as above.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(
                    &mut pr.as_mut_slice()?[..sched.recv_len],
                    d_recv,
                    stream.cu_stream(),
                )
            }?;
        }
        stream.synchronize()?;
        let host = pr.as_slice()?;
        Ok((0..recv_rows.len())
            .map(|p| sched.received_from(p).map(|(o, l)| host[o..o + l].to_vec()).unwrap_or_default())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_non_blocking_and_leaves_the_rest_to_nccl() {
        let c = config(22_703);
        assert_eq!((c.magic, c.version, c.blocking), (0xcafe_beef, 22_703, 0));
        assert_eq!(c.size, std::mem::size_of::<sys::ncclConfig_t>());
        assert_eq!((c.minCTAs, c.maxP2pPeers), (UNDEF, UNDEF));
        assert_eq!(config(23_000).version, 22_800, "never claims a layout newer than the bindings");
    }

    #[test]
    fn without_nccl_ids_are_refused_with_the_link_hint() {
        if Lib::Nccl.present() {
            return;
        }
        let e = new_id().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("libnccl.so -> libnccl.so.2"), "{e}");
    }
}
