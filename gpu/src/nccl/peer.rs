//! The expert node's side of NCCL dispatch: one communicator per router
//! (ranks fixed per router–pool pair, so several routers are several
//! communicators), joined when the router's `NcclInit` arrives and used by
//! that router's framed link for each marked batch: receive the rows from
//! rank 0, compute, send the combined rows back.

use super::comm::{Communicator, NcclLink};
use crate::device::Device;
use crate::error::{GpuError, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One router's communicator on this node.
pub struct PeerLink {
    pub epoch: u64,
    /// Every wait of this communicator's exchanges is bounded by this (the
    /// router's dispatch timeout, sent in its init call).
    pub deadline: Duration,
    link: NcclLink,
}

impl PeerLink {
    /// Receives `rows` rows of `width` floats from the router (rank 0).
    pub fn receive(&mut self, rows: usize, width: usize) -> Result<Vec<f32>> {
        let mut got = self.link.exchange(&[], &[rows], width, self.deadline)?;
        Ok(got.pop().unwrap_or_default())
    }

    /// Sends `values` (whole rows of `width`) back to the router.
    pub fn send(&mut self, values: Vec<f32>, width: usize) -> Result<()> {
        self.link.exchange(&[values], &[0], width, self.deadline).map(drop)
    }
}

/// The communicators of every router this node serves over NCCL.
pub struct PeerComms {
    device: Device,
    links: Mutex<HashMap<String, Arc<Mutex<PeerLink>>>>,
}

impl PeerComms {
    /// NCCL on `cuda:ordinal` (streams of its own beside the expert bank's).
    pub fn open(ordinal: usize) -> Result<Self> {
        crate::libs::require(&[crate::libs::Lib::Nccl])?;
        Ok(PeerComms { device: Device::open(ordinal)?, links: Mutex::new(HashMap::new()) })
    }

    pub fn device(&self) -> &str {
        &self.device.name
    }

    /// Joins `router`'s communicator of `epoch` as `rank` of `world`
    /// (blocking until every rank has joined or `deadline`); replaces, and
    /// so aborts, that router's older one.
    pub fn join(
        &self,
        router: &str,
        epoch: u64,
        rank: usize,
        world: usize,
        id: &[u8],
        deadline: Duration,
    ) -> Result<()> {
        if rank == 0 {
            return Err(GpuError::Nccl("rank 0 is the router's".into()));
        }
        let id = super::id_from_bytes(id)?;
        // A stream of its own: kernels of an older communicator stuck on a
        // dead peer (until its deadline aborts it) must not hold this one up.
        let comm = Communicator::init(self.device.ctx.new_stream()?, rank, world, &id, deadline)?;
        let link = PeerLink { epoch, deadline, link: NcclLink::new(comm) };
        let old = self.lock().insert(router.to_string(), Arc::new(Mutex::new(link)));
        if let Some(old) = old {
            tracing::info!(router, epoch, "NCCL communicator replaced");
            drop(old);
        }
        Ok(())
    }

    /// `router`'s communicator, if it is of `epoch`.
    pub fn link(&self, router: &str, epoch: u64) -> Result<Arc<Mutex<PeerLink>>> {
        let l = self.lock().get(router).cloned();
        match l {
            Some(l) if l.lock().unwrap_or_else(|e| e.into_inner()).epoch == epoch => Ok(l),
            _ => Err(GpuError::Nccl(format!("no NCCL communicator of epoch {epoch} from router {router:?}"))),
        }
    }

    /// Drops `router`'s communicator of `epoch` (aborted after a failed
    /// exchange; the router rebuilds).
    pub fn forget(&self, router: &str, epoch: u64) {
        let mut links = self.lock();
        if links.get(router).is_some_and(|l| l.lock().unwrap_or_else(|e| e.into_inner()).epoch == epoch) {
            links.remove(router);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Mutex<PeerLink>>>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }
}
