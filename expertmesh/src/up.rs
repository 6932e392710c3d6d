//! `expertmesh up`: a local cluster as child processes on loopback, a router
//! plus N expert nodes with each expert on R distinct nodes.
//!
//! Children are tied to this process twice over: on Linux each gets
//! `PR_SET_PDEATHSIG = SIGKILL`, so even `kill -9` of `up` takes them along;
//! and on Ctrl-C/SIGTERM `up` sends them SIGTERM (they drain), waits, then
//! kills what is left and removes the state file.

use anyhow::{Context, Result, bail};
use expertmesh_dataplane::placement::{NodeId, Placement};
use expertmesh_model::config::ModelConfig;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct UpArgs {
    pub model: PathBuf,
    pub expert_nodes: usize,
    pub replicas: usize,
    pub grpc_port: u16,
    pub http_port: u16,
    pub state_file: Option<PathBuf>,
    pub threads_per_node: Option<usize>,
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
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
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

pub fn up(a: UpArgs, stop: &std::sync::atomic::AtomicBool) -> Result<()> {
    if a.expert_nodes == 0 {
        bail!("--expert-nodes must be at least 1");
    }
    if a.replicas == 0 || a.replicas > a.expert_nodes {
        bail!("--replicas must be between 1 and --expert-nodes ({})", a.expert_nodes);
    }
    let cfg = ModelConfig::from_dir(&a.model).with_context(|| format!("--model {}", a.model.display()))?;
    let (node_bin, router_bin) = (sibling("expert-node")?, sibling("router")?);
    let run_dir = std::env::temp_dir().join(format!("expertmesh-up-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)?;
    let ids: Vec<(NodeId, String)> = (0..a.expert_nodes).map(|i| (format!("en-{i}"), String::new())).collect();
    let mut placement = Placement::round_robin(&cfg, &ids, a.replicas)?;
    let mut family = Family(Vec::new());
    let mut metrics = std::collections::BTreeMap::new();
    let model = a.model.to_string_lossy().into_owned();
    for (id, _) in &ids {
        let spec: Vec<String> = placement.experts_of(id).iter().map(|(l, e)| format!("{l}:{e}")).collect();
        let mut cmd = Command::new(&node_bin);
        cmd.args(["--model", &model, "--listen", "127.0.0.1:0", "--node-id", id, "--experts", &spec.join(",")])
            .args(["--metrics", "127.0.0.1:0"]);
        if let Some(t) = a.threads_per_node {
            cmd.args(["--threads", &t.to_string()]);
        }
        let line = start(&mut family, id, cmd)?;
        placement.nodes.insert(id.clone(), field(&line, "grpc="));
        metrics.insert(id.clone(), field(&line, "metrics="));
    }
    let pfile = run_dir.join("placement.json");
    std::fs::write(&pfile, serde_json::to_string_pretty(&placement)?)?;
    let mut cmd = Command::new(&router_bin);
    cmd.args(["--model", &model, "--placement", &pfile.to_string_lossy()]).args([
        "--grpc",
        &format!("127.0.0.1:{}", a.grpc_port),
        "--http",
        &format!("127.0.0.1:{}", a.http_port),
    ]);
    let line = start(&mut family, "router", cmd)?;
    let (grpc, http) = (field(&line, "grpc="), field(&line, "http="));
    let pid = |name: &str| family.0.iter().find(|c| c.name == name).map(|c| c.child.id());
    let state = json!({
        "router": {"pid": pid("router"), "grpc": grpc, "http": http},
        "expert_nodes": ids.iter().map(|(id, _)| json!({"id": id, "pid": pid(id), "addr": placement.nodes[id], "metrics": metrics[id]})).collect::<Vec<_>>(),
    });
    if let Some(f) = &a.state_file {
        std::fs::write(f, serde_json::to_string_pretty(&state)?)
            .with_context(|| format!("--state-file {}", f.display()))?;
    }
    println!("ExpertMesh is up: router gRPC {grpc}, HTTP http://{http} (/health /ready /metrics)");
    for (id, _) in &ids {
        println!("  expert node {id} at {} ({} experts)", placement.nodes[id], placement.experts_of(id).len());
    }
    println!("try: expertmesh generate --router {grpc} --chat --prompt \"Hello\"    (Ctrl-C stops the cluster)");
    let result = loop {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break Ok(());
        }
        if let Some(c) = family.0.iter_mut().find_map(|c| matches!(c.child.try_wait(), Ok(Some(_))).then_some(&c.name))
        {
            break Err(anyhow::anyhow!("{c} exited; stopping the cluster"));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(family);
    if let Some(f) = &a.state_file {
        let _ = std::fs::remove_file(f);
    }
    let _ = std::fs::remove_dir_all(&run_dir);
    result
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
