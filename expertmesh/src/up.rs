//! `expertmesh up`: a local cluster as child processes on loopback: etcd
//! (private, unless `--etcd` names one), a coordinator, N expert nodes and a
//! router. The nodes and the router join through etcd; the coordinator
//! places every expert on R distinct nodes and the router serves once every
//! expert is covered.
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

use crate::certs::LocalPki;
use anyhow::{Context, Result, bail};
use expertmesh_cluster::etcd_server::{EtcdServer, EtcdTls};
use expertmesh_model::config::ModelConfig;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub struct UpArgs {
    pub model: PathBuf,
    pub expert_nodes: usize,
    pub replicas: usize,
    pub grpc_port: u16,
    pub http_port: u16,
    pub state_file: Option<PathBuf>,
    /// Prometheus file_sd targets for every component's `/metrics`.
    pub prometheus_targets: Option<PathBuf>,
    pub threads_per_node: Option<usize>,
    /// An existing etcd; `None` starts a private one.
    pub etcd: Option<String>,
    pub cluster: String,
    pub lease_ttl: u64,
    pub tls: bool,
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

struct Member {
    name: String,
    child: Child,
}

/// Every started child, stopped on drop (also on early errors).
struct Family(Vec<Member>);

impl Drop for Family {
    fn drop(&mut self) {
        for c in &self.0 {
            // SAFETY: plain kill(2) on a pid we spawned.
            unsafe { libc::kill(c.child.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for c in &mut self.0 {
            while Instant::now() < deadline {
                if matches!(c.child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.child.kill();
            let _ = c.child.wait();
        }
    }
}

/// Starts `cmd` tied to our lifetime; returns it with its start line.
fn start(family: &mut Family, name: &str, mut cmd: Command) -> Result<String> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    expertmesh_plumbing::process::tie_to_parent(&mut cmd);
    let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    family.0.push(Member { name: name.to_string(), child });
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).with_context(|| format!("reading {name}'s start line"))?;
    if line.trim().is_empty() {
        bail!("{name} exited before serving (see its log above)");
    }
    Ok(line.trim().to_string())
}

/// Polls the router's `/ready` (at `url`) until it serves with full expert
/// coverage.
fn wait_ready(url: &str, ca: Option<&Path>, family: &mut Family, limit: Duration) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let client = crate::remote::http_client(ca)?;
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let probe = async { client.get(format!("{url}/ready")).timeout(Duration::from_secs(2)).send().await };
        if rt.block_on(probe).is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        if let Some(c) = family.0.iter_mut().find_map(|c| matches!(c.child.try_wait(), Ok(Some(_))).then_some(&c.name))
        {
            bail!("{c} exited while the cluster was starting");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the router was not ready within {limit:?}: the coordinator placed no experts (see the logs above)")
}

pub fn up(a: UpArgs, stop: &AtomicBool) -> Result<()> {
    if a.expert_nodes == 0 {
        bail!("--expert-nodes must be at least 1");
    }
    if a.replicas == 0 || a.replicas > a.expert_nodes {
        bail!("--replicas must be between 1 and --expert-nodes ({})", a.expert_nodes);
    }
    ModelConfig::from_dir(&a.model).with_context(|| format!("--model {}", a.model.display()))?;
    let bins = (sibling("expert-node")?, sibling("router")?, sibling("coordinator")?);
    let run_dir = std::env::temp_dir().join(format!("expertmesh-up-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)?;
    let result = start_all(&a, &bins, &run_dir, stop);
    for f in [&a.state_file, &a.prometheus_targets].into_iter().flatten() {
        let _ = std::fs::remove_file(f);
    }
    let _ = std::fs::remove_dir_all(&run_dir);
    result
}

/// The certificates (with `--tls`), etcd, then the processes; everything
/// started is stopped on return, children first.
fn start_all(a: &UpArgs, bins: &(PathBuf, PathBuf, PathBuf), run_dir: &Path, stop: &AtomicBool) -> Result<()> {
    let pki = if a.tls { Some(crate::certs::make(&run_dir.join("tls"))?) } else { None };
    let etcd_tls =
        pki.as_ref().map(|p| EtcdTls { ca: p.ca.clone(), cert: p.internal.cert.clone(), key: p.internal.key.clone() });
    // Dropped last: children go first, then the private etcd.
    let etcd = match &a.etcd {
        Some(_) => None,
        None => Some(EtcdServer::start_with(&run_dir.join("etcd"), etcd_tls).map_err(|e| anyhow::anyhow!("{e}"))?),
    };
    let etcd_url = a.etcd.clone().or_else(|| etcd.as_ref().map(EtcdServer::url)).unwrap_or_default();
    let mut family = Family(Vec::new());
    let r = serve(a, bins, &etcd_url, etcd.as_ref(), pki.as_ref(), &mut family, stop);
    drop(family);
    drop(etcd);
    r
}

/// Flags naming a file, as `--flag PATH` pairs.
fn file_args(pairs: &[(&str, &Path)]) -> Vec<String> {
    pairs.iter().flat_map(|(f, p)| [f.to_string(), p.to_string_lossy().into_owned()]).collect()
}

fn serve(
    a: &UpArgs,
    (node_bin, router_bin, coord_bin): &(PathBuf, PathBuf, PathBuf),
    etcd_url: &str,
    etcd: Option<&EtcdServer>,
    pki: Option<&LocalPki>,
    family: &mut Family,
    stop: &AtomicBool,
) -> Result<()> {
    let model = a.model.to_string_lossy().into_owned();
    let ttl = a.lease_ttl.to_string();
    let mut common: Vec<String> = ["--model", &model, "--etcd", etcd_url, "--cluster", &a.cluster, "--lease-ttl", &ttl]
        .map(String::from)
        .to_vec();
    let etcd_flags = pki.map(|p| {
        file_args(&[("--etcd-ca", &p.ca), ("--etcd-cert", &p.internal.cert), ("--etcd-key", &p.internal.key)])
    });
    if let Some(p) = pki {
        common.extend(etcd_flags.clone().unwrap_or_default());
        common.extend(file_args(&[
            ("--internal-ca", &p.ca),
            ("--internal-cert", &p.internal.cert),
            ("--internal-key", &p.internal.key),
        ]));
    }
    let mut cmd = Command::new(coord_bin);
    cmd.args(&common).args(["--id", "coordinator-0", "--min-replicas", &a.replicas.to_string()]);
    cmd.args(["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]);
    let line = start(family, "coordinator-0", cmd)?;
    let coordinator =
        json!({"id": "coordinator-0", "grpc": field(&line, "grpc="), "metrics": field(&line, "metrics=")});
    let mut nodes = Vec::new();
    for i in 0..a.expert_nodes {
        let id = format!("en-{i}");
        let mut cmd = Command::new(node_bin);
        cmd.args(&common).args(["--listen", "127.0.0.1:0", "--node-id", &id, "--metrics", "127.0.0.1:0"]);
        if let Some(t) = a.threads_per_node {
            cmd.args(["--threads", &t.to_string()]);
        }
        let line = start(family, &id, cmd)?;
        nodes.push((id, field(&line, "grpc="), field(&line, "metrics=")));
    }
    let mut cmd = Command::new(router_bin);
    cmd.args(&common).args(["--router-id", "router-0"]).args([
        "--grpc",
        &format!("127.0.0.1:{}", a.grpc_port),
        "--http",
        &format!("127.0.0.1:{}", a.http_port),
    ]);
    if let Some(p) = pki {
        cmd.args(file_args(&[("--tls-cert", &p.public.cert), ("--tls-key", &p.public.key)]));
    }
    let line = start(family, "router", cmd)?;
    let (grpc, http) = (field(&line, "grpc="), field(&line, "http="));
    let scheme = if pki.is_some() { "https" } else { "http" };
    wait_ready(&format!("{scheme}://{http}"), pki.map(|p| p.ca.as_path()), family, Duration::from_secs(120))?;
    let pid = |name: &str| family.0.iter().find(|c| c.name == name).map(|c| c.child.id());
    let mut coordinator = coordinator;
    coordinator["pid"] = json!(pid("coordinator-0"));
    let state = json!({
        "router": {"pid": pid("router"), "grpc": grpc, "http": http},
        "expert_nodes": nodes.iter().map(|(id, addr, m)| json!({"id": id, "pid": pid(id), "addr": addr, "metrics": m})).collect::<Vec<_>>(),
        "coordinators": [coordinator],
        "etcd": {"url": etcd_url, "pid": etcd.and_then(EtcdServer::pid), "cluster": a.cluster},
        "tls": pki.map(|p| json!({"ca": p.ca, "cert": p.internal.cert, "key": p.internal.key})),
    });
    if let Some(f) = &a.state_file {
        std::fs::write(f, serde_json::to_string_pretty(&state)?)
            .with_context(|| format!("--state-file {}", f.display()))?;
    }
    if let Some(f) = &a.prometheus_targets {
        let model = a.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let target = |addr: &str, component: &str, id: &str| json!({"targets": [addr], "labels": {"component": component, "id": id, "cluster": a.cluster, "model": model, "__scheme__": scheme}});
        let mut t = vec![target(&http, "router", "router-0")];
        t.extend(nodes.iter().map(|(id, _, m)| target(m, "expert-node", id)));
        t.push(target(coordinator["metrics"].as_str().unwrap_or_default(), "coordinator", "coordinator-0"));
        // Written whole and renamed, so Prometheus never reads half a file.
        let tmp = f.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&t)?)
            .and_then(|_| std::fs::rename(&tmp, f))
            .with_context(|| format!("--prometheus-targets {}", f.display()))?;
    }
    println!("ExpertMesh is up: router gRPC {grpc}, HTTP {scheme}://{http} (/health /ready /metrics)");
    for (id, addr, _) in &nodes {
        println!("  expert node {id} at {addr}");
    }
    println!("  coordinator-0, etcd {etcd_url} (cluster {:?})", a.cluster);
    let ca = pki.map(|p| format!(" --tls-ca {}", p.ca.display())).unwrap_or_default();
    let etcd_tls = etcd_flags.map(|f| format!(" {}", f.join(" "))).unwrap_or_default();
    println!("try: expertmesh generate --router {grpc}{ca} --chat --prompt \"Hello\"    (Ctrl-C stops the cluster)");
    println!("     expertmesh status --etcd {etcd_url}{etcd_tls} --cluster {}", a.cluster);
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        if let Some(c) = family.0.iter_mut().find_map(|c| matches!(c.child.try_wait(), Ok(Some(_))).then_some(&c.name))
        {
            bail!("{c} exited; stopping the cluster");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of `key=` in a child's start line.
fn field(line: &str, key: &str) -> String {
    line.split(' ').find_map(|w| w.strip_prefix(key)).unwrap_or_default().to_string()
}

/// The demo checkpoint, generated on first use.
pub fn demo_model(dir: &Path) -> Result<PathBuf> {
    if !dir.join("config.json").exists() {
        let spec = expertmesh_model::genmodel::GenSpec::demo(expertmesh_model::config::Arch::DeepseekV3);
        expertmesh_model::genmodel::generate_checkpoint(&spec, dir).context("writing the demo model")?;
        eprintln!("generated the demo model in {}", dir.display());
    }
    Ok(dir.to_path_buf())
}
