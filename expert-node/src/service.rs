//! The `ExpertService` implementation.

use crate::metrics::NodeMetrics;
use expertmesh_dataplane::{DataPlaneError, codec};
use expertmesh_model::config::ModelConfig;
use expertmesh_model::model::load_expert;
use expertmesh_model::moe::{ExpertBank, ExpertGroup, Mlp};
use expertmesh_model::weights::WeightStore;
use expertmesh_proto::v1::expert_service_server::ExpertService;
use expertmesh_proto::v1::{
    DispatchRequest, DispatchResponse, Dtype, ExpertSet, InfoRequest, InfoResponse, LayerExperts, LoadExpertsResponse,
    NcclInitRequest, NcclInitResponse,
};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

pub struct NodeService {
    pub node_id: String,
    pub model_name: String,
    pub cfg: Arc<ModelConfig>,
    pub store: Arc<WeightStore>,
    pub experts: Arc<RwLock<Box<dyn ExpertBank>>>,
    /// 0 = unlimited.
    pub capacity_bytes: u64,
    pub weight_dtype: String,
    pub shutdown: CancellationToken,
    pub metrics: Arc<NodeMetrics>,
    pub nccl: Arc<crate::nccl::NcclSide>,
}

fn poisoned<T>(_: T) -> Status {
    Status::internal("expert table lock poisoned")
}

/// A gRPC batch: its rows decoded from the message, then [`process`].
fn process_message(
    experts: &RwLock<Box<dyn ExpertBank>>,
    cfg: &ModelConfig,
    metrics: &NodeMetrics,
    req: DispatchRequest,
) -> Result<DispatchResponse, DataPlaneError> {
    let packed = req.rows.as_ref().ok_or_else(|| DataPlaneError::Invalid("missing rows".into()))?;
    let rows = codec::decode(packed, cfg.hidden_size)?;
    process(experts, cfg, metrics, req, rows)
}

/// Validates one batch (whose rows are already decoded) and computes it;
/// every malformed field is an `Invalid` error naming it, so the sender
/// gets `INVALID_ARGUMENT`.
pub(crate) fn process(
    experts: &RwLock<Box<dyn ExpertBank>>,
    cfg: &ModelConfig,
    metrics: &NodeMetrics,
    req: DispatchRequest,
    rows: Vec<f32>,
) -> Result<DispatchResponse, DataPlaneError> {
    metrics.batches_in_flight.inc();
    let r = compute(experts, cfg, metrics, req, rows);
    metrics.batches_in_flight.dec();
    r
}

fn compute(
    experts: &RwLock<Box<dyn ExpertBank>>,
    cfg: &ModelConfig,
    metrics: &NodeMetrics,
    req: DispatchRequest,
    rows: Vec<f32>,
) -> Result<DispatchResponse, DataPlaneError> {
    let h = cfg.hidden_size;
    let layer = req.layer as usize;
    if !cfg.moe_layers().any(|l| l == layer) {
        return Err(DataPlaneError::Invalid(format!("layer {layer} is not a MoE layer")));
    }
    let packed = req.rows.ok_or_else(|| DataPlaneError::Invalid("missing rows".into()))?;
    let dtype = Dtype::try_from(packed.dtype).unwrap_or(Dtype::F32);
    let n = packed.num_rows as usize;
    if rows.len() != n * h {
        return Err(DataPlaneError::Invalid(format!("{} values for {n} rows of {h}", rows.len())));
    }
    let table = experts.read().map_err(|_| DataPlaneError::Compute("expert table lock poisoned".into()))?;
    let mut groups = Vec::with_capacity(req.experts.len());
    for e in req.experts {
        if !table.has(layer, e.expert as usize) {
            return Err(DataPlaneError::Invalid(format!(
                "expert {} of layer {layer} is not loaded on this node",
                e.expert
            )));
        }
        if e.rows.len() != e.weights.len() {
            return Err(DataPlaneError::Invalid(format!(
                "expert {}: {} rows but {} weights",
                e.expert,
                e.rows.len(),
                e.weights.len()
            )));
        }
        if let Some(r) = e.rows.iter().find(|&&r| r as usize >= n) {
            return Err(DataPlaneError::Invalid(format!("expert {}: row {r} out of {n}", e.expert)));
        }
        if let Some(w) = e.weights.iter().find(|w| !w.is_finite()) {
            return Err(DataPlaneError::Invalid(format!("expert {}: non-finite weight {w}", e.expert)));
        }
        groups.push(ExpertGroup {
            expert: e.expert,
            rows: e.rows.iter().map(|&r| r as usize).collect(),
            weights: e.weights,
        });
    }
    let t0 = Instant::now();
    let (combined, seconds) =
        table.compute_timed(layer, &rows, h, &groups).map_err(|e| DataPlaneError::Compute(e.to_string()))?;
    let l = layer.to_string();
    for (g, s) in groups.iter().zip(seconds) {
        let e = expertmesh_dataplane::metrics::expert_label(metrics.per_expert, g.expert);
        metrics.expert_tokens.with_label_values(&[&l, &e]).inc_by(g.rows.len() as u64);
        metrics.compute_seconds.with_label_values(&[&l, &e]).inc_by(s);
    }
    metrics.batch_tokens.observe(n as f64);
    Ok(DispatchResponse {
        step: req.step,
        layer: req.layer,
        combined: Some(codec::encode(combined, h, codec::combine_dtype(dtype))),
        compute_seconds: t0.elapsed().as_secs_f64(),
    })
}

fn to_layer_experts(pairs: &[(usize, usize)]) -> Vec<LayerExperts> {
    let mut by: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
    for &(l, e) in pairs {
        by.entry(l).or_default().push(e as u32);
    }
    by.into_iter().map(|(l, experts)| LayerExperts { layer: l as u32, experts }).collect()
}

impl NodeService {
    fn check_set(&self, set: &ExpertSet) -> Result<Vec<(usize, usize)>, Status> {
        let mut out = Vec::new();
        for le in &set.experts {
            let l = le.layer as usize;
            if !self.cfg.moe_layers().any(|m| m == l) {
                return Err(Status::invalid_argument(format!("layer {l} is not a MoE layer")));
            }
            for &e in &le.experts {
                if e as usize >= self.cfg.moe.n_routed_experts {
                    return Err(Status::invalid_argument(format!("layer {l}: expert {e} out of range")));
                }
                out.push((l, e as usize));
            }
        }
        Ok(out)
    }

    fn loaded_response(&self) -> Result<LoadExpertsResponse, Status> {
        let t = self.experts.read().map_err(poisoned)?;
        self.metrics.experts_loaded.set(t.loaded().len() as i64);
        Ok(LoadExpertsResponse { loaded: to_layer_experts(&t.loaded()), used_bytes: t.size_bytes() as u64 })
    }
}

#[tonic::async_trait]
impl ExpertService for NodeService {
    type DispatchStream = ReceiverStream<Result<DispatchResponse, Status>>;

    async fn dispatch(
        &self,
        request: Request<Streaming<DispatchRequest>>,
    ) -> Result<Response<Self::DispatchStream>, Status> {
        if self.shutdown.is_cancelled() {
            return Err(Status::unavailable("node is draining"));
        }
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let (experts, cfg, shutdown, metrics) =
            (self.experts.clone(), self.cfg.clone(), self.shutdown.clone(), self.metrics.clone());
        tokio::spawn(async move {
            loop {
                // Draining: finish the batch in hand, take no new one.
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    m = inbound.message() => m,
                };
                let req = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(s) => {
                        tracing::debug!(status = %s, "dispatch stream ended by the peer");
                        break;
                    }
                };
                let (experts, cfg, metrics) = (experts.clone(), cfg.clone(), metrics.clone());
                let (step, layer, trace_id) = (req.step, req.layer, req.trace_id.clone());
                // Expert compute is heavy: off the async runtime.
                let span = tracing::info_span!("dispatch", %trace_id, step, layer);
                let work = move || span.in_scope(|| process_message(&experts, &cfg, &metrics, req));
                let item = match tokio::task::spawn_blocking(work).await {
                    Ok(Ok(resp)) => {
                        let seconds = resp.compute_seconds;
                        tracing::debug!(%trace_id, step, layer, seconds, "dispatch batch computed");
                        Ok(resp)
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(%trace_id, step, layer, error = %e, "refused dispatch batch");
                        Err(Status::from(e))
                    }
                    Err(e) => Err(Status::internal(format!("expert computation failed: {e}"))),
                };
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        let t = self.experts.read().map_err(poisoned)?;
        Ok(Response::new(InfoResponse {
            node_id: self.node_id.clone(),
            experts: to_layer_experts(&t.loaded()),
            weight_dtype: self.weight_dtype.clone(),
            device: t.device(),
            capacity_bytes: self.capacity_bytes,
            used_bytes: t.size_bytes() as u64,
            hidden_size: self.cfg.hidden_size as u32,
            model: self.model_name.clone(),
        }))
    }

    async fn load_experts(&self, request: Request<ExpertSet>) -> Result<Response<LoadExpertsResponse>, Status> {
        let want = self.check_set(request.get_ref())?;
        let (cfg, store) = (self.cfg.clone(), self.store.clone());
        let (experts, capacity) = (self.experts.clone(), self.capacity_bytes);
        // Reading from disk, and on a GPU node the upload: off the runtime.
        tokio::task::spawn_blocking(move || -> Result<(), Status> {
            let loaded = want
                .into_iter()
                .map(|(l, e)| {
                    load_expert(&cfg, &store, l, e)
                        .map(|m| ((l, e), m))
                        .map_err(|e| Status::failed_precondition(e.to_string()))
                })
                .collect::<Result<Vec<((usize, usize), Mlp)>, Status>>()?;
            let mut t = experts.write().map_err(poisoned)?;
            let extra: usize = loaded.iter().map(|(_, m)| t.bytes_for(m)).sum();
            if capacity > 0 && (t.size_bytes() + extra) as u64 > capacity {
                return Err(Status::resource_exhausted(format!(
                    "loading {extra} bytes would exceed the capacity of {capacity} bytes"
                )));
            }
            for ((l, e), m) in loaded {
                t.insert(l, e, m).map_err(|e| Status::resource_exhausted(e.to_string()))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(self.loaded_response()?))
    }

    async fn nccl_init(&self, request: Request<NcclInitRequest>) -> Result<Response<NcclInitResponse>, Status> {
        if self.shutdown.is_cancelled() {
            return Err(Status::unavailable("node is draining"));
        }
        let nccl = self.nccl.clone();
        // Blocks until every rank has joined (bounded by the request's timeout).
        let joined = tokio::task::spawn_blocking(move || nccl.init(request.get_ref()))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        joined.map(Response::new).map_err(|e| match e {
            DataPlaneError::Invalid(m) => Status::failed_precondition(m),
            e => Status::from(e),
        })
    }

    async fn unload_experts(&self, request: Request<ExpertSet>) -> Result<Response<LoadExpertsResponse>, Status> {
        let drop = self.check_set(request.get_ref())?;
        {
            let mut t = self.experts.write().map_err(poisoned)?;
            for (l, e) in drop {
                t.remove(l, e);
            }
        }
        Ok(Response::new(self.loaded_response()?))
    }
}
