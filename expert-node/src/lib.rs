//! ExpertMesh expert node: holds a shard of the routed experts and computes
//! them for routers over gRPC (`expertmesh.v1.ExpertService`), one matrix
//! product per expert per batch.
//!
//! The binary is a thin wrapper around [`run`], which tests embed: it takes
//! its configuration and a cancellation token, and on cancellation drains
//! (finishes in-flight batches, refuses new ones) before returning.

pub mod metrics;
pub mod raw;
pub mod service;
pub mod spec;

use clap::{Parser, ValueEnum};
use expertmesh_cluster::keys::{self, Keys, NodeRecord, NodeState};
use expertmesh_cluster::membership::Registration;
use expertmesh_cluster::store::EtcdOptions;
use expertmesh_dataplane::tls::{InternalTls, InternalTlsArgs, server_builder};
use expertmesh_model::config::ModelConfig;
use expertmesh_model::model::load_experts;
use expertmesh_model::tensor::Precision;
use expertmesh_model::weights::WeightStore;
use expertmesh_proto::v1::expert_service_server::ExpertServiceServer;
use expertmesh_proto::{FILE_DESCRIPTOR_SET, MAX_MESSAGE_BYTES};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PrecisionArg {
    F32,
    Bf16,
}

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
    /// Activations in expert products (see `expertmesh generate --help`).
    #[arg(long, value_enum, env = "EXPERTMESH_PRECISION", default_value = "f32")]
    pub precision: PrecisionArg,
    /// Serve Prometheus `/metrics` on this address (port 0 picks one).
    #[arg(long, env = "EXPERTMESH_METRICS")]
    pub metrics: Option<SocketAddr>,
    /// Per-expert metric series (`{layer,expert}`); `false` folds each
    /// layer's experts into one series (`expert="all"`) for very large models.
    #[arg(long, env = "EXPERTMESH_PER_EXPERT_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub per_expert_metrics: bool,
    /// Memory for expert weights, in bytes; 0 = unlimited.
    #[arg(long, env = "EXPERTMESH_CAPACITY_BYTES", default_value_t = 0)]
    pub capacity_bytes: u64,
    /// etcd (`--etcd` endpoints, comma-separated, and its TLS and user): join
    /// the cluster under a lease, so the coordinator places experts here and
    /// routers find this node.
    #[command(flatten)]
    pub etcd: EtcdOptions,
    /// Mutual TLS: with it, peers without a certificate from
    /// --internal-ca are refused.
    #[command(flatten)]
    pub internal_tls: InternalTlsArgs,
    /// Cluster name: keys live under `/expertmesh/<cluster>/`.
    #[arg(long, env = "EXPERTMESH_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// Membership lease TTL in seconds: a dead node leaves within it.
    #[arg(long, env = "EXPERTMESH_LEASE_TTL", default_value_t = 10)]
    pub lease_ttl: u64,
    /// Address routers and the coordinator dial (default: the bound `--listen`
    /// address; set it when listening on 0.0.0.0).
    #[arg(long, env = "EXPERTMESH_ADVERTISE")]
    pub advertise: Option<String>,
    #[command(flatten)]
    pub log: expertmesh_cluster::process::LogArgs,
}

#[derive(Debug, Error)]
pub enum NodeError {
    #[error("{flag}: {message}")]
    Config { flag: &'static str, message: String },
    #[error(transparent)]
    Model(#[from] expertmesh_model::ModelError),
    #[error("listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("loading experts: {0}")]
    Load(String),
    #[error(transparent)]
    Tls(#[from] expertmesh_dataplane::tls::TlsError),
}

/// Loads this node's experts, serves until `shutdown` is cancelled, then
/// drains. `bound` receives the listening address once serving.
/// Addresses the node actually listens on.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub grpc: SocketAddr,
    pub metrics: Option<SocketAddr>,
}

pub async fn run(
    cfg: Config,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<Bound>>,
) -> Result<(), NodeError> {
    validate_membership(&cfg)?;
    // TLS material is checked before the (slow) expert load.
    let tls = InternalTls::load(&cfg.internal_tls)?;
    let model_cfg = ModelConfig::from_dir(&cfg.model)?;
    let spec = cfg.experts.clone().unwrap_or_else(|| if cfg.etcd.is_empty() { "all".into() } else { String::new() });
    let wanted = spec::parse(&spec, &model_cfg).map_err(|m| NodeError::Config { flag: "--experts", message: m })?;
    let precision = match cfg.precision {
        PrecisionArg::F32 => Precision::F32,
        PrecisionArg::Bf16 => Precision::Bf16,
    };
    // Listen and join first (as `joining`), so the cluster sees the node
    // while it loads: loading a large shard takes minutes.
    let node_metrics = Arc::new(
        metrics::NodeMetrics::new(cfg.per_expert_metrics).map_err(|e| NodeError::Load(format!("metrics: {e}")))?,
    );
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| NodeError::Listen { addr: cfg.listen, source })?;
    let addr = listener.local_addr().map_err(|source| NodeError::Listen { addr: cfg.listen, source })?;
    let metrics_addr = match cfg.metrics {
        Some(m) => Some(
            expertmesh_cluster::metrics::serve(m, node_metrics.registry.clone(), shutdown.clone())
                .await
                .map_err(|source| NodeError::Listen { addr: m, source })?,
        ),
        None => None,
    };
    let mut record = NodeRecord {
        id: cfg.node_id.clone(),
        addr: cfg.advertise.clone().unwrap_or_else(|| addr.to_string()),
        metrics: metrics_addr.map(|m| m.to_string()).unwrap_or_default(),
        device: "cpu".into(),
        capacity_bytes: cfg.capacity_bytes,
        expert_bytes: 0,
        state: NodeState::Joining,
        incarnation: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    };
    let registration = if cfg.etcd.is_empty() {
        None
    } else {
        let key = Keys::new(&cfg.cluster).node(&cfg.node_id);
        let ttl = std::time::Duration::from_secs(cfg.lease_ttl);
        Some(Arc::new(
            Registration::start(cfg.etcd.clone(), key, keys::encode(&record), ttl)
                .map_err(|e| NodeError::Load(format!("membership thread: {e}")))?,
        ))
    };
    let (dir, mc) = (cfg.model.clone(), model_cfg.clone());
    let (store, experts) = tokio::task::spawn_blocking(move || -> Result<_, NodeError> {
        let mut store = WeightStore::open(&dir, mc.fp8_block)?;
        store.set_precision(precision);
        let experts = load_experts(&mc, &store, |l, e| wanted.contains(&(l, e)), &mut |_, _| {})?;
        Ok((store, experts))
    })
    .await
    .map_err(|e| NodeError::Load(e.to_string()))??;
    let weight_dtype = model_cfg
        .moe_layers()
        .next()
        .and_then(|l| store.dtype_name(&expertmesh_model::model::expert_tensor_names(&model_cfg, l, 0)[0]))
        .unwrap_or_else(|| "unknown".into());
    let used = experts.size_bytes() as u64;
    if cfg.capacity_bytes > 0 && used > cfg.capacity_bytes {
        return Err(NodeError::Config {
            flag: "--capacity-bytes",
            message: format!("the selected experts need {used} bytes, more than {}", cfg.capacity_bytes),
        });
    }
    record.expert_bytes = match experts.loaded().len() {
        0 => one_expert_bytes(&model_cfg, &store)?,
        n => used / n as u64,
    };
    node_metrics.experts_loaded.set(experts.loaded().len() as i64);
    let (model_cfg, experts) = (Arc::new(model_cfg), Arc::new(RwLock::new(experts)));
    // The framed-TCP dispatch link shares the gRPC port; it is plaintext,
    // so under internal TLS every connection goes to gRPC.
    let raw_ctx = tls.is_none().then(|| raw::RawContext {
        experts: experts.clone(),
        cfg: model_cfg.clone(),
        metrics: node_metrics.clone(),
        stop: shutdown.clone(),
    });
    let service = service::NodeService {
        node_id: cfg.node_id.clone(),
        model_name: cfg.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        cfg: model_cfg,
        store: Arc::new(store),
        experts,
        capacity_bytes: cfg.capacity_bytes,
        weight_dtype,
        shutdown: shutdown.clone(),
        metrics: node_metrics.clone(),
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ExpertServiceServer<service::NodeService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| NodeError::Load(e.to_string()))?;
    tracing::info!(node = %cfg.node_id, %addr, experts = used, "expert node serving");
    record.state = NodeState::Ready;
    if let Some(r) = &registration {
        r.update(keys::encode(&record));
    }
    // Draining is announced at once; the lease is revoked (the node leaves)
    // only once in-flight batches are done.
    let announce = registration.clone();
    if let Some(tx) = bound {
        let _ = tx.send(Bound { grpc: addr, metrics: metrics_addr });
    }
    let server = ExpertServiceServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let drain = shutdown.clone();
    let links = raw::RawLinks::default();
    let incoming = raw::split_incoming(listener, raw_ctx, links.clone(), shutdown.clone());
    server_builder(tls.as_ref())?
        .tcp_nodelay(true)
        .initial_stream_window_size(expertmesh_dataplane::grpc::WINDOW)
        .initial_connection_window_size(expertmesh_dataplane::grpc::WINDOW)
        .max_frame_size(expertmesh_dataplane::grpc::FRAME)
        .add_service(health_service)
        .add_service(reflection)
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
    let _ = tokio::task::spawn_blocking(move || links.join()).await;
    drop(registration);
    tracing::info!(node = %cfg.node_id, "expert node drained");
    Ok(())
}

fn validate_membership(cfg: &Config) -> Result<(), NodeError> {
    let bad = |flag, message: &str| Err(NodeError::Config { flag, message: message.to_string() });
    if let Err((flag, message)) = cfg.etcd.validate_member(&cfg.cluster, cfg.lease_ttl) {
        return bad(flag, &message);
    }
    if cfg.etcd.is_empty() {
        return Ok(());
    }
    if cfg.node_id.is_empty() || cfg.node_id.contains('/') {
        return bad("--node-id", "must be a non-empty id without '/'");
    }
    Ok(())
}

/// Bytes one routed expert takes here, measured by loading one.
fn one_expert_bytes(cfg: &ModelConfig, store: &WeightStore) -> Result<u64, NodeError> {
    let Some(layer) = cfg.moe_layers().next() else { return Ok(0) };
    let one = load_experts(cfg, store, |l, e| (l, e) == (layer, 0), &mut |_, _| {})?;
    Ok(one.size_bytes() as u64)
}
