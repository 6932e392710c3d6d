//! ExpertMesh router: the front door and the attention side.
//!
//! It owns the dense model (embeddings, attention and KV cache, norms,
//! gates, shared experts, LM head) and runs it with continuous batching on
//! one engine thread ([`engine`]); every MoE layer of every step is sent to
//! the expert nodes through `expertmesh_dataplane::RemoteExecutor`. It
//! serves `expertmesh.v1.GenerateService` (gRPC) and `/health`, `/ready`,
//! `/metrics` (HTTP). [`run`] takes its configuration and a cancellation
//! token, so tests embed it; on cancellation it stops accepting, finishes
//! running requests and returns.

pub mod auth;
pub mod control;
pub mod engine;
pub mod grpc;
pub mod http;
pub mod kserve;
pub mod metrics;
pub mod openai;
pub mod tls;
pub mod triton_http;

use clap::{Parser, ValueEnum};
use engine::{Engine, EngineConfig, Submit};
use expertmesh_cluster::store::EtcdOptions;
use expertmesh_dataplane::executor::RemoteExecutor;
use expertmesh_dataplane::grpc::GrpcTransport;
use expertmesh_dataplane::metrics::DispatchMetrics;
use expertmesh_dataplane::placement::Placement;
use expertmesh_dataplane::tcp::TcpTransport;
use expertmesh_dataplane::tls::{InternalTls, InternalTlsArgs, identity};
use expertmesh_dataplane::transport::Transport;
use expertmesh_model::config::ModelConfig;
use expertmesh_model::model::{Model, load_experts};
use expertmesh_model::moe::ExpertExecutor;
use expertmesh_model::tensor::Precision;
use expertmesh_model::tokenizer::TextTokenizer;
use expertmesh_model::weights::WeightStore;
use expertmesh_proto::v1::Dtype;
use expertmesh_proto::v1::generate_service_server::GenerateServiceServer;
use expertmesh_proto::{FILE_DESCRIPTOR_SET, MAX_MESSAGE_BYTES};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum WireDtype {
    F32,
    Bf16,
    Fp8,
}

/// How the router reaches expert nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    /// The gRPC `Dispatch` stream (TLS-capable).
    Grpc,
    /// Hand-framed TCP on the nodes' gRPC port: no protobuf or HTTP/2
    /// copies of the payload; plaintext only.
    Tcp,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PrecisionArg {
    F32,
    Bf16,
}

#[derive(Parser, Debug, Clone)]
#[command(name = "router", version, about = "ExpertMesh router")]
pub struct Config {
    /// Checkpoint directory; the router reads only the dense weights.
    #[arg(long, env = "EXPERTMESH_MODEL")]
    pub model: PathBuf,
    /// gRPC listen address (GenerateService, health, reflection).
    #[arg(long, env = "EXPERTMESH_GRPC", default_value = "127.0.0.1:50051")]
    pub grpc: SocketAddr,
    /// HTTP listen address (/health, /ready, /metrics).
    #[arg(long, env = "EXPERTMESH_HTTP", default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// Placement file (JSON) naming the expert nodes. Without it the routed
    /// experts run in this process (the single-process baseline).
    #[arg(long, env = "EXPERTMESH_PLACEMENT", conflicts_with = "endpoints")]
    pub placement: Option<PathBuf>,
    /// Seconds a MoE layer's dispatch may take before the node counts as failed.
    #[arg(long, env = "EXPERTMESH_DISPATCH_TIMEOUT", default_value_t = 10.0)]
    pub dispatch_timeout: f64,
    /// Dispatch transport to the expert nodes.
    #[arg(long, value_enum, env = "EXPERTMESH_TRANSPORT", default_value = "grpc")]
    pub transport: TransportArg,
    /// Activation encoding on the wire: f32 is exact.
    #[arg(long, value_enum, env = "EXPERTMESH_DISPATCH_DTYPE", default_value = "f32")]
    pub dispatch_dtype: WireDtype,
    #[arg(long, env = "EXPERTMESH_MAX_NUM_SEQS", default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Token budget of one forward step (decodes + prefill chunks).
    #[arg(long, env = "EXPERTMESH_MAX_BATCH_TOKENS", default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// KV-cache memory for running requests, in bytes.
    #[arg(long, env = "EXPERTMESH_KV_CACHE_BYTES", default_value_t = 2 << 30)]
    pub kv_cache_bytes: usize,
    /// Requests that may wait for admission; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "EXPERTMESH_MAX_QUEUE", default_value_t = 256)]
    pub max_queue: usize,
    /// Compute threads (default: all cores).
    #[arg(long, env = "EXPERTMESH_THREADS")]
    pub threads: Option<usize>,
    /// 2 splits each step into two micro-batches that run concurrently, so
    /// one half's attention overlaps the other half's expert dispatch.
    #[arg(long, env = "EXPERTMESH_MICRO_BATCHES", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub micro_batches: u8,
    #[arg(long, value_enum, env = "EXPERTMESH_PRECISION", default_value = "f32")]
    pub precision: PrecisionArg,
    /// etcd (`--etcd` endpoints, comma-separated, and its TLS and user):
    /// register this router and follow the coordinator's placement instead
    /// of a `--placement` file.
    #[command(flatten)]
    pub etcd: EtcdOptions,
    #[command(flatten)]
    pub internal_tls: InternalTlsArgs,
    /// Certificate chain (PEM) for TLS on the public --grpc and --http listeners.
    #[arg(long, env = "EXPERTMESH_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "EXPERTMESH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Cluster name: keys live under `/expertmesh/<cluster>/`.
    #[arg(long, env = "EXPERTMESH_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// Membership lease TTL in seconds.
    #[arg(long, env = "EXPERTMESH_LEASE_TTL", default_value_t = 10)]
    pub lease_ttl: u64,
    /// This router's id in the cluster (default: `router-<hostname>-<pid>`).
    #[arg(long, env = "EXPERTMESH_ROUTER_ID")]
    pub router_id: Option<String>,
    /// The model name the APIs serve (default: the model directory's name).
    #[arg(long, env = "EXPERTMESH_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Longest prompt + completion, in tokens (default: the model's
    /// `max_position_embeddings`).
    #[arg(long, env = "EXPERTMESH_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// Largest `max_tokens` a request may ask for.
    #[arg(long, env = "EXPERTMESH_MAX_TOKENS_LIMIT", default_value_t = 8192)]
    pub max_tokens_limit: usize,
    /// Seconds a public-API request may take in all (unset: no limit).
    #[arg(long, env = "EXPERTMESH_REQUEST_TIMEOUT")]
    pub request_timeout: Option<f64>,
    /// API keys (comma-separated) required on the public HTTP and gRPC APIs.
    #[arg(long, env = "EXPERTMESH_API_KEY", value_delimiter = ',', hide_env_values = true)]
    pub api_key: Vec<auth::ApiKey>,
    /// Per-expert metric series (`{layer,expert}`); `false` folds each
    /// layer's experts into one series (`expert="all"`) for very large
    /// models (per-node totals stay in `expertmesh_node_tokens_total`).
    #[arg(long, env = "EXPERTMESH_PER_EXPERT_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub per_expert_metrics: bool,
    /// Log each request's prompt (token ids) at info; off by default, as
    /// prompts may hold what users would not want in logs.
    #[arg(long, env = "EXPERTMESH_LOG_PROMPTS")]
    pub log_prompts: bool,
    #[command(flatten)]
    pub log: expertmesh_cluster::process::LogArgs,
    /// Split reasoning from content in chat responses.
    #[arg(long, value_enum, env = "EXPERTMESH_REASONING_PARSER")]
    pub reasoning_parser: Option<ReasoningParser>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReasoningParser {
    /// Text up to `</think>` is `reasoning_content` (DeepSeek-R1).
    #[value(name = "deepseek_r1")]
    DeepseekR1,
}

/// Request limits of the public APIs.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_model_len: usize,
    pub max_tokens_limit: usize,
    pub request_timeout: Option<Duration>,
}

#[derive(Debug, Error)]
pub enum RouterError {
    #[error("{flag}: {message}")]
    Config { flag: &'static str, message: String },
    #[error(transparent)]
    Model(#[from] expertmesh_model::ModelError),
    #[error(transparent)]
    DataPlane(#[from] expertmesh_dataplane::DataPlaneError),
    #[error("listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("{0}")]
    Internal(String),
}

impl Config {
    pub fn validate(&self) -> Result<(), RouterError> {
        let bad = |flag, message: &str| Err(RouterError::Config { flag, message: message.to_string() });
        if !(self.dispatch_timeout > 0.0 && self.dispatch_timeout.is_finite()) {
            return bad("--dispatch-timeout", "must be a positive number of seconds");
        }
        if self.max_num_seqs == 0 {
            return bad("--max-num-seqs", "must be at least 1");
        }
        if self.max_batch_tokens == 0 {
            return bad("--max-batch-tokens", "must be at least 1");
        }
        if self.max_queue == 0 {
            return bad("--max-queue", "must be at least 1");
        }
        if self.threads == Some(0) {
            return bad("--threads", "must be at least 1");
        }
        if self.max_model_len == Some(0) {
            return bad("--max-model-len", "must be at least 1");
        }
        if self.max_tokens_limit == 0 {
            return bad("--max-tokens-limit", "must be at least 1");
        }
        if self.request_timeout.is_some_and(|t| !(t > 0.0 && t.is_finite())) {
            return bad("--request-timeout", "must be a positive number of seconds");
        }
        if self.api_key.iter().any(|k| k.0.trim().is_empty()) {
            return bad("--api-key", "keys must not be empty");
        }
        if let Err((flag, message)) = self.etcd.validate_member(&self.cluster, self.lease_ttl) {
            return bad(flag, &message);
        }
        if self.transport == TransportArg::Tcp && self.internal_tls.internal_ca.is_some() {
            return bad("--transport", "tcp is plaintext; use grpc with --internal-ca");
        }
        if !self.etcd.is_empty() && self.router_id.as_ref().is_some_and(|i| i.is_empty() || i.contains('/')) {
            return bad("--router-id", "must be a non-empty id without '/'");
        }
        Ok(())
    }
}

/// What the API handlers share.
pub struct RouterState {
    pub model_cfg: ModelConfig,
    pub model_name: String,
    /// The name the OpenAI and KServe APIs answer to.
    pub served_model_name: String,
    /// Unix time the router started (the models list's `created`).
    pub started: u64,
    pub limits: Limits,
    pub api_keys: Arc<Vec<String>>,
    pub reasoning_parser: bool,
    /// `--log-prompts`.
    pub log_prompts: bool,
    pub tokenizer: Option<Arc<TextTokenizer>>,
    pub metrics: Arc<metrics::Metrics>,
    pub ready: AtomicBool,
    /// Every expert has a replica in the placement in use (with `--etcd`,
    /// false until the coordinator's first placement is applied).
    pub covered: AtomicBool,
    /// Dropped at shutdown: the engine then drains and exits.
    submit: Mutex<Option<mpsc::Sender<Submit>>>,
}

/// With `--log-prompts`, logs a request's prompt under its trace id.
pub fn log_prompt(st: &RouterState, trace_id: &str, prompt: &[u32]) {
    if st.log_prompts {
        tracing::info!(%trace_id, ?prompt, "prompt");
    }
}

impl RouterState {
    /// Queues a request; a full queue is `RESOURCE_EXHAUSTED`.
    pub fn submit(&self, s: Submit) -> Result<(), tonic::Status> {
        let tx = self.submit.lock().ok().and_then(|g| g.clone());
        let tx = tx.ok_or_else(|| tonic::Status::unavailable("router is shutting down"))?;
        tx.try_send(s).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                self.metrics.errors.with_label_values(&["queue_full"]).inc();
                tonic::Status::resource_exhausted("request queue is full; retry later")
            }
            mpsc::error::TrySendError::Closed(_) => tonic::Status::unavailable("router is shutting down"),
        })
    }
}

/// Addresses the router actually listens on.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
}

pub async fn run(
    cfg: Config,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<Bound>>,
) -> Result<(), RouterError> {
    cfg.validate()?;
    let internal_tls = InternalTls::load(&cfg.internal_tls)
        .map_err(|e| RouterError::Config { flag: "--internal-cert", message: e.to_string() })?;
    let public_tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(c), Some(k)) => {
            let id = identity(("--tls-cert", c), ("--tls-key", k))
                .map_err(|e| RouterError::Config { flag: "--tls-cert", message: e.to_string() })?;
            Some((tls::acceptor(c, k)?, id))
        }
        _ => None,
    };
    let model_cfg = ModelConfig::from_dir(&cfg.model)?;
    let precision = match cfg.precision {
        PrecisionArg::F32 => Precision::F32,
        PrecisionArg::Bf16 => Precision::Bf16,
    };
    let metrics = Arc::new(metrics::Metrics::new());
    let dispatch_metrics = Arc::new(
        DispatchMetrics::register(&metrics.registry, cfg.per_expert_metrics)
            .map_err(|e| RouterError::Internal(format!("metrics: {e}")))?,
    );
    // With etcd the placement comes later, from the coordinator.
    let etcd = match cfg.etcd.is_empty() {
        true => None,
        false => Some(control::connect(&cfg.etcd).await?),
    };
    let initial = match &cfg.placement {
        Some(path) => {
            let p = Placement::load(path)?;
            p.validate(&model_cfg).map_err(|e| RouterError::Config { flag: "--placement", message: e.to_string() })?;
            Some(p)
        }
        None if etcd.is_some() => Some(Placement { version: 0, nodes: Default::default(), layers: Default::default() }),
        None => None,
    };
    let mut remote = None;
    let executor: Arc<dyn ExpertExecutor> = match initial {
        Some(p) => {
            let dtype = match cfg.dispatch_dtype {
                WireDtype::F32 => Dtype::F32,
                WireDtype::Bf16 => Dtype::Bf16,
                WireDtype::Fp8 => Dtype::Fp8E4m3,
            };
            let timeout = Duration::from_secs_f64(cfg.dispatch_timeout);
            let t: Arc<dyn Transport> = match cfg.transport {
                TransportArg::Grpc => Arc::new(
                    GrpcTransport::new(tokio::runtime::Handle::current(), p.nodes.clone(), timeout, dtype)
                        .with_metrics(dispatch_metrics.clone())
                        .with_tls(internal_tls),
                ),
                TransportArg::Tcp => {
                    Arc::new(TcpTransport::new(p.nodes.clone(), timeout, dtype).with_metrics(dispatch_metrics.clone()))
                }
            };
            let ex = Arc::new(RemoteExecutor::new(Arc::new(p), t.clone()).with_metrics(dispatch_metrics));
            remote = Some((ex.clone(), t));
            ex
        }
        None => {
            let (dir, mc) = (cfg.model.clone(), model_cfg.clone());
            let local = tokio::task::spawn_blocking(move || -> Result<_, RouterError> {
                let mut ws = WeightStore::open(&dir, mc.fp8_block)?;
                ws.set_precision(precision);
                Ok(load_experts(&mc, &ws, |_, _| true, &mut |_, _| {})?)
            })
            .await
            .map_err(|e| RouterError::Internal(e.to_string()))??;
            Arc::new(local)
        }
    };
    let (dir, mc) = (cfg.model.clone(), model_cfg.clone());
    let model = tokio::task::spawn_blocking(move || -> Result<Model, RouterError> {
        let mut ws = WeightStore::open(&dir, mc.fp8_block)?;
        ws.set_precision(precision);
        Ok(Model::load_dense(mc, &ws, executor, &mut |_, _| {})?)
    })
    .await
    .map_err(|e| RouterError::Internal(e.to_string()))??;
    let (tx, rx) = mpsc::channel(cfg.max_queue);
    let engine = Engine {
        model,
        cfg: EngineConfig {
            max_num_seqs: cfg.max_num_seqs,
            max_batch_tokens: cfg.max_batch_tokens,
            kv_cache_bytes: cfg.kv_cache_bytes,
            overlap: cfg.micro_batches == 2,
        },
        metrics: metrics.clone(),
        rt: tokio::runtime::Handle::current(),
    };
    let engine_thread = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || engine.run(rx))
        .map_err(|e| RouterError::Internal(format!("engine thread: {e}")))?;
    let model_name = cfg.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let limits = Limits {
        max_model_len: cfg.max_model_len.unwrap_or(model_cfg.max_position_embeddings),
        max_tokens_limit: cfg.max_tokens_limit,
        request_timeout: cfg.request_timeout.map(Duration::from_secs_f64),
    };
    let state = Arc::new(RouterState {
        served_model_name: cfg.served_model_name.clone().unwrap_or_else(|| model_name.clone()),
        model_name,
        started: openai::now_secs(),
        limits,
        api_keys: Arc::new(cfg.api_key.iter().map(|k| k.0.trim().to_string()).collect()),
        reasoning_parser: cfg.reasoning_parser == Some(ReasoningParser::DeepseekR1),
        log_prompts: cfg.log_prompts,
        tokenizer: TextTokenizer::from_dir(&cfg.model).ok().map(Arc::new),
        model_cfg,
        metrics,
        ready: AtomicBool::new(false),
        covered: AtomicBool::new(etcd.is_none()),
        submit: Mutex::new(Some(tx)),
    });

    let grpc_listener = tokio::net::TcpListener::bind(cfg.grpc)
        .await
        .map_err(|source| RouterError::Listen { addr: cfg.grpc, source })?;
    let http_listener = tokio::net::TcpListener::bind(cfg.http)
        .await
        .map_err(|source| RouterError::Listen { addr: cfg.http, source })?;
    let addrs = Bound {
        grpc: grpc_listener.local_addr().map_err(|source| RouterError::Listen { addr: cfg.grpc, source })?,
        http: http_listener.local_addr().map_err(|source| RouterError::Listen { addr: cfg.http, source })?,
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<GenerateServiceServer<grpc::GenerateApi>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| RouterError::Internal(e.to_string()))?;
    let api = tonic::service::interceptor::InterceptedService::new(
        GenerateServiceServer::new(grpc::GenerateApi { state: state.clone() })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        auth::GrpcAuth { keys: state.api_keys.clone() },
    );
    let kserve = tonic::service::interceptor::InterceptedService::new(
        expertmesh_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer::new(
            kserve::KServeApi { state: state.clone() },
        )
        .max_decoding_message_size(MAX_MESSAGE_BYTES),
        auth::GrpcAuth { keys: state.api_keys.clone() },
    );
    let grpc_stop = shutdown.clone();
    let mut grpc_builder = tonic::transport::Server::builder();
    if let Some((_, id)) = &public_tls {
        grpc_builder = grpc_builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(id.clone()))?;
    }
    let grpc_server = grpc_builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(api)
        .add_service(kserve)
        .serve_with_incoming_shutdown(expertmesh_dataplane::grpc::nodelay_incoming(grpc_listener), async move {
            grpc_stop.cancelled().await
        });
    let http_stop = shutdown.clone();
    let drained = async move { http_stop.cancelled().await };
    let http_server: std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>> =
        match &public_tls {
            Some((acceptor, _)) => {
                let l = tls::TlsListener::new(http_listener, acceptor.clone(), shutdown.clone())
                    .map_err(|source| RouterError::Listen { addr: cfg.http, source })?;
                Box::pin(axum::serve(l, http::app(state.clone())).with_graceful_shutdown(drained).into_future())
            }
            None => Box::pin(
                axum::serve(http_listener, http::app(state.clone())).with_graceful_shutdown(drained).into_future(),
            ),
        };
    state.ready.store(true, Ordering::Release);
    tracing::info!(grpc = %addrs.grpc, http = %addrs.http, "router serving");
    if let Some(b) = bound {
        let _ = b.send(addrs);
    }
    // Stop taking requests as soon as shutdown starts; running ones finish.
    let st = state.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        stop.cancelled().await;
        st.ready.store(false, Ordering::Release);
        if let Ok(mut g) = st.submit.lock() {
            g.take();
        }
    });
    let control = match (etcd, remote) {
        (Some(store), Some((executor, transport))) => {
            let ccfg = control::ControlConfig {
                etcd: cfg.etcd.clone(),
                cluster: cfg.cluster.clone(),
                id: cfg.router_id.clone().unwrap_or_else(default_router_id),
                lease_ttl: Duration::from_secs(cfg.lease_ttl),
                grpc: addrs.grpc.to_string(),
                http: addrs.http.to_string(),
            };
            let mc = state.model_cfg.clone();
            Some(tokio::spawn(control::run(ccfg, store, mc, executor, transport, state.clone(), shutdown.clone())))
        }
        _ => None,
    };
    let (g, h) = tokio::join!(grpc_server, http_server);
    if let Some(c) = control {
        let _ = c.await;
    }
    g?;
    h.map_err(|e| RouterError::Internal(format!("http server: {e}")))?;
    if let Ok(mut s) = state.submit.lock() {
        s.take();
    }
    tokio::task::spawn_blocking(move || engine_thread.join())
        .await
        .map_err(|e| RouterError::Internal(e.to_string()))?
        .map_err(|_| RouterError::Internal("engine thread panicked".into()))?;
    tracing::info!("router drained");
    Ok(())
}

/// `router-<hostname>-<pid>`: unique across the pods or machines of a cluster.
fn default_router_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
    format!("router-{}-{}", if host.is_empty() { "host" } else { &host }, std::process::id())
}
