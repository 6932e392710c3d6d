//! What `up` tells the world about its cluster, kept true across restarts:
//! the state file, the Prometheus targets file (both written whole to a
//! temporary file and renamed, so a reader never sees half a document), the
//! `supervisor` record in etcd (which `expertmesh status` shows) and, with
//! `--metrics`, `expertmesh_up_restarts_total{child}`.

use super::child::Kind;
use super::supervisor::Supervisor;
use super::{Cluster, field};
use anyhow::{Context, Result};
use expertmesh_cluster::etcd_server::EtcdServer;
use expertmesh_cluster::keys::{self, ChildRecord, Keys, SupervisorRecord};
use expertmesh_cluster::membership::Registration;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub struct Report {
    pub restarts: prometheus::IntCounterVec,
    record: Registration,
    /// Stops the metrics server.
    stop: CancellationToken,
}

impl Drop for Report {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Writes `v` to `path` whole: a temporary file, then a rename.
pub fn write_atomically(path: &Path, v: &Value, flag: &str) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, serde_json::to_string_pretty(v)?)
        .and_then(|_| std::fs::rename(&tmp, path))
        .with_context(|| format!("{flag} {}", path.display()))
}

impl Report {
    pub fn start(c: &Cluster<'_>, rt: &tokio::runtime::Runtime) -> Result<Self> {
        let restarts = prometheus::IntCounterVec::new(
            prometheus::Opts::new("expertmesh_up_restarts_total", "Children expertmesh up restarted, by child"),
            &["child"],
        )?;
        let stop = CancellationToken::new();
        if let Some(addr) = c.a.metrics {
            let registry = expertmesh_plumbing::metrics::registry("up")?;
            registry.register(Box::new(restarts.clone()))?;
            let listeners = Arc::new(expertmesh_plumbing::listen::Listeners::default());
            let bound = rt
                .block_on(expertmesh_plumbing::metrics::serve(addr, registry, stop.clone(), listeners))
                .with_context(|| format!("--metrics {addr}"))?;
            eprintln!("up: metrics on http://{bound}/metrics");
        }
        let key = Keys::new(&c.a.cluster).supervisor();
        let ttl = std::time::Duration::from_secs(c.a.lease_ttl);
        let first = keys::encode(&SupervisorRecord { pid: std::process::id(), ..Default::default() });
        let record =
            Registration::start(c.etcd_options(), key, first, ttl).context("the supervisor record's thread")?;
        Ok(Report { restarts, record, stop })
    }

    /// Rewrites everything from the children's current incarnations.
    pub fn write(&self, c: &Cluster<'_>, sup: &Supervisor) -> Result<()> {
        self.record.update(keys::encode(&supervisor_record(sup)));
        // The state file last: scripts take its appearance as "up", so the
        // targets must already be there.
        if let Some(f) = &c.a.prometheus_targets {
            write_atomically(f, &targets(c, sup), "--prometheus-targets")?;
        }
        if let Some(f) = &c.a.state_file {
            write_atomically(f, &state(c, sup), "--state-file")?;
        }
        Ok(())
    }
}

fn supervisor_record(sup: &Supervisor) -> SupervisorRecord {
    let children = sup
        .children
        .iter()
        .map(|c| {
            let r = ChildRecord {
                pid: c.pid().unwrap_or(0),
                restarts: c.restarts,
                last_exit: c.last_exit.clone(),
                log: c.log.display().to_string(),
            };
            (c.spec.name.clone(), r)
        })
        .collect();
    SupervisorRecord { pid: std::process::id(), children }
}

fn state(c: &Cluster<'_>, sup: &Supervisor) -> Value {
    let line = |name: &str| sup.get(name).and_then(|s| s.start_line()).unwrap_or_default().to_string();
    let of = |k: Kind| sup.children.iter().filter(move |s| s.spec.kind == k);
    let router = line("router");
    let nodes: Vec<Value> = of(Kind::Node)
        .map(|s| {
            let l = line(&s.spec.name);
            json!({"id": s.spec.name, "pid": s.pid(), "addr": field(&l, "grpc="), "metrics": field(&l, "metrics="), "restarts": s.restarts})
        })
        .collect();
    let coordinators: Vec<Value> = of(Kind::Coordinator)
        .map(|s| {
            let l = line(&s.spec.name);
            json!({"id": s.spec.name, "pid": s.pid(), "grpc": field(&l, "grpc="), "metrics": field(&l, "metrics="), "restarts": s.restarts})
        })
        .collect();
    json!({
        "router": {"pid": sup.get("router").and_then(|s| s.pid()), "grpc": field(&router, "grpc="), "http": field(&router, "http="),
                   "restarts": sup.get("router").map_or(0, |s| s.restarts)},
        "expert_nodes": nodes,
        "coordinators": coordinators,
        "etcd": {"url": c.etcd_url, "pid": c.etcd.and_then(EtcdServer::pid), "cluster": c.a.cluster},
        "tls": c.pki.map(|p| json!({"ca": p.ca, "cert": p.internal.cert, "key": p.internal.key})),
        "logs": c.logs,
    })
}

fn targets(c: &Cluster<'_>, sup: &Supervisor) -> Value {
    let model = c.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let target = |addr: String, component: &str, id: &str| json!({"targets": [addr], "labels": {"component": component, "id": id, "cluster": c.a.cluster, "model": model, "__scheme__": c.scheme()}});
    let line = |name: &str| sup.get(name).and_then(|s| s.start_line()).unwrap_or_default().to_string();
    let mut t = vec![target(field(&line("router"), "http="), "router", "router-0")];
    for s in sup.children.iter().filter(|s| s.spec.kind == Kind::Node) {
        t.push(target(field(&line(&s.spec.name), "metrics="), "expert-node", &s.spec.name));
    }
    t.push(target(field(&line("coordinator-0"), "metrics="), "coordinator", "coordinator-0"));
    json!(t)
}
