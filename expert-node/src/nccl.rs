//! The node's side of `router --transport nccl`: `NcclInit` joins a
//! router's communicator, and a framed-TCP batch marked `nccl` has its rows
//! received from the router's rank, computed, and the combined rows sent
//! back, the header answering with the count only.
//!
//! NCCL is opened on first use (a GPU node serving only TCP or gRPC does not
//! need `libnccl`); a CPU node refuses `NcclInit`, naming `--device`.

use crate::metrics::NodeMetrics;
use crate::service::process;
use expertmesh_dataplane::{DataPlaneError, codec};
use expertmesh_gpu::DeviceSpec;
use expertmesh_gpu::nccl::peer::PeerComms;
use expertmesh_model::config::ModelConfig;
use expertmesh_model::moe::ExpertBank;
use expertmesh_proto::v1::{DispatchRequest, DispatchResponse, Dtype, NcclInitRequest, NcclInitResponse, NcclMarker};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// This node's NCCL communicators, one per router, opened on first use.
pub struct NcclSide {
    device: DeviceSpec,
    comms: Mutex<Option<Arc<PeerComms>>>,
}

fn nccl_err(e: expertmesh_gpu::GpuError) -> DataPlaneError {
    DataPlaneError::Transport { node: "nccl".into(), message: e.to_string() }
}

impl NcclSide {
    pub fn new(device: DeviceSpec) -> Self {
        NcclSide { device, comms: Mutex::new(None) }
    }

    fn comms(&self) -> Result<Arc<PeerComms>, DataPlaneError> {
        let DeviceSpec::Cuda(n) = self.device else {
            return Err(DataPlaneError::Invalid(
                "this node computes on the CPU (--device cpu): NCCL dispatch needs --device cuda:N".into(),
            ));
        };
        let mut c = self.comms.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = &*c {
            return Ok(c.clone());
        }
        let opened = Arc::new(PeerComms::open(n).map_err(nccl_err)?);
        *c = Some(opened.clone());
        Ok(opened)
    }

    /// `NcclInit`: blocks until every rank has joined or the request's
    /// timeout (run it off the async runtime).
    pub fn init(&self, r: &NcclInitRequest) -> Result<NcclInitResponse, DataPlaneError> {
        let bad = |m: &str| Err(DataPlaneError::Invalid(m.to_string()));
        if r.router_id.is_empty() {
            return bad("router_id is empty");
        }
        if r.rank == 0 || r.rank >= r.world_size {
            return bad(&format!("rank {} of a world of {}: rank 0 is the router's", r.rank, r.world_size));
        }
        if !(r.timeout_seconds.is_finite() && r.timeout_seconds > 0.0 && r.timeout_seconds <= 3600.0) {
            return bad(&format!("timeout_seconds {} is not in (0, 3600]", r.timeout_seconds));
        }
        let comms = self.comms()?;
        let deadline = Duration::from_secs_f64(r.timeout_seconds);
        comms
            .join(&r.router_id, r.epoch, r.rank as usize, r.world_size as usize, &r.unique_id, deadline)
            .map_err(nccl_err)?;
        tracing::info!(router = %r.router_id, epoch = r.epoch, rank = r.rank, world = r.world_size, "joined an NCCL communicator");
        Ok(NcclInitResponse { device: comms.device().to_string() })
    }

    /// One marked batch. Once the rows are received, the node always sends
    /// a combined buffer back (zeros when it refuses the batch), so the
    /// router's group completes and the refusal reaches it as this batch's
    /// answer rather than as a communicator fault.
    pub fn serve(
        &self,
        marker: &NcclMarker,
        experts: &RwLock<Box<dyn ExpertBank>>,
        cfg: &ModelConfig,
        metrics: &NodeMetrics,
        mut req: DispatchRequest,
    ) -> Result<DispatchResponse, DataPlaneError> {
        let h = cfg.hidden_size;
        let n = req.rows.as_ref().map_or(0, |r| r.num_rows as usize);
        if n.saturating_mul(h).saturating_mul(4) > expertmesh_proto::MAX_MESSAGE_BYTES {
            return Err(DataPlaneError::Invalid(format!("{n} rows exceed a dispatch batch's limit")));
        }
        let link = self.comms()?.link(&marker.router_id, marker.epoch).map_err(nccl_err)?;
        let mut link = link.lock().unwrap_or_else(|e| e.into_inner());
        let forget = |e: expertmesh_gpu::GpuError| {
            if let Ok(c) = self.comms() {
                c.forget(&marker.router_id, marker.epoch);
            }
            nccl_err(e)
        };
        let rows = link.receive(n, h).map_err(forget)?;
        if let Some(r) = req.rows.as_mut() {
            r.dtype = Dtype::F32 as i32;
        }
        let result = process(experts, cfg, metrics, req, rows);
        let back = match &result {
            Ok(resp) => match resp.combined.as_ref().map(|c| codec::decode(c, h)) {
                Some(Ok(v)) => v,
                _ => vec![0.0; n * h],
            },
            Err(_) => vec![0.0; n * h],
        };
        link.send(back, h).map_err(forget)?;
        let mut resp = result?;
        if let Some(c) = resp.combined.as_mut() {
            c.data = Default::default();
        }
        Ok(resp)
    }
}
