//! ExpertMesh router: the front door and the attention side.
//!
//! It owns the dense model (embeddings, attention and KV cache, norms,
//! gates, shared experts, LM head) and runs it with continuous batching on
//! one engine thread ([`engine`]); every MoE layer of every step is sent to
//! the expert nodes through `expertmesh_dataplane::RemoteExecutor`. One
//! generation core ([`generation`]) sits behind four thin protocol adapters:
//! the OpenAI API ([`openai`]) and Triton's generate extension
//! ([`triton_http`]) on HTTP, KServe v2 ([`kserve`]) and the native
//! `GenerateService` ([`generate_api`]) on gRPC. [`run`] takes its
//! configuration and a cancellation token, so tests embed it; on
//! cancellation it stops accepting, finishes running requests and returns.

pub mod config;
pub mod engine;
pub mod generate_api;
pub mod generation;
pub mod http;
pub mod kserve;
pub mod metrics;
pub mod openai;
pub mod placement_follower;
pub mod public_tls;
pub mod state;
pub mod triton_http;
pub mod triton_params;

pub use config::{Config, KvCacheDtype, ReasoningParser, TransportArg, WireDtype};
pub use state::{Limits, RouterState, log_prompt};

use engine::{Engine, EngineConfig};
use expertmesh_dataplane::executor::RemoteExecutor;
use expertmesh_dataplane::executor::health::HedgePolicy;
use expertmesh_dataplane::grpc_transport::GrpcTransport;
use expertmesh_dataplane::metrics::DispatchMetrics;
use expertmesh_dataplane::nccl_transport::{NcclBootstrap, NcclTransport};
use expertmesh_dataplane::placement::Placement;
use expertmesh_dataplane::tcp_transport::TcpTransport;
use expertmesh_dataplane::transport::Transport;
use expertmesh_model::cache::{KvCache, KvDtype, PoolConfig};
use expertmesh_model::config::ModelConfig;
use expertmesh_model::model::{Model, load_experts};
use expertmesh_model::moe::ExpertExecutor;
use expertmesh_model::tokenizer::TextTokenizer;
use expertmesh_model::weights::WeightStore;
use expertmesh_plumbing::internal_tls::{InternalTls, identity};
use expertmesh_plumbing::listen::Listeners;
use expertmesh_proto::v1::Dtype;
use expertmesh_proto::v1::generate_service_server::GenerateServiceServer;
use expertmesh_proto::{FILE_DESCRIPTOR_SET, MAX_MESSAGE_BYTES};
use generation::guide::Guidance;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Error)]
pub enum RouterError {
    #[error("{flag}: {message}")]
    Config { flag: &'static str, message: String },
    #[error(transparent)]
    Model(#[from] expertmesh_model::ModelError),
    #[error(transparent)]
    Spec(#[from] expertmesh_spec::SpecError),
    #[error(transparent)]
    DataPlane(#[from] expertmesh_dataplane::DataPlaneError),
    #[error("listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("{0}")]
    Internal(String),
}

/// Addresses the router actually listens on.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
}

/// The executor of the routed experts: a cluster's (`--placement` or
/// `--etcd`), or every expert in this process.
struct Experts {
    executor: Arc<dyn ExpertExecutor>,
    /// The remote executor and its transport, which a placement follower
    /// updates.
    remote: Option<(Arc<RemoteExecutor>, Arc<dyn Transport>)>,
}

/// The placement to start with: a file's, or (with etcd) an empty one the
/// coordinator's first placement replaces; `None` runs experts locally.
fn initial_placement(cfg: &Config, model_cfg: &ModelConfig) -> Result<Option<Placement>, RouterError> {
    match &cfg.placement {
        Some(path) => {
            let p = Placement::load(path)?;
            p.validate(model_cfg).map_err(|e| RouterError::Config { flag: "--placement", message: e.to_string() })?;
            Ok(Some(p))
        }
        None if cfg.member.joins() => {
            Ok(Some(Placement { version: 0, nodes: Default::default(), layers: Default::default() }))
        }
        None => Ok(None),
    }
}

async fn experts(
    cfg: &Config,
    model_cfg: &ModelConfig,
    internal_tls: Option<InternalTls>,
    metrics: Arc<DispatchMetrics>,
) -> Result<Experts, RouterError> {
    let Some(p) = initial_placement(cfg, model_cfg)? else {
        let (dir, mc, weights) = (cfg.model.clone(), model_cfg.clone(), cfg.weights.clone());
        let local = tokio::task::spawn_blocking(move || -> Result<_, RouterError> {
            let ws = WeightStore::for_model(&dir, &mc, weights)?;
            Ok(load_experts(&mc, &ws, |_, _| true, &mut |_, _| {})?)
        })
        .await
        .map_err(|e| RouterError::Internal(e.to_string()))??;
        return Ok(Experts { executor: Arc::new(local), remote: None });
    };
    let dtype = match cfg.dispatch_dtype {
        WireDtype::F32 => Dtype::F32,
        WireDtype::Bf16 => Dtype::Bf16,
        WireDtype::Fp8 => Dtype::Fp8E4m3,
    };
    let timeout = Duration::from_secs_f64(cfg.dispatch_timeout);
    let t: Arc<dyn Transport> = match cfg.transport {
        TransportArg::Grpc => Arc::new(
            GrpcTransport::new(tokio::runtime::Handle::current(), p.nodes.clone(), timeout, dtype)
                .with_metrics(metrics.clone())
                .with_tls(internal_tls),
        ),
        TransportArg::Tcp => Arc::new(TcpTransport::new(p.nodes.clone(), timeout, dtype).with_metrics(metrics.clone())),
        TransportArg::Nccl => nccl_transport(cfg, &p, timeout, &metrics)?,
    };
    let hedging = HedgePolicy {
        multiple: cfg.hedge_multiple,
        floor: Duration::from_secs_f64(cfg.hedge_floor).min(timeout),
        hard: timeout,
    };
    let ex = Arc::new(RemoteExecutor::new(Arc::new(p), t.clone()).with_metrics(metrics).with_hedging(hedging));
    Ok(Experts { executor: ex.clone(), remote: Some((ex, t)) })
}

/// `--transport nccl`: the staging GPU is opened (and NCCL checked) at
/// start, so a router without either exits naming the flag.
fn nccl_transport(
    cfg: &Config,
    p: &Placement,
    timeout: Duration,
    metrics: &Arc<DispatchMetrics>,
) -> Result<Arc<dyn Transport>, RouterError> {
    let id = cfg.router_id.clone().unwrap_or_else(|| "router".into());
    let bad =
        |e: expertmesh_dataplane::DataPlaneError| RouterError::Config { flag: "--nccl-device", message: e.to_string() };
    let rt = tokio::runtime::Handle::current();
    let bootstrap = NcclBootstrap::open(&id, rt, cfg.nccl_device, timeout).map_err(bad)?;
    tracing::info!(device = bootstrap.device(), router = %id, "dispatch rows go over NCCL");
    let tcp = || Arc::new(TcpTransport::new(p.nodes.clone(), timeout, Dtype::F32).with_metrics(metrics.clone()));
    let t = NcclTransport::new(&id, p.nodes.clone(), timeout, tcp(), tcp(), Arc::new(bootstrap), Some(metrics.clone()))
        .map_err(bad)?;
    Ok(Arc::new(t))
}

/// The dense model, loaded off the async runtime.
async fn load_model(
    cfg: &Config,
    model_cfg: &ModelConfig,
    executor: Arc<dyn ExpertExecutor>,
) -> Result<Model, RouterError> {
    let (dir, mc, weights) = (cfg.model.clone(), model_cfg.clone(), cfg.weights.clone());
    tokio::task::spawn_blocking(move || -> Result<Model, RouterError> {
        let ws = WeightStore::for_model(&dir, &mc, weights)?;
        Ok(Model::load_dense(mc, &ws, executor, &mut |_, _| {})?)
    })
    .await
    .map_err(|e| RouterError::Internal(e.to_string()))?
}

/// The block pool: `--kv-cache-bytes` in blocks of `--kv-block-tokens`.
/// When speculating, the MTP module's one-layer pool takes as many blocks
/// from the same budget (a sequence's MTP cache never holds more positions
/// than its KV cache; only shared prefixes can exhaust it first, and then
/// the sequences go on without speculation).
fn kv_pool(cfg: &Config, model: &mut Model, speculative: bool) -> Result<(), RouterError> {
    let dtype = match cfg.kv_cache_dtype {
        KvCacheDtype::F32 => KvDtype::F32,
        KvCacheDtype::Bf16 => KvDtype::Bf16,
    };
    let layers = model.config().num_layers + usize::from(speculative);
    let per_block = KvCache::layer_bytes_per_token(model.config(), dtype) * layers * cfg.kv_block_tokens;
    let pool = PoolConfig {
        block_tokens: cfg.kv_block_tokens,
        capacity_blocks: Some(cfg.kv_cache_bytes / per_block.max(1)),
        prefix_cache: !cfg.no_prefix_cache,
        dtype,
    };
    let flag = if cfg.kv_block_tokens.is_power_of_two() { "--kv-cache-bytes" } else { "--kv-block-tokens" };
    model.configure_kv_pool(pool).map_err(|e| RouterError::Config { flag, message: e.to_string() })?;
    tracing::info!(blocks = ?pool.capacity_blocks, block_tokens = pool.block_tokens, prefix_cache = pool.prefix_cache,
                   dtype = ?pool.dtype, "KV block pool");
    Ok(())
}

/// Public TLS (`--tls-cert/--tls-key`): the HTTPS acceptor and tonic's identity.
type PublicTls = Option<(tokio_rustls::TlsAcceptor, tonic::transport::Identity)>;

fn public_tls(cfg: &Config) -> Result<PublicTls, RouterError> {
    match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(c), Some(k)) => {
            let id = identity(("--tls-cert", c), ("--tls-key", k))
                .map_err(|e| RouterError::Config { flag: "--tls-cert", message: e.to_string() })?;
            Ok(Some((public_tls::acceptor(c, k)?, id)))
        }
        _ => Ok(None),
    }
}

fn state(
    cfg: &Config,
    model_cfg: ModelConfig,
    metrics: Arc<metrics::Metrics>,
    submit: mpsc::Sender<engine::Submit>,
    placed: Arc<AtomicBool>,
) -> Result<RouterState, RouterError> {
    let model_name = cfg.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // A model without a tokenizer serves token ids; a broken one is a
    // start-up error naming the file.
    let tokenizer = TextTokenizer::open(&cfg.model)?.map(Arc::new);
    let limits = Limits {
        max_model_len: cfg.max_model_len.unwrap_or(model_cfg.max_position_embeddings),
        max_tokens_limit: cfg.max_tokens_limit,
        request_timeout: cfg.request_timeout.map(Duration::from_secs_f64),
    };
    Ok(RouterState {
        served_model_name: cfg.served_model_name.clone().unwrap_or_else(|| model_name.clone()),
        model_name,
        started: openai::now_secs(),
        limits,
        api_keys: Arc::new(cfg.api_key.iter().map(|k| k.0.trim().to_string()).collect()),
        reasoning_parser: cfg.reasoning_parser == Some(ReasoningParser::DeepseekR1),
        tool_parser: cfg.tool_call_parser,
        log_prompts: cfg.log_prompts,
        // A tokenizer llguidance cannot read costs structured outputs
        // only: those requests are refused with the reason.
        guidance: match &tokenizer {
            Some(t) => Guidance::new(&cfg.model, t.clone(), model_cfg.vocab_size, &model_cfg.eos_token_ids)
                .map(Arc::new)
                .inspect_err(|e| tracing::warn!(error = %e, "structured outputs are off")),
            None => Err("this model has no tokenizer.json".into()),
        },
        tokenizer,
        model_cfg,
        metrics,
        accepting: AtomicBool::new(false),
        placed,
        listeners: Arc::new(Listeners::default()),
        submit: Mutex::new(Some(submit)),
    })
}

pub async fn run(
    cfg: Config,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<Bound>>,
) -> Result<(), RouterError> {
    cfg.validate()?;
    // Ours to cancel too (the engine dying stops this router), not the caller's.
    let shutdown = shutdown.child_token();
    let internal_tls = InternalTls::load(&cfg.internal_tls)
        .map_err(|e| RouterError::Config { flag: "--internal-cert", message: e.to_string() })?;
    let public = public_tls(&cfg)?;
    let model_cfg = ModelConfig::from_dir(&cfg.model)?;
    let metrics = Arc::new(metrics::Metrics::new().map_err(|e| RouterError::Internal(format!("metrics: {e}")))?);
    let dispatch_metrics = Arc::new(
        DispatchMetrics::register(&metrics.registry, cfg.per_expert_metrics)
            .map_err(|e| RouterError::Internal(format!("metrics: {e}")))?,
    );
    // With etcd the placement comes later, from the coordinator.
    let etcd = match cfg.member.joins() {
        false => None,
        true => Some(placement_follower::connect(cfg.member.etcd()).await?),
    };
    let experts = experts(&cfg, &model_cfg, internal_tls, dispatch_metrics).await?;
    let mut model = load_model(&cfg, &model_cfg, experts.executor.clone()).await?;
    let speculative = cfg.spec.mtp(&model).map_err(|(flag, message)| RouterError::Config { flag, message })?;
    kv_pool(&cfg, &mut model, speculative)?;
    let (tx, rx) = mpsc::channel(cfg.max_queue);
    let placed = Arc::new(AtomicBool::new(etcd.is_none()));
    let engine = Engine {
        model,
        cfg: EngineConfig {
            max_num_seqs: cfg.max_num_seqs,
            max_batch_tokens: cfg.max_batch_tokens,
            overlap: cfg.micro_batches == 2,
            speculative,
        },
        metrics: metrics.clone(),
        rt: tokio::runtime::Handle::current(),
        placed: placed.clone(),
    };
    // A router whose engine is gone can only refuse: it stops (and exits
    // non-zero, so a supervisor restarts it) instead of serving errors.
    let (died, engine_died) = tokio::sync::oneshot::channel::<()>();
    let engine_thread = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.run(rx)));
            if r.is_err() && died.send(()).is_err() {
                tracing::debug!("the engine panicked while the router stopped");
            }
            r.is_ok()
        })
        .map_err(|e| RouterError::Internal(format!("engine thread: {e}")))?;
    let state = Arc::new(state(&cfg, model_cfg, metrics, tx, placed)?);
    let (addrs, servers) = serve(&cfg, &state, public, &shutdown).await?;
    state.accepting.store(true, Ordering::Release);
    tracing::info!(grpc = %addrs.grpc, http = %addrs.http, "router serving");
    if let Some(b) = bound
        && b.send(addrs).is_err()
    {
        tracing::debug!("nobody waits for the bound addresses");
    }
    // Stop taking requests as soon as shutdown starts; running ones finish.
    let (st, stop) = (state.clone(), shutdown.clone());
    tokio::spawn(async move {
        stop.cancelled().await;
        st.close();
    });
    let control = match (etcd, experts.remote) {
        (Some(store), Some((executor, transport))) => {
            let ccfg = placement_follower::FollowerConfig {
                member: cfg.member.clone(),
                id: cfg.router_id.clone().unwrap_or_else(default_router_id),
                grpc: addrs.grpc.to_string(),
                http: addrs.http.to_string(),
            };
            let f = placement_follower::Follower { cfg: ccfg, store, executor, transport, state: state.clone() };
            Some(tokio::spawn(f.run(shutdown.clone())))
        }
        _ => None,
    };
    tokio::pin!(servers);
    tokio::select! {
        _ = &mut servers => {}
        r = engine_died => {
            // Ok: it panicked. Err: it ended (the router is stopping anyway).
            if r.is_ok() {
                tracing::error!("the engine thread panicked; the router stops");
                shutdown.cancel();
            }
            (&mut servers).await;
        }
    }
    if let Some(c) = control {
        match c.await {
            Ok(r) => r?,
            Err(e) => tracing::error!(error = %e, "the placement follower panicked"),
        }
    }
    state.close();
    let engine_ok = tokio::task::spawn_blocking(move || engine_thread.join())
        .await
        .map_err(|e| RouterError::Internal(e.to_string()))?
        .unwrap_or(false);
    if !engine_ok {
        return Err(RouterError::Internal("the engine thread panicked".into()));
    }
    if let Some(f) = state.listeners.failure() {
        return Err(RouterError::Internal(format!("listener failed: {f}")));
    }
    tracing::info!("router drained");
    Ok(())
}

/// Binds both listeners and serves every API on them until `shutdown`.
/// The returned future ends when both servers have stopped; a server that
/// fails is logged and makes the router unready (see [`Listeners`]).
async fn serve(
    cfg: &Config,
    state: &Arc<RouterState>,
    public: PublicTls,
    shutdown: &CancellationToken,
) -> Result<(Bound, impl std::future::Future<Output = ()>), RouterError> {
    let listen = |addr| async move {
        let l = tokio::net::TcpListener::bind(addr).await.map_err(|source| RouterError::Listen { addr, source })?;
        let bound = l.local_addr().map_err(|source| RouterError::Listen { addr, source })?;
        Ok::<_, RouterError>((l, bound))
    };
    let (grpc_listener, grpc_addr) = listen(cfg.grpc).await?;
    let (http_listener, http_addr) = listen(cfg.http).await?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_not_serving::<GenerateServiceServer<generate_api::GenerateApi>>().await;
    tokio::spawn(follow_health(state.clone(), health, shutdown.clone()));
    let reflection =
        expertmesh_plumbing::listen::reflection(&[FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET])
            .map_err(RouterError::Internal)?;
    let auth = generation::auth::GrpcAuth { state: state.clone() };
    let api = tonic::service::interceptor::InterceptedService::new(
        GenerateServiceServer::new(generate_api::GenerateApi { state: state.clone() })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        auth.clone(),
    );
    let kserve = tonic::service::interceptor::InterceptedService::new(
        expertmesh_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer::new(
            kserve::KServeApi { state: state.clone() },
        )
        .max_decoding_message_size(MAX_MESSAGE_BYTES),
        auth,
    );
    let mut grpc_builder = tonic::transport::Server::builder();
    if let Some((_, id)) = &public {
        grpc_builder = grpc_builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(id.clone()))?;
    }
    let stop = shutdown.clone();
    let grpc_server = grpc_builder
        .add_routes(reflection)
        .add_service(health_service)
        .add_service(api)
        .add_service(kserve)
        .serve_with_incoming_shutdown(expertmesh_plumbing::listen::nodelay_incoming(grpc_listener), async move {
            stop.cancelled().await
        });
    let stop = shutdown.clone();
    let drained = async move { stop.cancelled().await };
    let http_server: std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>> = match &public {
        Some((acceptor, _)) => {
            let l = public_tls::TlsListener::new(http_listener, acceptor.clone(), shutdown.clone())
                .map_err(|source| RouterError::Listen { addr: cfg.http, source })?;
            Box::pin(axum::serve(l, http::app(state.clone())).with_graceful_shutdown(drained).into_future())
        }
        None => {
            Box::pin(axum::serve(http_listener, http::app(state.clone())).with_graceful_shutdown(drained).into_future())
        }
    };
    let (listeners, stop) = (state.listeners.clone(), shutdown.clone());
    let servers = async move {
        tokio::join!(listeners.run("grpc", grpc_server, &stop), listeners.run("http", http_server, &stop));
    };
    Ok((Bound { grpc: grpc_addr, http: http_addr }, servers))
}

/// gRPC health follows readiness: `SERVING` once a placement is in use and
/// while every listener is up, `NOT_SERVING` otherwise and on shutdown.
async fn follow_health(st: Arc<RouterState>, health: tonic_health::server::HealthReporter, stop: CancellationToken) {
    type Api = GenerateServiceServer<generate_api::GenerateApi>;
    let mut shown = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return health.set_not_serving::<Api>().await,
            _ = tick.tick() => {}
        }
        let ready = st.is_ready();
        if shown != Some(ready) {
            shown = Some(ready);
            if ready {
                health.set_serving::<Api>().await;
            } else {
                health.set_not_serving::<Api>().await;
            }
        }
    }
}

/// `router-<hostname>-<pid>`: unique across the pods or machines of a cluster.
fn default_router_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
    format!("router-{}-{}", if host.is_empty() { "host" } else { &host }, std::process::id())
}
