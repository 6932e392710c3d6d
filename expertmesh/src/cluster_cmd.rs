//! `expertmesh status | drain | rebalance`: the control plane from etcd.

use anyhow::{Context, Result, bail};
use clap::Args;
use expertmesh_cluster::args::ClusterArgs;
use expertmesh_cluster::keys::{self, DrainRecord, DrainState, Keys, NodeRecord, RouterRecord, SupervisorRecord};
use expertmesh_cluster::store::{ClusterStore, Etcd};
use expertmesh_cluster::view::{Coverage, View};
use expertmesh_spec::placement::Placement;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct StatusCmd {
    #[command(flatten)]
    etcd: ClusterArgs,
    /// Print JSON.
    #[arg(long, env = "EXPERTMESH_JSON")]
    json: bool,
}

#[derive(Args)]
pub struct DrainCmd {
    /// The expert node to drain.
    node: String,
    #[command(flatten)]
    etcd: ClusterArgs,
    /// Lift a drain instead: the node may hold experts again.
    #[arg(long, env = "EXPERTMESH_CANCEL")]
    cancel: bool,
    /// Seconds to wait for the leader to finish the drain (0: do not wait).
    #[arg(long, env = "EXPERTMESH_WAIT", default_value_t = 120.0)]
    wait: f64,
}

#[derive(Args)]
pub struct RebalanceCmd {
    #[command(flatten)]
    etcd: ClusterArgs,
}

async fn connect(a: &ClusterArgs) -> Result<(Etcd, Keys)> {
    if a.etcd.is_empty() {
        bail!("--etcd: at least one endpoint is required");
    }
    if let Err((flag, message)) = a.validate() {
        bail!("{flag}: {message}");
    }
    let store = Etcd::connect(&a.etcd).await.with_context(|| format!("--etcd {}", a.etcd.endpoints.join(",")))?;
    Ok((store, a.keys()))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

async fn records<T: for<'de> serde::Deserialize<'de>>(s: &Etcd, prefix: &str) -> Result<BTreeMap<String, T>> {
    let mut out = BTreeMap::new();
    for (k, v) in s.list(prefix).await?.entries {
        if let Some(id) = Keys::id_of(&k, prefix) {
            out.insert(id.to_string(), keys::decode(&k, &v)?);
        }
    }
    Ok(out)
}

/// Whether the cluster has settled on every node in `nodes`: a placement
/// names each of them and every live router steps on that very version.
/// `up` waits for this, not only for the router's `/ready`: the first
/// placement may cover every expert before the last node has joined, and
/// the join's re-placement follows a moment later.
pub(crate) async fn settled(s: &Etcd, k: &Keys, nodes: &[&str]) -> Result<bool> {
    let st = Status::read(s, k).await?;
    let Some(p) = &st.view.placement else { return Ok(false) };
    Ok(nodes.iter().all(|n| p.nodes.contains_key(*n))
        && !st.view.routers.is_empty()
        && st.view.routers.values().all(|r| r.placement_version == p.version))
}

/// What `status` shows, read from etcd.
struct Status {
    view: View,
    leader: Option<String>,
    supervisor: Option<SupervisorRecord>,
    /// Why the `placement` key did not parse, if it did not.
    invalid_placement: Option<String>,
}

impl Status {
    async fn read(s: &Etcd, k: &Keys) -> Result<Self> {
        let drains: BTreeMap<String, DrainRecord> = records(s, &k.drains()).await?;
        let (placement, invalid_placement) = match s.get(&k.placement()).await? {
            Some(b) => match Placement::from_json(&b) {
                Ok(p) => (Some(p), None),
                Err(e) => (None, Some(e.to_string())),
            },
            None => (None, None),
        };
        let view = View {
            nodes: records(s, &k.nodes()).await?,
            routers: records(s, &k.routers()).await?,
            loads: records(s, &k.loads()).await?.into_values().collect(),
            drains: drains.into_iter().map(|(n, d)| (n, d.state)).collect(),
            placement,
            ..View::default()
        };
        let leader = s.get(&k.leader()).await?.map(|b| String::from_utf8_lossy(&b).into_owned());
        let supervisor = match s.get(&k.supervisor()).await? {
            Some(b) => Some(keys::decode(&k.supervisor(), &b)?),
            None => None,
        };
        Ok(Status { view, leader, supervisor, invalid_placement })
    }

    /// A placement exists and every live router steps on one.
    fn in_force(&self) -> bool {
        self.view.placement.is_some() && self.view.routers.values().all(|r| r.placement_version > 0)
    }

    fn node_state(&self, id: &str, n: &NodeRecord) -> &'static str {
        match self.view.drains.get(id) {
            Some(DrainState::Requested) => "draining",
            Some(DrainState::Drained) => "drained",
            None => n.state.as_str(),
        }
    }

    fn held(&self, id: &str) -> usize {
        self.view.placement.as_ref().map_or(0, |p| p.experts_of(id).len())
    }

    fn restarts(&self, id: &str) -> Option<u32> {
        self.supervisor.as_ref().and_then(|s| s.children.get(id)).map(|c| c.restarts)
    }

    fn balance(&self) -> Option<f64> {
        let p = self.view.placement.as_ref()?;
        self.view.balancedness(&self.view.shape()?, p)
    }

    fn json(&self) -> serde_json::Value {
        let v = &self.view;
        let nodes: Vec<_> = v
            .nodes
            .iter()
            .map(|(id, n)| {
                json!({"id": id, "addr": n.addr, "state": self.node_state(id, n), "experts": self.held(id), "restarts": self.restarts(id)})
            })
            .collect();
        let routers: Vec<_> = v
            .routers
            .values()
            .map(|r: &RouterRecord| json!({"id": r.id, "placement_version": r.placement_version}))
            .collect();
        json!({
            "leader": self.leader,
            "nodes": nodes,
            "routers": routers,
            "placement": {
                "version": v.placement.as_ref().map_or(0, |p| p.version),
                "in_force": self.in_force(),
                "uncovered": v.coverage().uncovered(),
                "invalid": self.invalid_placement,
            },
            "balancedness": self.balance(),
            "supervisor": self.supervisor,
        })
    }

    fn print(&self) {
        let v = &self.view;
        println!("leader: {}", self.leader.as_deref().unwrap_or("(none)"));
        match v.coverage() {
            Coverage::NoPlacement { .. } if self.invalid_placement.is_some() => {
                let e = self.invalid_placement.as_deref().unwrap_or_default();
                println!("placement: the placement key in etcd is invalid ({e}); components keep their last good one");
            }
            Coverage::NoPlacement { .. } => println!("placement: no placement yet (every expert uncovered)"),
            Coverage::Placed { uncovered } => {
                let version = v.placement.as_ref().map_or(0, |p| p.version);
                let routers = if self.in_force() { "" } else { " (not yet in use by every router)" };
                println!("placement: version {version}, {uncovered} experts uncovered{routers}");
            }
        }
        match self.balance() {
            Some(b) => println!("balancedness: {b:.3}"),
            None => println!("balancedness: (no load reported yet)"),
        }
        println!("{:<16} {:<22} {:<10} {:>8} {:>9}", "NODE", "ADDRESS", "STATE", "EXPERTS", "RESTARTS");
        for (id, n) in &v.nodes {
            let restarts = self.restarts(id).map_or("-".to_string(), |r| r.to_string());
            println!("{id:<16} {:<22} {:<10} {:>8} {restarts:>9}", n.addr, self.node_state(id, n), self.held(id));
        }
        for r in v.routers.values() {
            println!("router {} uses placement version {}", r.id, r.placement_version);
        }
        if let Some(s) = &self.supervisor {
            for (name, c) in s.children.iter().filter(|(_, c)| c.restarts > 0) {
                let why = c.last_exit.as_deref().unwrap_or("?");
                println!("{name} restarted {} times by expertmesh up (last exit: {why}; log {})", c.restarts, c.log);
            }
        }
    }
}

pub fn cmd_status(a: StatusCmd) -> Result<()> {
    runtime()?.block_on(async {
        let (s, k) = connect(&a.etcd).await?;
        let st = Status::read(&s, &k).await?;
        if a.json {
            println!("{}", st.json());
        } else {
            st.print();
        }
        Ok(())
    })
}

pub fn cmd_drain(a: DrainCmd) -> Result<()> {
    runtime()?.block_on(async {
        let (s, k) = connect(&a.etcd).await?;
        if a.cancel {
            s.delete(&k.drain(&a.node)).await?;
            println!("drain of {} lifted", a.node);
            return Ok(());
        }
        if s.get(&k.node(&a.node)).await?.is_none() {
            bail!("no expert node {:?} in cluster {:?}", a.node, a.etcd.cluster);
        }
        s.put(&k.drain(&a.node), keys::encode(&DrainRecord { state: DrainState::Requested }), None).await?;
        println!("drain of {} requested", a.node);
        if a.wait <= 0.0 {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs_f64(a.wait);
        while Instant::now() < deadline {
            if let Some(b) = s.get(&k.drain(&a.node)).await?
                && keys::decode::<DrainRecord>(&k.drain(&a.node), &b)?.state == DrainState::Drained
            {
                println!("{} drained: it holds no experts any router uses", a.node);
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!("{} not drained after {}s (is a coordinator running?)", a.node, a.wait)
    })
}

pub fn cmd_rebalance(a: RebalanceCmd) -> Result<()> {
    runtime()?.block_on(async {
        let (s, k) = connect(&a.etcd).await?;
        let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        s.put(&k.rebalance(), nonce.to_string().into_bytes(), None).await?;
        println!("rebalance requested");
        Ok(())
    })
}
