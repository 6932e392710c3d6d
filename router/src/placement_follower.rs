//! The router's side of the control plane (`--etcd`).
//!
//! - Registers `routers/<id>` under a lease, carrying the placement version
//!   its steps use, which the coordinator waits for before unloading old
//!   expert copies.
//! - Follows `placement`: a new version is staged on the executor and
//!   applied at the next step boundary (never mid-step); the transport's
//!   address book covers both plans until the switch. A malformed value is
//!   logged and counted, and the last good placement stays in force.
//! - Publishes `load/<id>`: routed tokens per layer and expert, decayed over
//!   windows, for the coordinator's load-aware placement.
//!
//! While etcd is away nothing here blocks the data plane: the last placement
//! keeps serving, and the watch and registrations catch up when it returns.

use crate::{RouterError, RouterState};
use expertmesh_cluster::args::MemberArgs;
use expertmesh_cluster::keys::{self, LoadReport, RouterRecord};
use expertmesh_cluster::membership::{Registration, watch_prefix};
use expertmesh_cluster::store::{ClusterStore, Etcd, EtcdOptions};
use expertmesh_cluster::view::PlacementReader;
use expertmesh_dataplane::executor::RemoteExecutor;
use expertmesh_dataplane::placement::Placement;
use expertmesh_dataplane::transport::Transport;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often routed-token counts are published.
pub const LOAD_WINDOW: Duration = Duration::from_secs(5);
/// Weight of the previous windows in a load report (exponential decay).
const LOAD_DECAY: f64 = 0.5;

pub struct FollowerConfig {
    pub member: MemberArgs,
    pub id: String,
    pub grpc: String,
    pub http: String,
}

/// Connects to etcd (retrying for a while: etcd may still be starting).
pub async fn connect(endpoints: &EtcdOptions) -> Result<Etcd, RouterError> {
    Etcd::connect_within(endpoints, Duration::from_secs(15))
        .await
        .map_err(|e| RouterError::Config { flag: "--etcd", message: e.to_string() })
}

pub struct Follower {
    pub cfg: FollowerConfig,
    pub store: Etcd,
    pub executor: Arc<RemoteExecutor>,
    pub transport: Arc<dyn Transport>,
    pub state: Arc<RouterState>,
}

impl Follower {
    /// Runs until `shutdown`; then the registrations are revoked.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RouterError> {
        let (cfg, keys) = (&self.cfg, self.cfg.member.keys());
        let mut record =
            RouterRecord { id: cfg.id.clone(), grpc: cfg.grpc.clone(), http: cfg.http.clone(), placement_version: 0 };
        let start = |key: String, value: Vec<u8>| {
            Registration::start(cfg.member.etcd().clone(), key, value, cfg.member.ttl())
                .map_err(|e| RouterError::Internal(format!("membership thread: {e}")))
        };
        let me = start(keys.router(&cfg.id), keys::encode(&record))?;
        let model = &self.state.model_cfg;
        let moe: Vec<usize> = model.moe_layers().collect();
        let mut report =
            LoadReport { moe_layers: moe.clone(), layers: vec![vec![0.0; model.moe.n_routed_experts]; moe.len()] };
        let load = start(keys.load(&cfg.id), keys::encode(&report))?;
        let store: Arc<dyn ClusterStore> = Arc::new(self.store.clone());
        let mut placement = watch_prefix(store, keys.placement(), shutdown.clone());
        let mut reader = PlacementReader::default();
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
                    let value = placement.borrow_and_update().get(&keys.placement()).cloned();
                    let (good, bad) = reader.read(value.as_deref(), model);
                    if let Some(e) = bad {
                        self.state.metrics.invalid_placements.inc();
                        tracing::error!(error = %e, "the placement in etcd is invalid; keeping the last good one");
                    }
                    if let Some(p) = good.filter(|p| p.version > staged) {
                        staged = p.version;
                        self.stage(p.clone());
                    }
                }
                _ = tick.tick() => self.note_switch(&mut record, &me),
                _ = window.tick() => {
                    self.decay_into(&mut report, &moe);
                    load.update(keys::encode(&report));
                }
            }
        }
        // Revoking waits on the membership threads: off the async workers.
        if let Err(e) = tokio::task::spawn_blocking(move || drop((load, me))).await {
            tracing::warn!(error = %e, "revoking the router's leases");
        }
        Ok(())
    }

    /// Makes `p` the next placement; the book covers both plans meanwhile.
    fn stage(&self, p: Placement) {
        let mut book: BTreeMap<String, String> = self.executor.placement().nodes.clone();
        book.extend(p.nodes.clone());
        self.transport.set_addresses(book);
        tracing::info!(version = p.version, nodes = p.nodes.len(), "placement staged");
        self.executor.stage_placement(Arc::new(p));
    }

    /// Once the engine has switched at a step boundary: old-only nodes
    /// leave the book, the version is reported, the router turns ready.
    fn note_switch(&self, record: &mut RouterRecord, me: &Registration) {
        let active = self.executor.placement();
        if active.version == record.placement_version {
            return;
        }
        self.transport.set_addresses(active.nodes.clone());
        record.placement_version = active.version;
        me.update(keys::encode(record));
        self.state.placed.store(active.version > 0, Ordering::Release);
        tracing::info!(version = active.version, "placement in use");
    }

    fn decay_into(&self, report: &mut LoadReport, moe: &[usize]) {
        let fresh = self.executor.take_loads();
        for (i, l) in moe.iter().enumerate() {
            let counts = fresh.get(l);
            for (e, v) in report.layers[i].iter_mut().enumerate() {
                let n = counts.and_then(|c| c.get(e)).copied().unwrap_or(0) as f64;
                *v = *v * LOAD_DECAY + n;
            }
        }
    }
}
