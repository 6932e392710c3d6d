//! The coordinator process: listeners, membership, election, and the
//! leader's loop (decide, plan, apply, reconcile).

use crate::apply;
use crate::decide::{LeaderState, ModelShape, Policy, Trigger, View, decide, plan_next, uncovered};
use crate::metrics::CoordMetrics;
use crate::{Bound, Config, CoordError};
use expertmesh_cluster::election::Election;
use expertmesh_cluster::keys::{self, CoordinatorRecord, DrainRecord, Keys, NodeState};
use expertmesh_cluster::membership::{Registration, Snapshot, watch_prefix};
use expertmesh_cluster::store::{ClusterStore, Etcd};
use expertmesh_dataplane::placement::Placement;
use expertmesh_dataplane::tls::{InternalTls, server_builder};
use expertmesh_model::config::ModelConfig;
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
    fn view(&self, k: &Keys) -> View {
        let drains: BTreeMap<String, DrainRecord> = records(&self.drains.borrow(), &k.drains());
        View {
            nodes: records(&self.nodes.borrow(), &k.nodes()),
            routers: records(&self.routers.borrow(), &k.routers()),
            loads: records(&self.loads.borrow(), &k.loads()).into_values().collect(),
            drains: drains.into_iter().map(|(n, d)| (n, d.state)).collect(),
            rebalance: self.rebalance.borrow().get(&k.rebalance()).cloned(),
            placement: self.placement.borrow().get(&k.placement()).and_then(|b| Placement::from_json(b).ok()),
        }
    }
}

async fn serve_listeners(
    cfg: &Config,
    tls: Option<&InternalTls>,
    metrics: Arc<CoordMetrics>,
    stop: CancellationToken,
) -> Result<Bound, CoordError> {
    let mut bound = Bound::default();
    if let Some(addr) = cfg.metrics {
        let served = expertmesh_cluster::metrics::serve(addr, metrics.registry.clone(), stop.clone()).await;
        bound.metrics = Some(served.map_err(|source| CoordError::Listen { addr, source })?);
    }
    if let Some(addr) = cfg.listen {
        let l = tokio::net::TcpListener::bind(addr).await.map_err(|source| CoordError::Listen { addr, source })?;
        bound.grpc = Some(l.local_addr().map_err(|source| CoordError::Listen { addr, source })?);
        let (health, service) = tonic_health::server::health_reporter();
        health.set_service_status("", tonic_health::ServingStatus::Serving).await;
        let s = stop.clone();
        let mut builder =
            server_builder(tls).map_err(|e| CoordError::Config { flag: "--internal-cert", message: e.to_string() })?;
        tokio::spawn(async move {
            let incoming = expertmesh_dataplane::grpc::nodelay_incoming(l);
            let _ = builder
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async move { s.cancelled().await })
                .await;
        });
    }
    Ok(bound)
}

/// Runs until `shutdown`; a leader steps down (revoking its lease) on exit.
pub async fn run(
    cfg: Config,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<Bound>>,
) -> Result<(), CoordError> {
    cfg.validate()?;
    let model = ModelConfig::from_dir(&cfg.model)?;
    let experts = model.moe.n_routed_experts;
    let grouped = model.moe.n_group > 1 && model.moe.topk_group < model.moe.n_group;
    let shape = ModelShape {
        moe_layers: model.moe_layers().collect(),
        experts,
        groups: if grouped && experts.is_multiple_of(model.moe.n_group) { model.moe.n_group } else { 1 },
    };
    let policy = Policy {
        min_replicas: cfg.min_replicas,
        redundant: Some(cfg.redundant_experts.unwrap_or(experts / 8)),
        threshold: cfg.rebalance_threshold,
        sustain: Duration::from_secs_f64(cfg.rebalance_after),
    };
    let tls = InternalTls::load(&cfg.internal_tls)
        .map_err(|e| CoordError::Config { flag: "--internal-cert", message: e.to_string() })?;
    let nodes = apply::Nodes { tls: tls.clone() };
    let metrics = Arc::new(CoordMetrics::new().map_err(|e| CoordError::Internal(format!("metrics: {e}")))?);
    let addrs = serve_listeners(&cfg, tls.as_ref(), metrics.clone(), shutdown.clone()).await?;
    let store = Etcd::connect_within(&cfg.etcd, Duration::from_secs(15))
        .await
        .map_err(|e| CoordError::Config { flag: "--etcd", message: e.to_string() })?;
    let k = Keys::new(&cfg.cluster);
    let ttl = Duration::from_secs(cfg.lease_ttl);
    let record = CoordinatorRecord { id: cfg.id.clone(), addr: addrs.grpc.map(|a| a.to_string()).unwrap_or_default() };
    let thread_err = |e: std::io::Error| CoordError::Internal(format!("membership thread: {e}"));
    let me = Registration::start(cfg.etcd.clone(), k.coordinator(&cfg.id), keys::encode(&record), ttl)
        .map_err(thread_err)?;
    let election = Election::start(cfg.etcd.clone(), k.leader(), cfg.id.clone(), ttl).map_err(thread_err)?;
    let store: Arc<dyn ClusterStore> = Arc::new(store);
    let follow = |prefix: String| watch_prefix(store.clone(), prefix, shutdown.clone());
    let mut w = Watches {
        nodes: follow(k.nodes()),
        routers: follow(k.routers()),
        loads: follow(k.loads()),
        drains: follow(k.drains()),
        rebalance: follow(k.rebalance()),
        placement: follow(k.placement()),
    };
    tracing::info!(id = %cfg.id, cluster = %cfg.cluster, "coordinator running");
    if let Some(b) = bound {
        let _ = b.send(addrs);
    }
    let mut leading = election.subscribe();
    let mut st = LeaderState::default();
    // Node incarnations whose experts are known loaded (reset on gaining leadership).
    let mut reconciled: Option<BTreeMap<String, u64>> = None;
    let mut published: Option<Placement> = None;
    let mut tick = tokio::time::interval(TICK);
    let ack = Duration::from_secs_f64(cfg.router_ack_timeout);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
            _ = leading.changed() => {}
        }
        let is_leader = *leading.borrow_and_update();
        let mut view = w.view(&k);
        // Our own last write may not have come back through the watch yet.
        if let Some(p) = &published
            && view.placement.as_ref().is_none_or(|v| v.version < p.version)
        {
            view.placement = Some(p.clone());
        }
        observe(&metrics, &view, is_leader);
        if !is_leader {
            // Requests made before this coordinator leads are not replayed.
            st = LeaderState { rebalance_seen: view.rebalance.clone(), below_since: None };
            reconciled = None;
            published = None;
            continue;
        }
        let now = Instant::now();
        if let Some(trigger) = decide(&view, &shape, &policy, &mut st, now) {
            let step =
                change(trigger, &view, &shape, &policy, &*store, &k, &cfg.id, &mut w.routers, &metrics, ack, &nodes);
            let r = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = step => r,
            };
            match r {
                Ok(p) => {
                    reconciled = Some(incarnations(&view));
                    published = Some(p);
                }
                Err(e) => tracing::warn!(trigger = trigger.as_str(), error = %e, "placement change failed; retrying"),
            }
        } else if let Some(p) = &view.placement {
            // A node restarted in place, or leadership just changed hands:
            // make sure every node holds what the placement says.
            let now_inc = incarnations(&view);
            if reconciled.as_ref() != Some(&now_inc) {
                match nodes.load_all(&restrict(p, &view)).await {
                    Ok(n) => {
                        if n > 0 {
                            tracing::info!(replicas = n, "reloaded experts the placement expects");
                            metrics.moved.inc_by(n as u64);
                        }
                        reconciled = Some(now_inc);
                    }
                    Err(e) => tracing::warn!(error = %e, "reconcile failed; retrying"),
                }
            }
        }
    }
    metrics.is_leader.set(0);
    // Revoking leadership and membership waits on their threads.
    let _ = tokio::task::spawn_blocking(move || drop((election, me))).await;
    Ok(())
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

fn observe(m: &CoordMetrics, v: &View, is_leader: bool) {
    m.is_leader.set(is_leader as i64);
    for s in [NodeState::Joining, NodeState::Ready, NodeState::Draining] {
        m.nodes.with_label_values(&[s.as_str()]).set(v.nodes.values().filter(|n| n.state == s).count() as i64);
    }
    let drained = v.drains.values().filter(|d| **d == keys::DrainState::Drained).count();
    m.nodes.with_label_values(&["drained"]).set(drained as i64);
    m.placement_version.set(v.placement.as_ref().map_or(0, |p| p.version) as i64);
    m.uncovered.set(uncovered(v) as i64);
}

#[allow(clippy::too_many_arguments)]
async fn change(
    trigger: Trigger,
    view: &View,
    shape: &ModelShape,
    policy: &Policy,
    store: &dyn ClusterStore,
    k: &Keys,
    id: &str,
    routers: &mut watch::Receiver<Snapshot>,
    metrics: &CoordMetrics,
    ack: Duration,
    nodes: &apply::Nodes,
) -> Result<Placement, CoordError> {
    let t0 = Instant::now();
    let (v, s, p) = (view.clone(), shape.clone(), policy.clone());
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
    let loaded = nodes.load_all(&next).await?;
    apply::publish(store, k, id, &next).await?;
    apply::wait_for_routers(routers, k, next.version, ack).await;
    let live: BTreeMap<String, String> = view.nodes.iter().map(|(n, r)| (n.clone(), r.addr.clone())).collect();
    nodes.unload_extra(&next, &live).await;
    apply::mark_drained(store, k, id, &view.drains, &next).await?;
    metrics.rebalances.with_label_values(&[trigger.as_str()]).inc();
    metrics.rebalance_seconds.observe(t0.elapsed().as_secs_f64());
    metrics.moved.inc_by(loaded as u64);
    metrics.placement_version.set(next.version as i64);
    tracing::info!(version = next.version, loaded, seconds = t0.elapsed().as_secs_f64(), "placement applied");
    Ok(next)
}
