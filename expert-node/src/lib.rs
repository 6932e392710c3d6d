//! ExpertMesh expert node: holds a shard of the routed experts and computes
//! them for routers over gRPC (`expertmesh.v1.ExpertService`), one matrix
//! product per expert per batch.
//!
//! The binary is a thin wrapper around [`run`], which tests embed: it takes
//! its configuration and a cancellation token, and on cancellation drains
//! (finishes in-flight batches, refuses new ones) before returning.

pub mod metrics;
pub mod service;
pub mod spec;

use clap::{Parser, ValueEnum};
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
    /// Experts to load: `all`, or `LAYER:EXPERTS` items such as `*:0-7,3:12`.
    #[arg(long, env = "EXPERTMESH_EXPERTS", default_value = "all")]
    pub experts: String,
    /// Compute threads (default: all cores).
    #[arg(long, env = "EXPERTMESH_THREADS")]
    pub threads: Option<usize>,
    /// Activations in expert products (see `expertmesh generate --help`).
    #[arg(long, value_enum, env = "EXPERTMESH_PRECISION", default_value = "f32")]
    pub precision: PrecisionArg,
    /// Serve Prometheus `/metrics` on this address (port 0 picks one).
    #[arg(long, env = "EXPERTMESH_METRICS")]
    pub metrics: Option<SocketAddr>,
    /// Memory for expert weights, in bytes; 0 = unlimited.
    #[arg(long, env = "EXPERTMESH_CAPACITY_BYTES", default_value_t = 0)]
    pub capacity_bytes: u64,
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
    let model_cfg = ModelConfig::from_dir(&cfg.model)?;
    let wanted =
        spec::parse(&cfg.experts, &model_cfg).map_err(|m| NodeError::Config { flag: "--experts", message: m })?;
    let precision = match cfg.precision {
        PrecisionArg::F32 => Precision::F32,
        PrecisionArg::Bf16 => Precision::Bf16,
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
    let node_metrics = Arc::new(metrics::NodeMetrics::new().map_err(|e| NodeError::Load(format!("metrics: {e}")))?);
    node_metrics.experts_loaded.set(experts.loaded().len() as i64);
    let service = service::NodeService {
        node_id: cfg.node_id.clone(),
        model_name: cfg.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        cfg: Arc::new(model_cfg),
        store: Arc::new(store),
        experts: Arc::new(RwLock::new(experts)),
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
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| NodeError::Listen { addr: cfg.listen, source })?;
    let addr = listener.local_addr().map_err(|source| NodeError::Listen { addr: cfg.listen, source })?;
    let metrics_addr = match cfg.metrics {
        Some(m) => {
            let l = tokio::net::TcpListener::bind(m).await.map_err(|source| NodeError::Listen { addr: m, source })?;
            let a = l.local_addr().map_err(|source| NodeError::Listen { addr: m, source })?;
            let nm = node_metrics.clone();
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let nm = nm.clone();
                    async move { nm.render() }
                }),
            );
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let _ = axum::serve(l, app).with_graceful_shutdown(async move { stop.cancelled().await }).await;
            });
            Some(a)
        }
        None => None,
    };
    tracing::info!(node = %cfg.node_id, %addr, experts = used, "expert node serving");
    if let Some(tx) = bound {
        let _ = tx.send(Bound { grpc: addr, metrics: metrics_addr });
    }
    let server = ExpertServiceServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let drain = shutdown.clone();
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(expertmesh_dataplane::grpc::WINDOW)
        .initial_connection_window_size(expertmesh_dataplane::grpc::WINDOW)
        .max_frame_size(expertmesh_dataplane::grpc::FRAME)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(server)
        .serve_with_incoming_shutdown(expertmesh_dataplane::grpc::nodelay_incoming(listener), async move {
            drain.cancelled().await;
            // Tell health checkers first, so routers stop sending.
            health.set_not_serving::<ExpertServiceServer<service::NodeService>>().await;
        })
        .await?;
    tracing::info!(node = %cfg.node_id, "expert node drained");
    Ok(())
}
