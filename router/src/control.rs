//! The router's side of the control plane (`--etcd`).
//!
//! - Registers `routers/<id>` under a lease, carrying the placement version
//!   its steps use, which the coordinator waits for before unloading old
//!   expert copies.
//! - Follows `placement`: a new version is staged on the executor and
//!   applied at the next step boundary (never mid-step); the transport's
//!   address book covers both plans until the switch.
//! - Publishes `load/<id>`: routed tokens per layer and expert, decayed over
//!   windows, for the coordinator's load-aware placement.
//!
//! While etcd is away nothing here blocks the data plane: the last placement
//! keeps serving, and the watch and registrations catch up when it returns.

use crate::{RouterError, RouterState};
use expertmesh_cluster::keys::{self, Keys, LoadReport, RouterRecord};
use expertmesh_cluster::membership::{Registration, watch_prefix};
use expertmesh_cluster::store::{ClusterStore, Etcd, EtcdOptions};
use expertmesh_dataplane::executor::RemoteExecutor;
use expertmesh_dataplane::placement::Placement;
use expertmesh_dataplane::transport::Transport;
use expertmesh_model::config::ModelConfig;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often routed-token counts are published.
pub const LOAD_WINDOW: Duration = Duration::from_secs(5);
/// Weight of the previous windows in a load report (exponential decay).
const LOAD_DECAY: f64 = 0.5;

pub struct ControlConfig {
    pub etcd: EtcdOptions,
    pub cluster: String,
    pub id: String,
    pub lease_ttl: Duration,
    pub grpc: String,
    pub http: String,
}

/// Connects to etcd (retrying for a while: etcd may still be starting).
pub async fn connect(endpoints: &EtcdOptions) -> Result<Etcd, RouterError> {
    Etcd::connect_within(endpoints, Duration::from_secs(15))
        .await
        .map_err(|e| RouterError::Config { flag: "--etcd", message: e.to_string() })
}

/// Runs until `shutdown`; then the registrations are revoked.
pub async fn run(
    cfg: ControlConfig,
    store: Etcd,
    model_cfg: ModelConfig,
    executor: Arc<RemoteExecutor>,
    transport: Arc<dyn Transport>,
    state: Arc<RouterState>,
    shutdown: CancellationToken,
) -> Result<(), RouterError> {
    let keys = Keys::new(&cfg.cluster);
    let mut record =
        RouterRecord { id: cfg.id.clone(), grpc: cfg.grpc.clone(), http: cfg.http.clone(), placement_version: 0 };
    let start = |key: String, value: Vec<u8>| {
        Registration::start(cfg.etcd.clone(), key, value, cfg.lease_ttl)
            .map_err(|e| RouterError::Internal(format!("membership thread: {e}")))
    };
    let me = start(keys.router(&cfg.id), keys::encode(&record))?;
    let moe: Vec<usize> = model_cfg.moe_layers().collect();
    let mut report =
        LoadReport { moe_layers: moe.clone(), layers: vec![vec![0.0; model_cfg.moe.n_routed_experts]; moe.len()] };
    let load = start(keys.load(&cfg.id), keys::encode(&report))?;
    let store: Arc<dyn ClusterStore> = Arc::new(store);
    let mut placement = watch_prefix(store, keys.placement(), shutdown.clone());
    let mut staged: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut window = tokio::time::interval(LOAD_WINDOW);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = placement.changed() => {
                if changed.is_err() {
                    break;
                }
                let bytes = placement.borrow_and_update().get(&keys.placement()).cloned();
                if let Some(bytes) = bytes {
                    match parse(&bytes, &model_cfg) {
                        Ok(p) if p.version > staged => {
                            staged = p.version;
                            let mut book: BTreeMap<String, String> = executor.placement().nodes.clone();
                            book.extend(p.nodes.clone());
                            transport.set_addresses(book);
                            tracing::info!(version = p.version, nodes = p.nodes.len(), "placement staged");
                            executor.stage_placement(Arc::new(p));
                        }
                        Ok(_) => {}
                        Err(e) => tracing::error!(error = %e, "ignoring an invalid placement from etcd"),
                    }
                }
            }
            _ = tick.tick() => {
                let active = executor.placement();
                if active.version != record.placement_version {
                    // Switched at a step boundary: old-only nodes leave the book.
                    transport.set_addresses(active.nodes.clone());
                    record.placement_version = active.version;
                    me.update(keys::encode(&record));
                    state.covered.store(active.version > 0, Ordering::Release);
                    tracing::info!(version = active.version, "placement in use");
                }
            }
            _ = window.tick() => {
                let fresh = executor.take_loads();
                for (i, l) in moe.iter().enumerate() {
                    let counts = fresh.get(l);
                    for (e, v) in report.layers[i].iter_mut().enumerate() {
                        let n = counts.and_then(|c| c.get(e)).copied().unwrap_or(0) as f64;
                        *v = *v * LOAD_DECAY + n;
                    }
                }
                load.update(keys::encode(&report));
            }
        }
    }
    // Revoking waits on the membership threads: off the async workers.
    let _ = tokio::task::spawn_blocking(move || drop((load, me))).await;
    Ok(())
}

fn parse(bytes: &[u8], cfg: &ModelConfig) -> Result<Placement, String> {
    let p = Placement::from_json(bytes).map_err(|e| e.to_string())?;
    p.validate(cfg).map_err(|e| e.to_string())?;
    Ok(p)
}
