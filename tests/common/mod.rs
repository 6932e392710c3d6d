//! Helpers shared by the process-level tests: fixtures, and ExpertMesh
//! binaries started on 127.0.0.1 ephemeral ports and killed on drop.
#![allow(dead_code)] // each test file uses a different subset

use expertmesh_dataplane::placement::Placement;
use expertmesh_model::config::ModelConfig;
use expertmesh_proto::v1::generate_request::Prompt;
use expertmesh_proto::v1::generate_service_client::GenerateServiceClient;
use expertmesh_proto::v1::{GenerateRequest, SamplingParams, TokenIds};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(case)
}

/// A fixture's transformers reference, parsed.
fn reference_json(case: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(case).join("reference.json")).unwrap()).unwrap()
}

/// `(prompt_ids, greedy_ids)` of a fixture's transformers reference.
pub fn reference(case: &str) -> (Vec<u32>, Vec<u32>) {
    let r = reference_json(case);
    let ids = |k: &str| r[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect::<Vec<_>>();
    (ids("prompt_ids"), ids("greedy_ids"))
}

/// transformers' log-probability of each prompt token given those before
/// it (from the fixture's per-position logits); NaN for the first token.
pub fn reference_prompt_logprobs(case: &str) -> Vec<f64> {
    let r = reference_json(case);
    let prompt: Vec<u64> = r["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    let rows = r["prompt_logits"].as_array().unwrap();
    let mut out = vec![f64::NAN];
    for (row, &tok) in rows.iter().zip(&prompt[1..]) {
        let row: Vec<f64> = row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
        out.push(row[tok as usize] - lse);
    }
    out
}

/// A small multi-threaded runtime for test clients.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A command for a workspace binary, with `EXPERTMESH_PRECISION=f32`: the
/// tests hold every binary to transformers' float32 tokens, while the
/// default (`auto`) gives bf16 activations on some CPUs. A test that wants
/// another precision passes `--precision`, which wins.
pub fn command(name: &str) -> Command {
    let mut c = Command::new(bin(name));
    c.env("EXPERTMESH_PRECISION", "f32");
    c
}

/// A workspace binary. `cargo test --workspace` builds every binary before
/// running tests, and they all land in the same directory.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_path_buf();
    let p = dir.join(name);
    assert!(p.exists(), "{} not built: run `cargo test --workspace`, which builds every binary", p.display());
    p
}

/// Processes killed (SIGKILL) and reaped on drop.
#[derive(Default)]
pub struct Procs(pub Vec<(String, String, Child)>);

impl Drop for Procs {
    fn drop(&mut self) {
        self.kill_all();
    }
}

impl Procs {
    /// Kills and reaps every process (dropping a `Child` alone kills nothing).
    pub fn kill_all(&mut self) {
        for (_, _, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.0.clear();
    }

    pub fn kill(&mut self, name: &str) {
        if let Some((_, _, c)) = self.0.iter_mut().find(|(n, _, _)| n == name) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Spawns `cmd`, returning it with the first stdout line (the start line).
pub fn spawn(mut cmd: Command) -> (Child, String) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    (child, line.trim().to_string())
}

/// Starts `n` expert nodes holding a round-robin placement with `replicas`
/// replicas per expert; returns them, the placement with real addresses, and
/// each node's metrics address.
pub fn start_nodes(model: &Path, n: usize, replicas: usize) -> (Procs, Placement, BTreeMap<String, String>) {
    start_nodes_with(model, n, replicas, &[])
}

/// [`start_nodes`], each node given `extra` flags too.
pub fn start_nodes_with(
    model: &Path,
    n: usize,
    replicas: usize,
    extra: &[&str],
) -> (Procs, Placement, BTreeMap<String, String>) {
    let cfg = ModelConfig::from_dir(model).unwrap();
    let ids: Vec<(String, String)> = (0..n).map(|i| (format!("en-{i}"), String::new())).collect();
    let mut p = Placement::round_robin(&cfg, &ids, replicas).unwrap();
    let mut procs = Procs::default();
    let mut metrics = BTreeMap::new();
    for (id, _) in &ids {
        let spec: Vec<String> = p.experts_of(id).iter().map(|(l, e)| format!("{l}:{e}")).collect();
        let mut cmd = command("expert-node");
        cmd.args(["--model", model.to_str().unwrap(), "--listen", "127.0.0.1:0", "--node-id", id]).args([
            "--experts",
            &spec.join(","),
            "--threads",
            "1",
            "--metrics",
            "127.0.0.1:0",
        ]);
        cmd.args(extra);
        let (child, line) = spawn(cmd);
        let addr = field(&line, "grpc=");
        metrics.insert(id.clone(), field(&line, "metrics="));
        assert!(addr.starts_with("127.0.0.1:"), "unexpected start line {line:?}");
        p.nodes.insert(id.clone(), addr.clone());
        procs.0.push((id.clone(), addr, child));
    }
    p.validate(&cfg).unwrap();
    (procs, p, metrics)
}

/// The value of `key=` in a start line.
pub fn field(line: &str, key: &str) -> String {
    line.split(' ').find_map(|w| w.strip_prefix(key)).unwrap_or_else(|| panic!("no {key} in {line:?}")).to_string()
}

/// A plain HTTP/1.1 GET; returns (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let status = buf.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// A plain HTTP/1.1 POST of `body` with extra headers; returns (status, body).
pub fn http_post(addr: &str, path: &str, body: &[u8], headers: &[(&str, &str)]) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    // A hung handler shows as status 0 instead of a test that never ends.
    s.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
    let mut head =
        format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    s.write_all(head.as_bytes()).unwrap();
    // The server may answer (and close) before reading an oversized body.
    let _ = s.write_all(body);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let buf = String::from_utf8_lossy(&buf).into_owned();
    let status = buf.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// Writes a small random checkpoint with a tokenizer and chat template (the
/// demo preset) into `dir`.
pub fn demo_checkpoint(dir: &Path) {
    let out = command("expertmesh").args(["gen-model", "--out", dir.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "gen-model: {}", String::from_utf8_lossy(&out.stderr));
}

/// The Python interpreter of the real-client venv (created on first use by
/// `tools/pyenv.sh`).
pub fn python() -> PathBuf {
    static PY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PY.get_or_init(|| {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tools/pyenv.sh");
        let out = Command::new(script).output().unwrap();
        assert!(out.status.success(), "tools/pyenv.sh: {}", String::from_utf8_lossy(&out.stderr));
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn scratch(tag: &str) -> Scratch {
    let p = std::env::temp_dir().join(format!("em-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    Scratch(p)
}

/// Starts a router with local experts; returns (grpc, http).
pub fn router(procs: &mut Procs, model: &Path, extra: &[&str]) -> (String, String) {
    let mut cmd = command("router");
    cmd.args(["--model", model.to_str().unwrap(), "--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0", "--threads", "1"])
        .args(extra);
    let (child, line) = spawn(cmd);
    let (grpc, http) = (field(&line, "grpc="), field(&line, "http="));
    procs.0.push(("router".into(), grpc.clone(), child));
    (grpc, http)
}

/// `expertmesh up` as a child, with the state file it wrote.
pub struct Up {
    pub child: Child,
    pub state: serde_json::Value,
    pub state_file: PathBuf,
}

impl Drop for Up {
    fn drop(&mut self) {
        let pid = self.child.id();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.state_file);
        // SIGKILL leaves up's run directory (its private etcd's data).
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("expertmesh-up-{pid}")));
    }
}

/// `up` on 3 nodes × 2 replicas, with `extra` flags, `env` and `stderr`.
pub fn up_with(model: &Path, tag: &str, extra: &[&str], env: &[(&str, &str)], stderr: Stdio) -> Up {
    let state_file = std::env::temp_dir().join(format!("em-up-{tag}-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&state_file);
    let child = command("expertmesh")
        .args(["up", "--model", model.to_str().unwrap(), "--expert-nodes", "3", "--replicas", "2"])
        .args(["--grpc-port", "0", "--http-port", "0", "--threads-per-node", "1"])
        .args(["--state-file", state_file.to_str().unwrap()])
        .args(extra)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    // Written to a temporary file and renamed: once it exists, it is whole.
    while !state_file.exists() {
        assert!(t0.elapsed() < Duration::from_secs(60), "cluster did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let state = serde_json::from_str(&std::fs::read_to_string(&state_file).unwrap()).unwrap();
    Up { child, state, state_file }
}

/// Requests sent back to back from `clients` threads until stopped; every
/// result is checked against the transformers reference.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    results: Arc<Mutex<(usize, Vec<String>)>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Traffic {
    pub fn start(grpc: &str, clients: usize, case: &str) -> Self {
        let (prompt, greedy) = reference(case);
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new((0usize, Vec::new())));
        let threads = (0..clients)
            .map(|_| {
                let (stop, results, grpc, prompt, greedy) =
                    (stop.clone(), results.clone(), grpc.to_string(), prompt.clone(), greedy.clone());
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        let r = rt.block_on(one(&grpc, prompt.clone(), greedy.len() as u32));
                        let mut res = results.lock().unwrap();
                        match r {
                            Ok(t) if t == greedy => res.0 += 1,
                            Ok(t) => res.1.push(format!("wrong tokens {t:?}")),
                            Err(e) => res.1.push(e),
                        }
                    }
                })
            })
            .collect();
        Traffic { stop, results, threads }
    }

    /// Waits until `n` requests have succeeded (a failure counts too, so a
    /// broken cluster fails the test instead of timing out).
    pub fn wait_for(&self, n: usize, limit: std::time::Duration) {
        let t0 = std::time::Instant::now();
        loop {
            let (ok, failed) = {
                let r = self.results.lock().unwrap();
                (r.0, r.1.len())
            };
            if ok + failed >= n {
                return;
            }
            assert!(t0.elapsed() < limit, "only {ok} of {n} requests done after {limit:?}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Requests done so far (successes, failures).
    pub fn done(&self) -> (usize, usize) {
        let r = self.results.lock().unwrap();
        (r.0, r.1.len())
    }

    /// Stops, asserts that no request failed, and returns the successes.
    pub fn finish_without_failures(self) -> usize {
        let (ok, failed) = self.finish();
        assert!(
            failed.is_empty(),
            "{} of {} failed: {:?}",
            failed.len(),
            ok + failed.len(),
            &failed[..failed.len().min(3)]
        );
        ok
    }

    /// Stops and returns (successes, failures).
    pub fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let r = self.results.lock().unwrap();
        (r.0, r.1.clone())
    }
}

/// Greedy tokens and logprobs over gRPC (EOS ignored), or, seeded,
/// sampled at temperature 1.
pub async fn grpc(addr: &str, prompt: &[u32], max_tokens: u32, seed: Option<u64>) -> (Vec<u32>, Vec<f32>) {
    let mut c = GenerateServiceClient::connect(format!("http://{addr}")).await.unwrap();
    let sampling = match seed {
        Some(s) => SamplingParams { temperature: 1.0, seed: Some(s), ..Default::default() },
        None => SamplingParams::default(),
    };
    let req = GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids: prompt.to_vec() })),
        sampling: Some(sampling),
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    let mut s = c.generate(req).await.unwrap().into_inner();
    let (mut toks, mut lps) = (vec![], vec![]);
    while let Some(m) = s.message().await.unwrap() {
        toks.extend(m.token_ids);
        lps.extend(m.logprobs);
    }
    (toks, lps)
}

/// Every unlabelled `expertmesh_*` sample of a router's /metrics body.
pub fn metrics(http: &str) -> BTreeMap<String, f64> {
    let body = http_get(http, "/metrics").1;
    body.lines()
        .filter(|l| l.starts_with("expertmesh_") && !l.contains('{'))
        .filter_map(|l| l.split_once(' ').and_then(|(k, v)| Some((k.to_string(), v.parse().ok()?))))
        .collect()
}

/// [`metrics`] once the router's engine is idle: a client has its last
/// token just before the engine retires the request and publishes its
/// gauges. The engine sets the request counts after the block pool's, so
/// a scrape begun after one that saw them at zero sees the freed blocks.
pub fn idle_metrics(http: &str) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics(http);
        if m["expertmesh_requests_running"] == 0.0 && m["expertmesh_requests_waiting"] == 0.0 {
            return metrics(http);
        }
        assert!(Instant::now() < deadline, "the router is still busy: {m:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub async fn one(grpc: &str, prompt: Vec<u32>, max_tokens: u32) -> Result<Vec<u32>, String> {
    let mut c = GenerateServiceClient::connect(format!("http://{grpc}")).await.map_err(|e| e.to_string())?;
    let req = GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids: prompt })),
        sampling: Some(SamplingParams::default()),
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    let mut s = c.generate(req).await.map_err(|e| e.to_string())?.into_inner();
    let mut toks = Vec::new();
    while let Some(m) = s.message().await.map_err(|e| e.to_string())? {
        toks.extend(m.token_ids);
    }
    Ok(toks)
}
