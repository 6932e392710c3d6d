//! `expertmesh status | drain | rebalance`: the control plane from etcd.

use anyhow::{Context, Result, bail};
use clap::Args;
use expertmesh_cluster::keys::{self, DrainRecord, DrainState, Keys, NodeRecord};
use expertmesh_cluster::store::{ClusterStore, Etcd, EtcdOptions};
use expertmesh_coordinator::decide::{ModelShape, View, balancedness, uncovered};
use expertmesh_dataplane::placement::Placement;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct EtcdArgs {
    /// etcd (`--etcd` endpoints, comma-separated, and its TLS and user).
    #[command(flatten)]
    etcd: EtcdOptions,
    #[arg(long, env = "EXPERTMESH_CLUSTER", default_value = "default")]
    cluster: String,
}

#[derive(Args)]
pub struct StatusCmd {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Print JSON.
    #[arg(long, env = "EXPERTMESH_JSON")]
    json: bool,
}

#[derive(Args)]
pub struct DrainCmd {
    /// The expert node to drain.
    node: String,
    #[command(flatten)]
    etcd: EtcdArgs,
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
    etcd: EtcdArgs,
}

async fn connect(a: &EtcdArgs) -> Result<(Etcd, Keys)> {
    if a.etcd.is_empty() {
        bail!("--etcd: at least one endpoint is required");
    }
    if let Err((flag, message)) = a.etcd.validate() {
        bail!("{flag}: {message}");
    }
    let store = Etcd::connect(&a.etcd).await.with_context(|| format!("--etcd {}", a.etcd.endpoints.join(",")))?;
    Ok((store, Keys::new(&a.cluster)))
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

pub fn cmd_status(a: StatusCmd) -> Result<()> {
    runtime()?.block_on(async {
        let (s, k) = connect(&a.etcd).await?;
        let nodes: BTreeMap<String, NodeRecord> = records(&s, &k.nodes()).await?;
        let drains: BTreeMap<String, DrainRecord> = records(&s, &k.drains()).await?;
        let loads = records(&s, &k.loads()).await?.into_values().collect();
        let leader = s.get(&k.leader()).await?.map(|b| String::from_utf8_lossy(&b).into_owned());
        let placement = match s.get(&k.placement()).await? {
            Some(b) => Some(Placement::from_json(&b).context("the placement in etcd")?),
            None => None,
        };
        let view = View {
            nodes,
            loads,
            drains: drains.into_iter().map(|(n, d)| (n, d.state)).collect(),
            placement,
            ..View::default()
        };
        let shape = view.placement.as_ref().map(|p| ModelShape {
            moe_layers: p.layers.keys().copied().collect(),
            experts: p.layers.values().next().map_or(0, Vec::len),
            groups: 1,
        });
        let balance = match (&shape, &view.placement) {
            (Some(sh), Some(p)) => balancedness(&view, sh, p),
            _ => None,
        };
        let state_of = |id: &str, n: &NodeRecord| match view.drains.get(id) {
            Some(DrainState::Requested) => "draining",
            Some(DrainState::Drained) => "drained",
            None => n.state.as_str(),
        };
        let held = |id: &str| view.placement.as_ref().map_or(0, |p| p.experts_of(id).len());
        let version = view.placement.as_ref().map_or(0, |p| p.version);
        if a.json {
            let nodes: Vec<_> = view
                .nodes
                .iter()
                .map(|(id, n)| json!({"id": id, "addr": n.addr, "state": state_of(id, n), "experts": held(id)}))
                .collect();
            let out = json!({
                "leader": leader,
                "nodes": nodes,
                "placement": {"version": version, "uncovered": uncovered(&view)},
                "balancedness": balance,
            });
            println!("{out}");
            return Ok(());
        }
        println!("leader: {}", leader.as_deref().unwrap_or("(none)"));
        println!("placement: version {version}, {} experts uncovered", uncovered(&view));
        match balance {
            Some(b) => println!("balancedness: {b:.3}"),
            None => println!("balancedness: (no load reported yet)"),
        }
        println!("{:<16} {:<22} {:<10} {:>8}", "NODE", "ADDRESS", "STATE", "EXPERTS");
        for (id, n) in &view.nodes {
            println!("{id:<16} {:<22} {:<10} {:>8}", n.addr, state_of(id, n), held(id));
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
