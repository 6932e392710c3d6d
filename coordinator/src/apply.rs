//! Applying a placement without dropping a request, in two phases:
//! 1. every node loads the experts the new plan gives it (keeping the old);
//! 2. the placement version flips in etcd (a write fenced on leadership);
//! 3. routers switch at a step boundary and report the version they use;
//! 4. only then do nodes unload what the new plan no longer has them hold.
//!
//! A request in flight runs each step on one plan, old or new, and both are
//! fully loaded while any router may still use them.

use crate::CoordError;
use expertmesh_cluster::keys::{self, DrainRecord, DrainState, Keys, RouterRecord};
use expertmesh_cluster::membership::Snapshot;
use expertmesh_cluster::store::ClusterStore;
use expertmesh_plumbing::internal_tls::InternalTls;
use expertmesh_proto::v1::expert_service_client::ExpertServiceClient;
use expertmesh_proto::v1::{ExpertSet, InfoRequest, LayerExperts};
use expertmesh_spec::placement::Placement;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tokio::sync::watch;

type Experts = BTreeSet<(usize, usize)>;

/// Node RPCs: loading experts reads them from disk, which can take a while.
const RPC_TIMEOUT: Duration = Duration::from_secs(300);

fn node_err(addr: &str) -> impl Fn(tonic::Status) -> CoordError + '_ {
    move |s| CoordError::Node { addr: addr.into(), message: format!("{:?}: {}", s.code(), s.message()) }
}

fn to_set(groups: &[LayerExperts]) -> Experts {
    groups.iter().flat_map(|g| g.experts.iter().map(move |&e| (g.layer as usize, e as usize))).collect()
}

fn to_groups(set: &Experts) -> Vec<LayerExperts> {
    let mut by: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
    for &(l, e) in set {
        by.entry(l).or_default().push(e as u32);
    }
    by.into_iter().map(|(l, experts)| LayerExperts { layer: l as u32, experts }).collect()
}

/// The expert nodes' admin RPCs, over internal mutual TLS when configured.
#[derive(Clone, Default)]
pub struct Nodes {
    pub tls: Option<InternalTls>,
}

impl Nodes {
    async fn client(&self, addr: &str) -> Result<ExpertServiceClient<tonic::transport::Channel>, CoordError> {
        let ep = expertmesh_plumbing::internal_tls::endpoint(self.tls.as_ref(), addr)
            .map_err(|message| CoordError::Node { addr: addr.into(), message })?
            .connect_timeout(Duration::from_secs(2))
            .timeout(RPC_TIMEOUT);
        let ch = ep.connect().await.map_err(|e| CoordError::Node { addr: addr.into(), message: e.to_string() })?;
        Ok(ExpertServiceClient::new(ch))
    }

    /// What a node holds now.
    pub async fn held(&self, addr: &str) -> Result<Experts, CoordError> {
        let info = self.client(addr).await?.info(InfoRequest {}).await.map_err(node_err(addr))?.into_inner();
        Ok(to_set(&info.experts))
    }

    /// Loads onto each node of `p` what `p` gives it and it lacks; returns
    /// the replicas loaded. Nodes are loaded concurrently.
    pub async fn load_all(&self, p: &Placement) -> Result<usize, CoordError> {
        let tasks: Vec<_> = p
            .nodes
            .iter()
            .map(|(id, addr)| {
                let want: Experts = p.experts_of(id).into_iter().collect();
                let (addr, nodes) = (addr.clone(), self.clone());
                tokio::spawn(async move {
                    let missing: Experts = want.difference(&nodes.held(&addr).await?).copied().collect();
                    if !missing.is_empty() {
                        let mut c = nodes.client(&addr).await?;
                        c.load_experts(ExpertSet { experts: to_groups(&missing) }).await.map_err(node_err(&addr))?;
                    }
                    Ok::<usize, CoordError>(missing.len())
                })
            })
            .collect();
        let mut loaded = 0;
        for t in tasks {
            loaded += t.await.map_err(|e| CoordError::Internal(e.to_string()))??;
        }
        Ok(loaded)
    }

    /// Unloads from each live node what `p` does not give it.
    pub async fn unload_extra(&self, p: &Placement, live: &BTreeMap<String, String>) {
        for (id, addr) in live {
            let want: Experts = p.experts_of(id).into_iter().collect();
            let extra = match self.held(addr).await {
                Ok(h) => h.difference(&want).copied().collect::<Experts>(),
                Err(e) => {
                    tracing::warn!(node = %id, error = %e, "cannot list experts to unload");
                    continue;
                }
            };
            if extra.is_empty() {
                continue;
            }
            let r = match self.client(addr).await {
                Ok(mut c) => c.unload_experts(ExpertSet { experts: to_groups(&extra) }).await.map_err(node_err(addr)),
                Err(e) => Err(e),
            };
            match r {
                Ok(_) => tracing::info!(node = %id, experts = extra.len(), "unloaded"),
                Err(e) => tracing::warn!(node = %id, error = %e, "unload failed"),
            }
        }
    }
}

/// Writes `p` as the placement in force, only while `id` leads.
pub async fn publish(store: &dyn ClusterStore, keys: &Keys, id: &str, p: &Placement) -> Result<(), CoordError> {
    let ok = store.put_if(&keys.leader(), id.as_bytes(), &keys.placement(), p.to_json()).await?;
    if ok { Ok(()) } else { Err(CoordError::NotLeader) }
}

/// Waits until every live router uses `version` (or newer), or `timeout`.
/// Routers that die meanwhile drop out of the snapshot and stop counting.
pub async fn wait_for_routers(routers: &mut watch::Receiver<Snapshot>, keys: &Keys, version: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let behind = |snap: &Snapshot| -> Vec<String> {
        snap.iter()
            .filter_map(|(k, v)| {
                let r: RouterRecord = keys::decode(k, v).ok()?;
                (r.placement_version < version && Keys::id_of(k, &keys.routers()).is_some()).then_some(r.id)
            })
            .collect()
    };
    loop {
        let waiting = behind(&routers.borrow_and_update());
        if waiting.is_empty() {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            tracing::warn!(?waiting, version, "routers did not confirm the new placement in time");
            return;
        }
        // Either a router changed or the time is up: both are re-checked above.
        if tokio::time::timeout(left, routers.changed()).await.is_ok_and(|r| r.is_err()) {
            tracing::warn!("the router watch ended; not waiting for acknowledgements");
            return;
        }
    }
}

/// Marks nodes whose drain was requested, and which `p` no longer uses, drained.
pub async fn mark_drained(
    store: &dyn ClusterStore,
    keys: &Keys,
    id: &str,
    drains: &BTreeMap<String, DrainState>,
    p: &Placement,
) -> Result<(), CoordError> {
    for node in drains.iter().filter(|(n, s)| **s == DrainState::Requested && !p.nodes.contains_key(*n)).map(|x| x.0) {
        let rec = keys::encode(&DrainRecord { state: DrainState::Drained });
        if !store.put_if(&keys.leader(), id.as_bytes(), &keys.drain(node), rec).await? {
            return Err(CoordError::NotLeader);
        }
        tracing::info!(%node, "drained");
    }
    Ok(())
}
