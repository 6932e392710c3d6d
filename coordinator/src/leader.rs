//! The coordinator process: listeners, membership, election, and the
//! leader's loop (decide, plan, apply, reconcile).

use crate::apply;
use crate::decide::{LeaderState, ModelShape, Policy, Trigger, View, decide, plan_next};
use crate::metrics::CoordMetrics;
use crate::{Bound, Config, CoordError};
use expertmesh_cluster::election::Election;
use expertmesh_cluster::keys::{self, CoordinatorRecord, DrainRecord, Keys, NodeState};
use expertmesh_cluster::membership::{Registration, Snapshot, watch_prefix};
use expertmesh_cluster::store::{ClusterStore, Etcd};
use expertmesh_cluster::view::PlacementReader;
use expertmesh_plumbing::internal_tls::{InternalTls, server_builder};
use expertmesh_plumbing::listen::Listeners;
use expertmesh_spec::model_config::ModelConfig;
use expertmesh_spec::placement::Placement;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const TICK: Duration = Duration::from_millis(500);

/// Everything the leader follows in etcd.
struct Watches {
    nodes: watch::Receiver<Snapshot>,
    routers: watch::Receiver<Snapshot>,
    loads: watch::Receiver<Snapshot>,
    drains: watch::Receiver<Snapshot>,
    rebalance: watch::Receiver<Snapshot>,
    placement: watch::Receiver<Snapshot>,
    /// The `placement` key, read so that garbage keeps the last good plan.
    reader: PlacementReader,
}

fn records<T: for<'de> serde::Deserialize<'de>>(snap: &Snapshot, prefix: &str) -> BTreeMap<String, T> {
    snap.iter()
        .filter_map(|(k, v)| {
            let id = Keys::id_of(k, prefix)?;
            match keys::decode(k, v) {
                Ok(r) => Some((id.to_string(), r)),
                Err(e) => {
                    tracing::warn!(error = %e, "skipping a malformed record");
                    None
                }
            }
        })
        .collect()
}

impl Watches {
    fn new(store: &Arc<dyn ClusterStore>, k: &Keys, shutdown: &CancellationToken) -> Self {
        let follow = |prefix: String| watch_prefix(store.clone(), prefix, shutdown.clone());
        Watches {
            nodes: follow(k.nodes()),
            routers: follow(k.routers()),
            loads: follow(k.loads()),
            drains: follow(k.drains()),
            rebalance: follow(k.rebalance()),
            placement: follow(k.placement()),
            reader: PlacementReader::default(),
        }
    }

    fn view(&mut self, k: &Keys, model: &ModelConfig, metrics: &CoordMetrics) -> View {
        let drains: BTreeMap<String, DrainRecord> = records(&self.drains.borrow(), &k.drains());
        let value = self.placement.borrow().get(&k.placement()).cloned();
        let (placement, bad) = self.reader.read(value.as_deref(), model);
        let placement = placement.cloned();
        if let Some(e) = bad {
            metrics.invalid_placements.inc();
            tracing::error!(error = %e, "the placement in etcd is invalid; keeping the last good one");
        }
        View {
            nodes: records(&self.nodes.borrow(), &k.nodes()),
            routers: records(&self.routers.borrow(), &k.routers()),
            loads: records(&self.loads.borrow(), &k.loads()).into_values().collect(),
            drains: drains.into_iter().map(|(n, d)| (n, d.state)).collect(),
            rebalance: self.rebalance.borrow().get(&k.rebalance()).cloned(),
            placement,
        }
    }
}

/// `/metrics` and the gRPC health endpoint; a listener that fails later
/// turns health to `NOT_SERVING` and is logged.
async fn serve_listeners(
    cfg: &Config,
    tls: Option<&InternalTls>,
    metrics: Arc<CoordMetrics>,
    stop: CancellationToken,
) -> Result<Bound, CoordError> {
    let listeners = Arc::new(Listeners::default());
    let mut bound = Bound::default();
    if let Some(addr) = cfg.metrics {
        let served =
            expertmesh_plumbing::metrics::serve(addr, metrics.registry.clone(), stop.clone(), listeners.clone()).await;
        bound.metrics = Some(served.map_err(|source| CoordError::Listen { addr, source })?);
    }
    if let Some(addr) = cfg.listen {
        let l = tokio::net::TcpListener::bind(addr).await.map_err(|source| CoordError::Listen { addr, source })?;
        bound.grpc = Some(l.local_addr().map_err(|source| CoordError::Listen { addr, source })?);
        let (health, service) = tonic_health::server::health_reporter();
        health.set_service_status("", tonic_health::ServingStatus::Serving).await;
        let mut builder =
            server_builder(tls).map_err(|e| CoordError::Config { flag: "--internal-cert", message: e.to_string() })?;
        let reflection = expertmesh_plumbing::listen::reflection(&[tonic_health::pb::FILE_DESCRIPTOR_SET])
            .map_err(CoordError::Internal)?;
        let (s, watched) = (stop.clone(), listeners.clone());
        tokio::spawn(async move {
            let incoming = expertmesh_plumbing::listen::nodelay_incoming(l);
            let stopped = s.clone();
            let server = builder
                .add_routes(reflection)
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async move { stopped.cancelled().await });
            watched.run("grpc", server, &s).await;
        });
        tokio::spawn(async move {
            tokio::select! {
                _ = listeners.failed() => health.set_service_status("", tonic_health::ServingStatus::NotServing).await,
                _ = stop.cancelled() => {}
            }
        });
    }
    Ok(bound)
}

/// What the leader's loop works with.
struct Leader {
    cfg: Config,
    model: ModelConfig,
    shape: ModelShape,
    policy: Policy,
    keys: Keys,
    store: Arc<dyn ClusterStore>,
    nodes: apply::Nodes,
    metrics: Arc<CoordMetrics>,
}

/// What the leader remembers between ticks, reset when leadership is lost.
#[derive(Default)]
struct Memory {
    st: LeaderState,
    /// Node incarnations whose experts are known loaded.
    reconciled: Option<BTreeMap<String, u64>>,
    /// Our own last write, which may not have come back through the watch.
    published: Option<Placement>,
}

/// Runs until `shutdown`; a leader steps down (revoking its lease) on exit.
pub async fn run(
    cfg: Config,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<Bound>>,
) -> Result<(), CoordError> {
    cfg.validate()?;
    let model = ModelConfig::from_dir(&cfg.model)?;
    let shape = ModelShape::of(&model);
    let policy = Policy {
        min_replicas: cfg.min_replicas,
        redundant: Some(cfg.redundant_experts.unwrap_or(shape.experts / 8)),
        threshold: cfg.rebalance_threshold,
        sustain: Duration::from_secs_f64(cfg.rebalance_after),
    };
    let tls = InternalTls::load(&cfg.internal_tls)
        .map_err(|e| CoordError::Config { flag: "--internal-cert", message: e.to_string() })?;
    let metrics = Arc::new(CoordMetrics::new().map_err(|e| CoordError::Internal(format!("metrics: {e}")))?);
    let addrs = serve_listeners(&cfg, tls.as_ref(), metrics.clone(), shutdown.clone()).await?;
    let store = Etcd::connect_within(cfg.member.etcd(), Duration::from_secs(15))
        .await
        .map_err(|e| CoordError::Config { flag: "--etcd", message: e.to_string() })?;
    let keys = cfg.member.keys();
    let record = CoordinatorRecord { id: cfg.id.clone(), addr: addrs.grpc.map(|a| a.to_string()).unwrap_or_default() };
    let thread_err = |e: std::io::Error| CoordError::Internal(format!("membership thread: {e}"));
    let (etcd, ttl) = (cfg.member.etcd().clone(), cfg.member.ttl());
    let me =
        Registration::start(etcd.clone(), keys.coordinator(&cfg.id), keys::encode(&record), ttl).map_err(thread_err)?;
    let election = Election::start(etcd, keys.leader(), cfg.id.clone(), ttl).map_err(thread_err)?;
    let store: Arc<dyn ClusterStore> = Arc::new(store);
    let mut w = Watches::new(&store, &keys, &shutdown);
    tracing::info!(id = %cfg.id, cluster = %cfg.member.cluster.cluster, "coordinator running");
    if let Some(b) = bound
        && b.send(addrs).is_err()
    {
        tracing::debug!("nobody waits for the bound addresses");
    }
    let leader = Leader { cfg, model, shape, policy, keys, store, nodes: apply::Nodes { tls }, metrics };
    leader.follow(&mut w, election.subscribe(), &shutdown).await;
    leader.metrics.is_leader.set(0);
    // Revoking leadership and membership waits on their threads.
    if let Err(e) = tokio::task::spawn_blocking(move || drop((election, me))).await {
        tracing::warn!(error = %e, "revoking the leases");
    }
    Ok(())
}

impl Leader {
    /// Every tick: observe; while leading, change the placement when due,
    /// else reconcile nodes with it.
    async fn follow(&self, w: &mut Watches, mut leading: watch::Receiver<bool>, shutdown: &CancellationToken) {
        let mut mem = Memory::default();
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
                _ = leading.changed() => {}
            }
            let is_leader = *leading.borrow_and_update();
            let mut view = w.view(&self.keys, &self.model, &self.metrics);
            if let Some(p) = &mem.published
                && view.placement.as_ref().is_none_or(|v| v.version < p.version)
            {
                view.placement = Some(p.clone());
            }
            observe(&self.metrics, &view, &self.shape, is_leader);
            if !is_leader {
                // Requests made before this coordinator leads are not replayed.
                mem = Memory {
                    st: LeaderState { rebalance_seen: view.rebalance.clone(), below_since: None },
                    ..Memory::default()
                };
                continue;
            }
            match decide(&view, &self.shape, &self.policy, &mut mem.st, Instant::now()) {
                Some(trigger) => {
                    let r = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        r = self.change(trigger, &view, &mut w.routers) => r,
                    };
                    match r {
                        Ok(p) => {
                            mem.reconciled = Some(incarnations(&view));
                            mem.published = Some(p);
                        }
                        Err(e) => {
                            tracing::warn!(trigger = trigger.as_str(), error = %e, "placement change failed; retrying")
                        }
                    }
                }
                None => self.reconcile(&view, &mut mem).await,
            }
        }
    }

    /// A node restarted in place, or leadership just changed hands: make
    /// sure every node holds what the placement says.
    async fn reconcile(&self, view: &View, mem: &mut Memory) {
        let Some(p) = &view.placement else { return };
        let now = incarnations(view);
        if mem.reconciled.as_ref() == Some(&now) {
            return;
        }
        match self.nodes.load_all(&restrict(p, view)).await {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(replicas = n, "reloaded experts the placement expects");
                    self.metrics.moved.inc_by(n as u64);
                }
                mem.reconciled = Some(now);
            }
            Err(e) => tracing::warn!(error = %e, "reconcile failed; retrying"),
        }
    }

    /// Plans the next placement and applies it in two phases.
    async fn change(
        &self,
        trigger: Trigger,
        view: &View,
        routers: &mut watch::Receiver<Snapshot>,
    ) -> Result<Placement, CoordError> {
        let t0 = Instant::now();
        let (v, s, p) = (view.clone(), self.shape.clone(), self.policy.clone());
        let (next, planned) = tokio::task::spawn_blocking(move || plan_next(&v, &s, &p))
            .await
            .map_err(|e| CoordError::Internal(e.to_string()))??;
        tracing::info!(
            trigger = trigger.as_str(),
            version = next.version,
            nodes = next.nodes.len(),
            planned,
            "applying placement"
        );
        let (k, id) = (&self.keys, &self.cfg.id);
        let loaded = self.nodes.load_all(&next).await?;
        apply::publish(&*self.store, k, id, &next).await?;
        apply::wait_for_routers(routers, k, next.version, Duration::from_secs_f64(self.cfg.router_ack_timeout)).await;
        let live: BTreeMap<String, String> = view.nodes.iter().map(|(n, r)| (n.clone(), r.addr.clone())).collect();
        self.nodes.unload_extra(&next, &live).await;
        apply::mark_drained(&*self.store, k, id, &view.drains, &next).await?;
        let m = &self.metrics;
        m.rebalances.with_label_values(&[trigger.as_str()]).inc();
        m.rebalance_seconds.observe(t0.elapsed().as_secs_f64());
        m.moved.inc_by(loaded as u64);
        m.placement_version.set(next.version as i64);
        tracing::info!(version = next.version, loaded, seconds = t0.elapsed().as_secs_f64(), "placement applied");
        Ok(next)
    }
}

/// The placement restricted to nodes that are alive at the placement's address.
fn restrict(p: &Placement, v: &View) -> Placement {
    let mut r = p.clone();
    r.nodes.retain(|n, addr| v.nodes.get(n).is_some_and(|rec| &rec.addr == addr));
    r
}

fn incarnations(v: &View) -> BTreeMap<String, u64> {
    v.nodes.iter().map(|(n, r)| (n.clone(), r.incarnation)).collect()
}

fn observe(m: &CoordMetrics, v: &View, shape: &ModelShape, is_leader: bool) {
    m.is_leader.set(is_leader as i64);
    for s in [NodeState::Joining, NodeState::Ready, NodeState::Draining] {
        m.nodes.with_label_values(&[s.as_str()]).set(v.nodes.values().filter(|n| n.state == s).count() as i64);
    }
    let drained = v.drains.values().filter(|d| **d == keys::DrainState::Drained).count();
    m.nodes.with_label_values(&["drained"]).set(drained as i64);
    m.placement_version.set(v.placement.as_ref().map_or(0, |p| p.version) as i64);
    // Without a placement nothing is served: every expert counts as uncovered.
    m.uncovered.set(v.coverage().uncovered().unwrap_or(shape.total_experts()) as i64);
}
