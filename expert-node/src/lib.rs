//! ExpertMesh expert node: holds a shard of the routed experts and computes
//! them for routers over gRPC (`expertmesh.v1.ExpertService`), one matrix
//! product per expert per batch.
//!
//! The binary is a thin wrapper around [`run`], which tests embed: it takes
//! its configuration and a cancellation token, and on cancellation drains
//! (finishes in-flight batches, refuses new ones) before returning.

pub mod metrics;
pub mod nccl;
pub mod service;
pub mod spec;
pub mod tcp_server;

use clap::Parser;
use expertmesh_cluster::args::MemberArgs;
use expertmesh_cluster::keys::{self, NodeRecord, NodeState};
use expertmesh_cluster::membership::Registration;
use expertmesh_gpu::DeviceSpec;
use expertmesh_model::config::ModelConfig;
use expertmesh_model::model::{load_expert, load_experts_into};
use expertmesh_model::moe::{ExpertBank, LocalExperts};
use expertmesh_model::options::WeightArgs;
use expertmesh_model::weights::WeightStore;
use expertmesh_plumbing::internal_tls::{InternalTls, InternalTlsArgs, server_builder};
use expertmesh_plumbing::listen::Listeners;
use expertmesh_proto::v1::expert_service_server::ExpertServiceServer;
use expertmesh_proto::{FILE_DESCRIPTOR_SET, MAX_MESSAGE_BYTES};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

/// Command-line and environment configuration.
#[derive(Parser, Debug, Clone)]
#[command(name = "expert-node", version, about = "ExpertMesh expert node")]
pub struct Config {
    /// Checkpoint directory; only this node's expert tensors are read.
    #[arg(long, env = "EXPERTMESH_MODEL")]
    pub model: PathBuf,
    /// gRPC listen address (port 0 picks a free port, printed at start).
    #[arg(long, env = "EXPERTMESH_LISTEN", default_value = "127.0.0.1:50061")]
    pub listen: SocketAddr,
    #[arg(long, env = "EXPERTMESH_NODE_ID", default_value = "en-0")]
    pub node_id: String,
    /// Experts to load at start: `all`, or `LAYER:EXPERTS` items such as
    /// `*:0-7,3:12`. Default: `all`, or none with `--etcd` (the coordinator
    /// assigns them).
    #[arg(long, env = "EXPERTMESH_EXPERTS")]
    pub experts: Option<String>,
    /// Compute threads (default: all cores).
    #[arg(long, env = "EXPERTMESH_THREADS")]
    pub threads: Option<usize>,
    /// Where the experts are computed: `cpu`, or `cuda:N` (weights in that
    /// GPU's memory as bf16, GEMMs on cuBLAS). A machine without the CUDA
    /// driver, cuBLAS or NVRTC refuses `cuda:N` at start, naming what is
    /// missing.
    #[arg(long, env = "EXPERTMESH_DEVICE", default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceSpec,
    /// Precision and quantization of the experts (`--quantize` counts in
    /// the bytes the node reports, so it holds 2x or 4x the experts). On
    /// `--device cuda:N` activations are always bf16 (f32 accumulation) and
    /// `--quantize` is refused.
    #[command(flatten)]
    pub weights: WeightArgs,
    /// Serve Prometheus `/metrics` on this address (port 0 picks one).
    #[arg(long, env = "EXPERTMESH_METRICS")]
    pub metrics: Option<SocketAddr>,
    /// Per-expert metric series (`{layer,expert}`); `false` folds each
    /// layer's experts into one series (`expert="all"`) for very large models.
    #[arg(long, env = "EXPERTMESH_PER_EXPERT_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub per_expert_metrics: bool,
    /// Memory for expert weights, in bytes; 0 = unlimited on the CPU, and on
    /// a GPU its free memory at start less a reserve for scratch buffers and
    /// the CUDA context (`max(2 GiB, 10%)` of the device).
    #[arg(long, env = "EXPERTMESH_CAPACITY_BYTES", default_value_t = 0)]
    pub capacity_bytes: u64,
    /// etcd, cluster and lease: join the cluster under a lease, so the
    /// coordinator places experts here and routers find this node.
    #[command(flatten)]
    pub member: MemberArgs,
    /// Mutual TLS: with it, peers without a certificate from
    /// --internal-ca are refused.
    #[command(flatten)]
    pub internal_tls: InternalTlsArgs,
    /// Address routers and the coordinator dial (default: the bound `--listen`
    /// address; set it when listening on 0.0.0.0).
    #[arg(long, env = "EXPERTMESH_ADVERTISE")]
    pub advertise: Option<String>,
    #[command(flatten)]
    pub log: expertmesh_plumbing::process::LogArgs,
}

#[derive(Debug, Error)]
pub enum NodeError {
    #[error("{flag}: {message}")]
    Config { flag: &'static str, message: String },
    #[error(transparent)]
    Spec(#[from] expertmesh_spec::SpecError),
    #[error(transparent)]
    Model(#[from] expertmesh_model::ModelError),
    #[error("listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("loading experts: {0}")]
    Load(String),
    #[error(transparent)]
    Tls(#[from] expertmesh_plumbing::internal_tls::TlsError),
}

/// Addresses the node actually listens on.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub grpc: SocketAddr,
    pub metrics: Option<SocketAddr>,
}

fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    s.parse()
}

/// The node's shard, loaded.
struct Shard {
    store: WeightStore,
    experts: Box<dyn ExpertBank>,
    weight_dtype: String,
}

/// Opens the compute backend `--device` names (before anything listens, so
/// a node asked for a GPU it lacks exits at once); returns it with the
/// capacity in bytes.
fn open_bank(cfg: &Config, model_cfg: &ModelConfig) -> Result<(Box<dyn ExpertBank>, u64), NodeError> {
    match cfg.device {
        DeviceSpec::Cpu => Ok((Box::new(LocalExperts::new(Vec::new())), cfg.capacity_bytes)),
        DeviceSpec::Cuda(n) => {
            let bad = |e: expertmesh_gpu::GpuError| NodeError::Config { flag: "--device", message: e.to_string() };
            let bank = expertmesh_gpu::CudaExperts::open(n, model_cfg.hidden_size, model_cfg.moe.moe_intermediate_size)
                .map_err(bad)?;
            let (free, total) = bank.memory().map_err(bad)?;
            let reserve = (2u64 << 30).max(total as u64 / 10);
            let capacity = match cfg.capacity_bytes {
                0 => (free as u64).saturating_sub(reserve),
                c => c,
            };
            tracing::info!(device = %bank.device(), free, total, capacity, "expert weights go to the GPU");
            Ok((Box::new(bank), capacity))
        }
    }
}

/// Loads this node's experts, serves until `shutdown` is cancelled, then
/// drains. `bound` receives the listening addresses once serving.
pub async fn run(
    cfg: Config,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<Bound>>,
) -> Result<(), NodeError> {
    validate(&cfg)?;
    // TLS material is checked before the (slow) expert load.
    let tls = InternalTls::load(&cfg.internal_tls)?;
    let model_cfg = ModelConfig::from_dir(&cfg.model)?;
    if model_cfg.moe_layers().next().is_none() {
        return Err(NodeError::Config {
            flag: "--model",
            message: format!(
                "{} is a dense {} model: it has no routed experts to serve (its router runs it alone)",
                cfg.model.display(),
                model_cfg.arch.name()
            ),
        });
    }
    let (bank, capacity_bytes) = open_bank(&cfg, &model_cfg)?;
    let node_metrics = Arc::new(
        metrics::NodeMetrics::new(cfg.per_expert_metrics).map_err(|e| NodeError::Load(format!("metrics: {e}")))?,
    );
    // Listen and join first (as `joining`), so the cluster sees the node
    // while it loads: loading a large shard takes minutes.
    let listeners = Arc::new(Listeners::default());
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| NodeError::Listen { addr: cfg.listen, source })?;
    let addr = listener.local_addr().map_err(|source| NodeError::Listen { addr: cfg.listen, source })?;
    let metrics_addr = match cfg.metrics {
        Some(m) => Some(
            expertmesh_plumbing::metrics::serve(m, node_metrics.registry.clone(), shutdown.clone(), listeners.clone())
                .await
                .map_err(|source| NodeError::Listen { addr: m, source })?,
        ),
        None => None,
    };
    let mut record = NodeRecord {
        id: cfg.node_id.clone(),
        addr: cfg.advertise.clone().unwrap_or_else(|| addr.to_string()),
        metrics: metrics_addr.map(|m| m.to_string()).unwrap_or_default(),
        device: bank.device(),
        capacity_bytes,
        expert_bytes: 0,
        state: NodeState::Joining,
        incarnation: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    };
    let registration = register(&cfg, &record)?;
    let shard = load_shard(&cfg, &model_cfg, bank).await?;
    record.expert_bytes = expert_bytes(capacity_bytes, &model_cfg, &shard)?;
    node_metrics.experts_loaded.set(shard.experts.loaded().len() as i64);
    tracing::info!(node = %cfg.node_id, %addr, experts = shard.experts.size_bytes(), "expert node serving");
    record.state = NodeState::Ready;
    if let Some(r) = &registration {
        r.update(keys::encode(&record));
    }
    if let Some(tx) = bound
        && tx.send(Bound { grpc: addr, metrics: metrics_addr }).is_err()
    {
        tracing::debug!("nobody waits for the bound addresses");
    }
    let served = Served { cfg: &cfg, model_cfg, tls, metrics: node_metrics, listeners, capacity_bytes };
    served.serve(listener, shard, registration.clone(), record, &shutdown).await?;
    drop(registration);
    tracing::info!(node = %cfg.node_id, "expert node drained");
    Ok(())
}

/// Joins the cluster (with `--etcd`) as `joining`.
fn register(cfg: &Config, record: &NodeRecord) -> Result<Option<Arc<Registration>>, NodeError> {
    if !cfg.member.joins() {
        return Ok(None);
    }
    let key = cfg.member.keys().node(&cfg.node_id);
    let r = Registration::start(cfg.member.etcd().clone(), key, keys::encode(record), cfg.member.ttl())
        .map_err(|e| NodeError::Load(format!("membership thread: {e}")))?;
    Ok(Some(Arc::new(r)))
}

/// Reads the experts `--experts` names (all, or none under a coordinator),
/// off the async runtime.
async fn load_shard(
    cfg: &Config,
    model_cfg: &ModelConfig,
    mut experts: Box<dyn ExpertBank>,
) -> Result<Shard, NodeError> {
    let spec = cfg.experts.clone().unwrap_or_else(|| if cfg.member.joins() { String::new() } else { "all".into() });
    let wanted = spec::parse(&spec, model_cfg).map_err(|m| NodeError::Config { flag: "--experts", message: m })?;
    let (dir, mc, weights) = (cfg.model.clone(), model_cfg.clone(), cfg.weights.clone());
    let (store, experts) = tokio::task::spawn_blocking(move || -> Result<_, NodeError> {
        let store = WeightStore::for_model(&dir, &mc, weights)?;
        load_experts_into(&mc, &store, |l, e| wanted.contains(&(l, e)), &mut |_, _| {}, experts.as_mut())?;
        Ok((store, experts))
    })
    .await
    .map_err(|e| NodeError::Load(e.to_string()))??;
    let weight_dtype = model_cfg
        .moe_layers()
        .next()
        .and_then(|l| store.dtype_name(&expertmesh_model::model::expert_tensor_names(model_cfg, l, 0)[0]))
        .unwrap_or_else(|| "unknown".into());
    Ok(Shard { store, experts, weight_dtype })
}

/// Bytes one routed expert takes here (the placement's slot size), checking
/// the shard fits `--capacity-bytes`.
fn expert_bytes(capacity: u64, model_cfg: &ModelConfig, shard: &Shard) -> Result<u64, NodeError> {
    let used = shard.experts.size_bytes() as u64;
    if capacity > 0 && used > capacity {
        return Err(NodeError::Config {
            flag: "--capacity-bytes",
            message: format!("the selected experts need {used} bytes, more than {capacity}"),
        });
    }
    match shard.experts.loaded().len() {
        0 => one_expert_bytes(model_cfg, &shard.store, shard.experts.as_ref()),
        n => Ok(used / n as u64),
    }
}

/// What the serving step needs.
struct Served<'a> {
    cfg: &'a Config,
    model_cfg: ModelConfig,
    tls: Option<InternalTls>,
    metrics: Arc<metrics::NodeMetrics>,
    listeners: Arc<Listeners>,
    capacity_bytes: u64,
}

impl Served<'_> {
    /// Serves gRPC and framed links on one port until `shutdown`, then
    /// drains: draining is announced at once, in-flight batches finish.
    async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shard: Shard,
        announce: Option<Arc<Registration>>,
        mut record: NodeRecord,
        shutdown: &CancellationToken,
    ) -> Result<(), NodeError> {
        let (model_cfg, experts) = (Arc::new(self.model_cfg), Arc::new(RwLock::new(shard.experts)));
        let nccl = Arc::new(nccl::NcclSide::new(self.cfg.device));
        // The framed-TCP dispatch link shares the gRPC port; it is plaintext,
        // so under internal TLS every connection goes to gRPC.
        let link_ctx = self.tls.is_none().then(|| tcp_server::LinkContext {
            experts: experts.clone(),
            cfg: model_cfg.clone(),
            metrics: self.metrics.clone(),
            nccl: nccl.clone(),
            stop: shutdown.clone(),
        });
        let service = service::NodeService {
            node_id: self.cfg.node_id.clone(),
            model_name: self.cfg.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            cfg: model_cfg,
            store: Arc::new(shard.store),
            experts,
            capacity_bytes: self.capacity_bytes,
            weight_dtype: shard.weight_dtype,
            shutdown: shutdown.clone(),
            metrics: self.metrics,
            nccl,
        };
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<ExpertServiceServer<service::NodeService>>().await;
        let unready = health.clone();
        let (listeners, stop) = (self.listeners.clone(), shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = listeners.failed() => unready.set_not_serving::<ExpertServiceServer<service::NodeService>>().await,
                _ = stop.cancelled() => {}
            }
        });
        let reflection =
            expertmesh_plumbing::listen::reflection(&[FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET])
                .map_err(NodeError::Load)?;
        let server = ExpertServiceServer::new(service)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let drain = shutdown.clone();
        let links = tcp_server::LinkThreads::default();
        let incoming = tcp_server::split_incoming(listener, link_ctx, links.clone(), shutdown.clone());
        server_builder(self.tls.as_ref())?
            .tcp_nodelay(true)
            .initial_stream_window_size(expertmesh_dataplane::grpc_transport::WINDOW)
            .initial_connection_window_size(expertmesh_dataplane::grpc_transport::WINDOW)
            .max_frame_size(expertmesh_dataplane::grpc_transport::FRAME)
            .add_routes(reflection)
            .add_service(health_service)
            .add_service(server)
            .serve_with_incoming_shutdown(incoming, async move {
                drain.cancelled().await;
                if let Some(r) = &announce {
                    record.state = NodeState::Draining;
                    r.update(keys::encode(&record));
                }
                // Tell health checkers first, so routers stop sending.
                health.set_not_serving::<ExpertServiceServer<service::NodeService>>().await;
            })
            .await?;
        // Framed links answer the batch in hand, then close.
        if let Err(e) = tokio::task::spawn_blocking(move || links.join()).await {
            tracing::error!(error = %e, "joining the framed links");
        }
        Ok(())
    }
}

fn validate(cfg: &Config) -> Result<(), NodeError> {
    let bad = |flag, message: &str| Err(NodeError::Config { flag, message: message.to_string() });
    if cfg.threads == Some(0) {
        return bad("--threads", "must be at least 1");
    }
    if cfg.weights.quantize.is_some() && matches!(cfg.device, DeviceSpec::Cuda(_)) {
        return bad("--quantize", "experts on a GPU are bf16; quantized GPU kernels are not built yet");
    }
    if let Err((flag, message)) = cfg.member.validate() {
        return bad(flag, &message);
    }
    if !cfg.member.joins() {
        return Ok(());
    }
    if cfg.node_id.is_empty() || cfg.node_id.contains('/') {
        return bad("--node-id", "must be a non-empty id without '/'");
    }
    Ok(())
}

/// Bytes one routed expert takes in `bank`, measured on one read from disk.
fn one_expert_bytes(cfg: &ModelConfig, store: &WeightStore, bank: &dyn ExpertBank) -> Result<u64, NodeError> {
    let Some(layer) = cfg.moe_layers().next() else { return Ok(0) };
    Ok(bank.bytes_for(&load_expert(cfg, store, layer, 0)?) as u64)
}
