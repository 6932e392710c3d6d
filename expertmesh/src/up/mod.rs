//! `expertmesh up`: a local cluster as child processes on loopback: etcd
//! (private, unless `--etcd` names one), a coordinator, N expert nodes and a
//! router. The nodes and the router join through etcd; the coordinator
//! places every expert on R distinct nodes and the router serves once every
//! expert is covered.
//!
//! `up` is a supervisor ([`supervisor`]): a child that exits is started
//! again with backoff, each restart is logged, counted
//! (`expertmesh_up_restarts_total` on `--metrics`) and shown by
//! `expertmesh status` (the `supervisor` key in etcd), and the state file
//! is rewritten with the new pids and addresses. A child that keeps failing
//! right after starting stops the cluster, naming it and its log. Every
//! child's stderr goes to `up`'s stderr and to its own log file.
//!
//! With `--tls` it first makes a throwaway CA ([`crate::certs`]): etcd
//! serves TLS and checks client certificates, the processes talk mutual TLS,
//! and the router's public listeners serve TLS. Children inherit `up`'s
//! environment (so `EXPERTMESH_API_KEY` and the like reach the router);
//! the flags `up` passes take precedence over it.
//!
//! Children are tied to this process twice over: on Linux each gets
//! `PR_SET_PDEATHSIG = SIGKILL`, so even `kill -9` of `up` takes them along;
//! and on Ctrl-C/SIGTERM `up` sends them SIGTERM (they drain), waits, then
//! kills what is left and removes the state file.

mod child;
mod state;
mod supervisor;

use crate::certs::LocalPki;
use crate::cluster_cmd::settled;
use anyhow::{Context, Result, bail};
use child::{Kind, Spec};
use clap::Args;
use expertmesh_cluster::etcd_server::{EtcdServer, EtcdTls};
use expertmesh_cluster::keys::Keys;
use expertmesh_cluster::store::{Etcd, EtcdOptions};
use expertmesh_model::config::ModelConfig;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use supervisor::{Supervised, Supervisor};

#[derive(Args)]
pub struct UpCmd {
    /// Checkpoint directory.
    #[arg(long, env = "EXPERTMESH_MODEL", required_unless_present = "demo")]
    pub model: Option<PathBuf>,
    /// Serve the small trained demo model committed in the source tree
    /// (`model/demo`; `expertmesh gen-model` writes random ones).
    #[arg(long, conflicts_with = "model", env = "EXPERTMESH_DEMO")]
    pub demo: bool,
    #[arg(long, env = "EXPERTMESH_EXPERT_NODES", default_value_t = 2)]
    pub expert_nodes: usize,
    /// Distinct nodes holding each expert (2 or more: losing a node loses
    /// no request).
    #[arg(long, env = "EXPERTMESH_REPLICAS", default_value_t = 2)]
    pub replicas: usize,
    #[arg(long, env = "EXPERTMESH_GRPC_PORT", default_value_t = 50051)]
    pub grpc_port: u16,
    #[arg(long, env = "EXPERTMESH_HTTP_PORT", default_value_t = 8080)]
    pub http_port: u16,
    /// Written once every component serves (atomically, and again after
    /// each restart); removed on exit.
    #[arg(long, env = "EXPERTMESH_STATE_FILE")]
    pub state_file: Option<PathBuf>,
    /// Write Prometheus file_sd targets (every component's /metrics, labelled
    /// component, id, cluster, model) here; deploy/prometheus/prometheus.yml reads it.
    #[arg(long, env = "EXPERTMESH_PROMETHEUS_TARGETS")]
    pub prometheus_targets: Option<PathBuf>,
    /// Compute threads per expert node.
    #[arg(long, env = "EXPERTMESH_THREADS_PER_NODE")]
    pub threads_per_node: Option<usize>,
    /// Use this etcd instead of starting a private one.
    #[arg(long, env = "EXPERTMESH_ETCD")]
    pub etcd: Option<String>,
    #[arg(long, env = "EXPERTMESH_CLUSTER", default_value = "local")]
    pub cluster: String,
    /// Membership lease TTL in seconds for every component.
    #[arg(long, env = "EXPERTMESH_LEASE_TTL", default_value_t = 10)]
    pub lease_ttl: u64,
    /// Secure the cluster with a throwaway CA: TLS on the router's public
    /// listeners, mutual TLS between the processes, TLS with client
    /// certificates to the private etcd. The CA is written next to the
    /// state file's other paths and printed.
    #[arg(long, env = "EXPERTMESH_TLS", conflicts_with = "etcd")]
    pub tls: bool,
    /// Seconds the cluster may go without progress while it starts (a
    /// component serving, a node ready, a placement): a large model keeps
    /// loading as long as it takes, a stuck one is reported.
    #[arg(long, env = "EXPERTMESH_START_TIMEOUT", default_value_t = 300.0)]
    pub start_timeout: f64,
    /// Serve `up`'s own /metrics (restarts per child) on this address.
    #[arg(long, env = "EXPERTMESH_METRICS")]
    pub metrics: Option<SocketAddr>,
}

/// A workspace binary installed next to `expertmesh`.
fn sibling(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().context("locating the expertmesh binary")?;
    let p = me.with_file_name(name);
    if !p.exists() {
        bail!(
            "{} not found next to {}: build the whole workspace (cargo build --release --workspace)",
            name,
            me.display()
        );
    }
    Ok(p)
}

fn validate(a: &UpCmd) -> Result<()> {
    if a.expert_nodes == 0 {
        bail!("--expert-nodes must be at least 1");
    }
    if a.replicas == 0 || a.replicas > a.expert_nodes {
        bail!("--replicas must be between 1 and --expert-nodes ({})", a.expert_nodes);
    }
    if !(a.start_timeout > 0.0 && a.start_timeout.is_finite()) {
        bail!("--start-timeout must be a positive number of seconds");
    }
    if a.lease_ttl == 0 {
        bail!("--lease-ttl must be at least 1 second");
    }
    Ok(())
}

pub fn up(a: UpCmd, model: PathBuf, stop: &AtomicBool) -> Result<()> {
    validate(&a)?;
    let cfg = ModelConfig::from_dir(&model).with_context(|| format!("--model {}", model.display()))?;
    let nodes = match cfg.moe_layers().count() {
        0 => {
            eprintln!(
                "up: {} is a dense {} model (no MoE layers, no routed experts): no expert nodes are started, \
                 the router serves it alone",
                model.display(),
                cfg.arch.name()
            );
            0
        }
        _ => a.expert_nodes,
    };
    let run_dir = std::env::temp_dir().join(format!("expertmesh-up-{}", std::process::id()));
    std::fs::create_dir_all(run_dir.join("logs"))?;
    let result = run(&a, &model, nodes, &run_dir, stop);
    for f in [&a.state_file, &a.prometheus_targets].into_iter().flatten() {
        if let Err(e) = std::fs::remove_file(f)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("up: removing {}: {e}", f.display());
        }
    }
    // The logs a failure points at stay for the reader; the private etcd's
    // data (its WAL preallocates ~128 MB) and the certificates never do.
    let gone: Vec<PathBuf> = match &result {
        Err(_) => {
            eprintln!("up: logs kept in {}", run_dir.join("logs").display());
            vec![run_dir.join("etcd"), run_dir.join("tls")]
        }
        Ok(()) => vec![run_dir.clone()],
    };
    for d in gone {
        if let Err(e) = std::fs::remove_dir_all(&d)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("up: removing {}: {e}", d.display());
        }
    }
    result
}

/// The certificates (with `--tls`), etcd, then the processes; everything
/// started is stopped on return, children first, etcd last.
fn run(a: &UpCmd, model: &Path, nodes: usize, run_dir: &Path, stop: &AtomicBool) -> Result<()> {
    let pki = if a.tls { Some(crate::certs::make(&run_dir.join("tls"))?) } else { None };
    let etcd_tls =
        pki.as_ref().map(|p| EtcdTls { ca: p.ca.clone(), cert: p.internal.cert.clone(), key: p.internal.key.clone() });
    // Dropped last: children go first, then the private etcd.
    let etcd = match &a.etcd {
        Some(_) => None,
        None => Some(EtcdServer::start_with(&run_dir.join("etcd"), etcd_tls).map_err(|e| anyhow::anyhow!("{e}"))?),
    };
    let etcd_url = a.etcd.clone().or_else(|| etcd.as_ref().map(EtcdServer::url)).unwrap_or_default();
    let logs = run_dir.join("logs");
    let cluster = Cluster { a, model, nodes, etcd_url: &etcd_url, etcd: etcd.as_ref(), pki: pki.as_ref(), logs };
    let r = cluster.serve(stop);
    drop(etcd);
    r
}

/// Flags naming a file, as `--flag PATH` pairs.
fn file_args(pairs: &[(&str, &Path)]) -> Vec<String> {
    pairs.iter().flat_map(|(f, p)| [f.to_string(), p.to_string_lossy().into_owned()]).collect()
}

/// What the cluster's children are started from.
struct Cluster<'a> {
    a: &'a UpCmd,
    model: &'a Path,
    /// Expert nodes to start: `--expert-nodes`, or none for a dense model.
    nodes: usize,
    etcd_url: &'a str,
    etcd: Option<&'a EtcdServer>,
    pki: Option<&'a LocalPki>,
    logs: PathBuf,
}

impl Cluster<'_> {
    /// How `up` itself reaches etcd (private or `--etcd`).
    fn etcd_options(&self) -> EtcdOptions {
        match self.etcd {
            Some(e) => e.options(),
            None => EtcdOptions { endpoints: vec![self.etcd_url.to_string()], ..Default::default() },
        }
    }

    /// `--etcd-*` flags for a TLS etcd.
    fn etcd_flags(&self) -> Vec<String> {
        self.pki
            .map(|p| {
                file_args(&[("--etcd-ca", &p.ca), ("--etcd-cert", &p.internal.cert), ("--etcd-key", &p.internal.key)])
            })
            .unwrap_or_default()
    }

    /// Flags every component gets.
    fn common(&self) -> Vec<String> {
        let model = self.model.to_string_lossy().into_owned();
        let ttl = self.a.lease_ttl.to_string();
        let mut common: Vec<String> =
            ["--model", &model, "--etcd", self.etcd_url, "--cluster", &self.a.cluster, "--lease-ttl", &ttl]
                .map(String::from)
                .to_vec();
        if let Some(p) = self.pki {
            common.extend(self.etcd_flags());
            common.extend(file_args(&[
                ("--internal-ca", &p.ca),
                ("--internal-cert", &p.internal.cert),
                ("--internal-key", &p.internal.key),
            ]));
        }
        common
    }

    /// Every child, in start order: the coordinator, the nodes, the router.
    fn specs(&self) -> Result<Vec<Spec>> {
        let (node_bin, router_bin, coord_bin) = (sibling("expert-node")?, sibling("router")?, sibling("coordinator")?);
        let common = self.common();
        let spec = |name: &str, kind, program: &PathBuf, extra: Vec<String>| Spec {
            name: name.into(),
            kind,
            program: program.clone(),
            args: common.iter().cloned().chain(extra).collect(),
        };
        let replicas = self.a.replicas.to_string();
        let coordinator = [
            "--id",
            "coordinator-0",
            "--min-replicas",
            &replicas,
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ];
        let mut specs =
            vec![spec("coordinator-0", Kind::Coordinator, &coord_bin, coordinator.map(String::from).to_vec())];
        for i in 0..self.nodes {
            let id = format!("en-{i}");
            let mut extra: Vec<String> =
                ["--listen", "127.0.0.1:0", "--node-id", &id, "--metrics", "127.0.0.1:0"].map(String::from).to_vec();
            if let Some(t) = self.a.threads_per_node {
                extra.extend(["--threads".into(), t.to_string()]);
            }
            specs.push(spec(&id, Kind::Node, &node_bin, extra));
        }
        let mut extra: Vec<String> = vec![
            "--router-id".into(),
            "router-0".into(),
            "--grpc".into(),
            format!("127.0.0.1:{}", self.a.grpc_port),
            "--http".into(),
            format!("127.0.0.1:{}", self.a.http_port),
        ];
        if let Some(p) = self.pki {
            extra.extend(file_args(&[("--tls-cert", &p.public.cert), ("--tls-key", &p.public.key)]));
        }
        specs.push(spec("router", Kind::Router, &router_bin, extra));
        Ok(specs)
    }

    fn scheme(&self) -> &'static str {
        if self.pki.is_some() { "https" } else { "http" }
    }

    /// Starts and supervises the cluster until `stop` or a child that keeps
    /// failing.
    fn serve(&self, stop: &AtomicBool) -> Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let report = state::Report::start(self, &rt)?;
        let children = self.specs()?.into_iter().map(|s| {
            let log = self.logs.join(format!("{}.log", s.name));
            Supervised::new(s, log)
        });
        let restarts = report.restarts.clone();
        let mut sup = Supervisor {
            children: children.collect(),
            on_restart: Box::new(move |name| restarts.with_label_values(&[name]).inc()),
        };
        for c in &mut sup.children {
            c.start()?;
        }
        self.wait_ready(&mut sup, &rt, stop)?;
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        report.write(self, &sup)?;
        self.banner(&sup);
        while !stop.load(Ordering::Relaxed) {
            if sup.poll()? {
                report.write(self, &sup)?;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Supervises while waiting for the router's `/ready` (full coverage)
    /// and for a placement over every node `up` started, showing progress;
    /// fails after `--start-timeout` without any.
    fn wait_ready(&self, sup: &mut Supervisor, rt: &tokio::runtime::Runtime, stop: &AtomicBool) -> Result<()> {
        let client = crate::remote::http_client(self.pki.map(|p| p.ca.as_path()))?;
        let limit = Duration::from_secs_f64(self.a.start_timeout);
        let keys = Keys::new(&self.a.cluster);
        let names: Vec<String> =
            sup.children.iter().filter(|c| c.spec.kind == Kind::Node).map(|c| c.spec.name.clone()).collect();
        let nodes: Vec<&str> = names.iter().map(String::as_str).collect();
        let (mut last, mut progress_at, mut shown) = (String::new(), Instant::now(), Instant::now());
        let (opts, mut store) = (self.etcd_options(), None);
        while !stop.load(Ordering::Relaxed) {
            sup.poll()?;
            let mut now = progress(sup);
            if let Some(http) = sup.get("router").and_then(Supervised::start_line).map(|l| field(l, "http=")) {
                let url = format!("{}://{http}/ready", self.scheme());
                let probe = async { client.get(&url).timeout(Duration::from_secs(2)).send().await };
                if rt.block_on(probe).is_ok_and(|r| r.status().is_success()) {
                    now = match self.settle_check(rt, &opts, &mut store, &keys, &nodes) {
                        Ok(true) => return Ok(()),
                        Ok(false) => "router ready, placement settling over every expert node".into(),
                        // Shown as progress and retried: etcd serves, the router got its placement there.
                        Err(e) => format!("router ready, reading the placement from etcd: {e:#}"),
                    };
                }
            }
            if now != last {
                eprintln!("up: starting: {now}");
                (last, progress_at, shown) = (now, Instant::now(), Instant::now());
            } else if shown.elapsed() > Duration::from_secs(10) {
                eprintln!("up: still starting ({}s without progress): {last}", progress_at.elapsed().as_secs());
                shown = Instant::now();
            }
            if progress_at.elapsed() > limit {
                bail!("no progress for {limit:?} (--start-timeout): {last}; the logs are in {}", self.logs.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// One round of [`settled`], connecting to etcd first if need be.
    fn settle_check(
        &self,
        rt: &tokio::runtime::Runtime,
        opts: &EtcdOptions,
        store: &mut Option<Etcd>,
        keys: &Keys,
        nodes: &[&str],
    ) -> Result<bool> {
        let deadline = Duration::from_secs(2);
        let etcd = match store {
            Some(s) => s,
            None => store.insert(rt.block_on(async { tokio::time::timeout(deadline, Etcd::connect(opts)).await })??),
        };
        rt.block_on(async { tokio::time::timeout(deadline, settled(etcd, keys, nodes)).await })?
    }

    fn banner(&self, sup: &Supervisor) {
        let line = |n: &str| sup.get(n).and_then(Supervised::start_line).unwrap_or_default().to_string();
        let router = line("router");
        let (grpc, http) = (field(&router, "grpc="), field(&router, "http="));
        let scheme = self.scheme();
        println!("ExpertMesh is up: router gRPC {grpc}, HTTP {scheme}://{http} (/health /ready /metrics)");
        for c in sup.children.iter().filter(|c| c.spec.kind == Kind::Node) {
            println!("  expert node {} at {}", c.spec.name, field(&line(&c.spec.name), "grpc="));
        }
        println!(
            "  coordinator-0, etcd {} (cluster {:?}); logs in {}",
            self.etcd_url,
            self.a.cluster,
            self.logs.display()
        );
        let ca = self.pki.map(|p| format!(" --tls-ca {}", p.ca.display())).unwrap_or_default();
        let etcd_tls = self.etcd_flags().join(" ");
        let etcd_tls = if etcd_tls.is_empty() { etcd_tls } else { format!(" {etcd_tls}") };
        println!(
            "try: expertmesh generate --router {grpc}{ca} --chat --prompt \"Hello\"    (Ctrl-C stops the cluster)"
        );
        println!("     expertmesh status --etcd {}{etcd_tls} --cluster {}", self.etcd_url, self.a.cluster);
    }
}

/// Which components serve so far, for the progress line.
fn progress(sup: &Supervisor) -> String {
    let serving = |k: Kind| sup.children.iter().filter(|c| c.spec.kind == k && c.start_line().is_some()).count();
    let nodes = sup.children.iter().filter(|c| c.spec.kind == Kind::Node).count();
    let coordinator = if serving(Kind::Coordinator) > 0 { "coordinator up" } else { "coordinator starting" };
    let router = if serving(Kind::Router) > 0 { "router waiting for its first placement" } else { "router loading" };
    format!("{coordinator}, {}/{nodes} expert nodes serving, {router}", serving(Kind::Node))
}

/// The value of `key=` in a child's start line.
fn field(line: &str, key: &str) -> String {
    line.split(' ').find_map(|w| w.strip_prefix(key)).unwrap_or_default().to_string()
}

/// The trained demo checkpoint (`model/demo` in the source tree, written by
/// `tools/train_demo.py`): found from the working directory of a checkout,
/// else in the tree the binary was built from.
pub fn demo_model() -> Result<PathBuf> {
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/demo");
    let candidates = [PathBuf::from("model/demo"), built_from];
    match candidates.iter().find(|d| d.join("config.json").is_file()) {
        Some(d) => Ok(d.clone()),
        None => bail!(
            "--demo: the demo checkpoint is not in {} or {}; run from a checkout, or pass --model DIR",
            candidates[0].display(),
            candidates[1].display()
        ),
    }
}

#[cfg(test)]
mod tests {
    /// `--demo` finds the committed checkpoint from any working directory
    /// (tests run in the crate's).
    #[test]
    fn the_demo_checkpoint_is_found() {
        let d = super::demo_model().unwrap();
        assert!(d.join("model.safetensors").is_file() && d.join("tokenizer.json").is_file(), "{}", d.display());
    }
}
