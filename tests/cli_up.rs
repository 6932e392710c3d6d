//! `expertmesh up` end to end: a local cluster from the CLI (private etcd,
//! coordinator, nodes, router) serves `generate --router` with
//! transformers' exact tokens, `status` and `bench` report, and neither
//! Ctrl-C nor `kill -9` of `up` leaves a process behind. The trained demo
//! model answers in the cluster as in transformers, and `expertmesh eval`
//! scores it alike offline and through the router.

use std::path::Path;

mod common;
use common::{Up, fixture, up_with};
use std::process::Stdio;
use std::time::{Duration, Instant};

fn alive(pid: u64) -> bool {
    // A zombie still has a /proc entry; only count running states.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.split(") ").nth(1).is_some_and(|r| r.starts_with('Z')))
        .unwrap_or(false)
}

/// Every process of the cluster: router, nodes, coordinators and the private etcd.
fn pids(state: &serde_json::Value) -> Vec<u64> {
    let mut v = vec![state["router"]["pid"].as_u64().unwrap(), state["etcd"]["pid"].as_u64().unwrap()];
    v.extend(state["expert_nodes"].as_array().unwrap().iter().map(|n| n["pid"].as_u64().unwrap()));
    v.extend(state["coordinators"].as_array().unwrap().iter().map(|n| n["pid"].as_u64().unwrap()));
    assert!(v.iter().all(|&p| alive(p)), "{state}");
    v
}

fn up(model: &Path, tag: &str) -> Up {
    up_with(model, tag, &[], &[], Stdio::null())
}

fn wait_gone(pids: &[u64]) {
    let t0 = Instant::now();
    while pids.iter().any(|&p| alive(p)) {
        assert!(t0.elapsed() < Duration::from_secs(15), "processes left behind: {pids:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn up_serves_generate_and_bench_and_ctrl_c_cleans_up() {
    let u = up(&fixture("deepseek_v3_yarn_bf16"), "int");
    let grpc = u.state["router"]["grpc"].as_str().unwrap().to_string();
    assert_eq!(u.state["expert_nodes"].as_array().unwrap().len(), 3);
    assert_eq!(u.state["coordinators"].as_array().unwrap().len(), 1);
    // The cluster as etcd sees it: a leader, three ready nodes, full coverage.
    let out = common::command("expertmesh")
        .args(["status", "--json", "--etcd", u.state["etcd"]["url"].as_str().unwrap(), "--cluster", "local"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["leader"], "coordinator-0", "{st}");
    assert_eq!(st["placement"]["uncovered"], 0);
    let nodes = st["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    // 16 experts × 2 MoE layers × 2 replicas (+ redundant replicas), spread over the nodes.
    let held: u64 = nodes.iter().map(|n| n["experts"].as_u64().unwrap()).sum();
    assert!(held >= 64, "{st}");
    assert!(nodes.iter().all(|n| n["state"] == "ready" && n["experts"].as_u64().unwrap() > 0), "{st}");
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("deepseek_v3_yarn_bf16").join("reference.json")).unwrap(),
    )
    .unwrap();
    let ids: Vec<String> = r["prompt_ids"].as_array().unwrap().iter().map(|v| v.to_string()).collect();
    let out = common::command("expertmesh")
        .args([
            "generate",
            "--router",
            &grpc,
            "--prompt-ids",
            &ids.join(","),
            "--max-tokens",
            "8",
            "--ignore-eos",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let g: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(g["token_ids"], r["greedy_ids"]);
    let out = common::command("expertmesh")
        .args([
            "bench",
            "--router",
            &grpc,
            "--concurrency",
            "4",
            "--requests",
            "8",
            "--prompt-tokens",
            "5",
            "--max-tokens",
            "4",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let b: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(b["errors"], 0);
    assert!(b["output_tokens_per_s"].as_f64().unwrap() > 0.0);
    let all = pids(&u.state);
    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(u.child.id() as i32, libc::SIGINT) };
    wait_gone(&all);
    let t0 = Instant::now();
    while u.state_file.exists() {
        assert!(t0.elapsed() < Duration::from_secs(15), "state file not removed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A dense model (R1-Distill-Qwen's and -Llama's shapes) needs no expert node: `up`
/// starts none, the coordinator publishes an empty placement at once, the
/// router alone gives transformers' tokens; an expert node refuses it.
#[test]
fn up_serves_a_dense_model_with_the_router_alone() {
    for case in ["qwen2_tied_bf16", "llama3"] {
        up_dense(case);
    }
    let out = common::command("expert-node")
        .args(["--model", fixture("llama3").to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--model") && err.contains("dense"), "{err}");
}

/// `generate --router` of `n` tokens past EOS, as JSON.
fn greedy_via(grpc: &str, prompt: &[u32], n: usize) -> serde_json::Value {
    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let (n, ids) = (n.to_string(), ids.join(","));
    let (ok, stdout, stderr) =
        cli(&["generate", "--router", grpc, "--prompt-ids", &ids, "--max-tokens", &n, "--ignore-eos", "--json"]);
    assert!(ok, "{stderr}");
    serde_json::from_str(&stdout).unwrap()
}

fn up_dense(case: &str) {
    let u = up(&fixture(case), case);
    assert_eq!(u.state["expert_nodes"].as_array().unwrap().len(), 0, "{}", u.state);
    let grpc = u.state["router"]["grpc"].as_str().unwrap().to_string();
    let (prompt, greedy) = common::reference(case);
    let g = greedy_via(&grpc, &prompt, 8);
    assert_eq!(g["token_ids"], serde_json::json!(greedy), "{case}");
    let out = common::command("expertmesh")
        .args(["status", "--json", "--etcd", u.state["etcd"]["url"].as_str().unwrap(), "--cluster", "local"])
        .output()
        .unwrap();
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((st["placement"]["in_force"].as_bool(), st["placement"]["uncovered"].as_u64()), (Some(true), Some(0)));
}

/// The trained demo model (`model/demo`, what `up --demo` serves) in a
/// 3-node cluster: its chat answer is transformers' greedy tokens, and its
/// perplexity over held-out text, scored through the router's OpenAI API
/// (`echo` + `logprobs`, `max_tokens: 0`), is transformers' and the
/// offline `eval`'s (f32 everywhere, so only summation order differs).
#[test]
fn the_demo_model_answers_and_scores_alike_in_a_cluster() {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/demo");
    let u = up_with(&demo, "demo", &[], &[("EXPERTMESH_PRECISION", "f32")], Stdio::null());
    let grpc = u.state["router"]["grpc"].as_str().unwrap().to_string();
    let http = u.state["router"]["http"].as_str().unwrap().to_string();
    let (prompt, greedy) = common::reference("demo_trained");
    let g = greedy_via(&grpc, &prompt, 16);
    assert_eq!(g["token_ids"], serde_json::json!(greedy));
    let text = g["text"].as_str().unwrap();
    assert!(text.split_whitespace().filter(|w| w.chars().all(|c| c.is_ascii_alphabetic())).count() >= 3, "{text}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("demo_trained").join("perplexity.json")).unwrap())
            .unwrap();
    let want = r["perplexity"].as_f64().unwrap();
    let text_file = fixture("demo_trained").join("text.txt");
    let base = ["eval", "--model", demo.to_str().unwrap(), "--text", text_file.to_str().unwrap()];
    let shape = ["--context", "128", "--stride", "64", "--json", "--precision", "f32"];
    let url = format!("http://{http}");
    for how in [vec![], vec!["--url", url.as_str()]] {
        let args: Vec<&str> = base.iter().chain(&shape).chain(&how).copied().collect();
        let (ok, stdout, stderr) = cli(&args);
        assert!(ok, "{how:?}: {stderr}");
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let got = v["perplexity"].as_f64().unwrap();
        assert_eq!(v["tokens"], r["tokens"], "{how:?}");
        assert!((got - want).abs() / want < 1e-4, "{how:?}: perplexity {got} vs transformers {want}");
    }
}

#[test]
fn kill_9_of_up_takes_the_children_along() {
    let mut u = up(&fixture("mixtral"), "kill");
    let all = pids(&u.state);
    let run_dir = std::env::temp_dir().join(format!("expertmesh-up-{}", u.child.id()));
    u.child.kill().unwrap(); // SIGKILL: up gets no chance to clean up
    let _ = u.child.wait();
    wait_gone(&all);
    // What up could not remove (its private etcd's data, the logs).
    assert!(run_dir.exists(), "up's run directory is {}", run_dir.display());
    std::fs::remove_dir_all(&run_dir).unwrap();
}

#[test]
fn bench_model_runs_the_engine_in_process() {
    let out = common::command("expertmesh")
        .args(["bench", "--model", fixture("qwen3_moe").to_str().unwrap(), "--concurrency", "4", "--requests", "8"])
        .args(["--prompt-tokens", "6", "--max-tokens", "5", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let b: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(b["requests"], 8);
    assert_eq!(b["errors"], 0);
}

/// Runs the CLI, returning (success, stdout, stderr).
fn cli(args: &[&str]) -> (bool, String, String) {
    let out = common::command("expertmesh").args(args).env_remove("EXPERTMESH_API_KEY").output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// `ExpertService.Info` on an expert node, over whatever TLS `tls` gives.
fn node_info(addr: &str, tls: Option<tonic::transport::ClientTlsConfig>) -> Result<(), String> {
    use expertmesh_proto::v1::InfoRequest;
    use expertmesh_proto::v1::expert_service_client::ExpertServiceClient;
    common::runtime().block_on(async {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut ep = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}")).unwrap();
        if let Some(t) = tls {
            ep = ep.tls_config(t).unwrap();
        }
        let ch = ep.connect_timeout(Duration::from_secs(5)).connect().await.map_err(|e| format!("connect: {e:?}"))?;
        let mut c = ExpertServiceClient::new(ch);
        let call = tokio::time::timeout(Duration::from_secs(5), c.info(InfoRequest {}));
        call.await.map_err(|_| "timed out".to_string())?.map(|_| ()).map_err(|s| format!("{s:?}"))
    })
}

#[test]
fn up_tls_secures_every_hop_and_nodes_refuse_peers_without_a_certificate() {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    const KEY: &str = "sekret-key-3f9a";
    let log = std::env::temp_dir().join(format!("em-up-tls-{}.log", std::process::id()));
    let stderr = std::fs::File::create(&log).unwrap();
    // The key reaches the router through up's environment; debug logs must not show it.
    let env = [("EXPERTMESH_API_KEY", KEY), ("RUST_LOG", "debug")];
    let u = up_with(&fixture("deepseek_v3_yarn_bf16"), "tls", &["--tls"], &env, stderr.into());
    let s = &u.state;
    let (ca, cert, key) =
        (s["tls"]["ca"].as_str().unwrap(), s["tls"]["cert"].as_str().unwrap(), s["tls"]["key"].as_str().unwrap());
    let (grpc, http) = (s["router"]["grpc"].as_str().unwrap(), s["router"]["http"].as_str().unwrap());
    let etcd = s["etcd"]["url"].as_str().unwrap();
    assert!(etcd.starts_with("https://"), "{s}");

    // Public gRPC: TLS with the key gives transformers' tokens; no key or no TLS is refused.
    let (prompt, greedy) = common::reference("deepseek_v3_yarn_bf16");
    let ids = prompt.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let gen_args = ["generate", "--router", grpc, "--prompt-ids", &ids, "--max-tokens", "8", "--ignore-eos", "--json"];
    let (ok, out, err) = cli(&[&gen_args[..], &["--tls-ca", ca, "--api-key", KEY]].concat());
    assert!(ok, "{err}");
    let g: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(g["token_ids"], serde_json::json!(greedy));
    let (ok, _, err) = cli(&[&gen_args[..], &["--tls-ca", ca]].concat());
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
    let (ok, _, _) = cli(&[&gen_args[..], &["--api-key", KEY]].concat());
    assert!(!ok, "plaintext gRPC to a TLS listener must fail");

    // Public TLS under bench: OpenAI over HTTPS, and GenerateService (KServe
    // carries text only, and this fixture has no tokenizer).
    let url = format!("https://{http}");
    let load = ["--concurrency", "2", "--requests", "4", "--prompt-tokens", "4", "--max-tokens", "3", "--json"];
    for api in [vec!["--url", &url, "--api", "openai"], vec!["--router", grpc]] {
        let (ok, out, err) = cli(&[&["bench"][..], &api, &load, &["--tls-ca", ca, "--api-key", KEY]].concat());
        assert!(ok, "{api:?}: {err}");
        let b: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(b["errors"], 0, "{api:?}: {err}");
    }

    // etcd: TLS with client certificates; without them status cannot connect.
    let (ok, out, err) = cli(&[
        "status",
        "--json",
        "--etcd",
        etcd,
        "--etcd-ca",
        ca,
        "--etcd-cert",
        cert,
        "--etcd-key",
        key,
        "--cluster",
        "local",
    ]);
    assert!(ok, "{err}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["placement"]["uncovered"], 0, "{st}");
    let (ok, _, _) = cli(&["status", "--etcd", etcd, "--etcd-ca", ca, "--cluster", "local"]);
    assert!(!ok, "etcd must refuse a client without a certificate");

    // Expert nodes: only peers with a certificate from the cluster CA get in.
    let node = s["expert_nodes"][0]["addr"].as_str().unwrap();
    let ca_pem = Certificate::from_pem(std::fs::read(ca).unwrap());
    let trusting = || ClientTlsConfig::new().ca_certificate(ca_pem.clone());
    let member = Identity::from_pem(std::fs::read(cert).unwrap(), std::fs::read(key).unwrap());
    node_info(node, Some(trusting().identity(member))).unwrap();
    let e = node_info(node, Some(trusting())).unwrap_err();
    assert!(!e.is_empty(), "a client without a certificate was served");
    assert!(node_info(node, None).is_err(), "a plaintext client was served");
    // A certificate from another CA is refused too.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let stranger = Identity::from_pem(other.cert.pem(), other.signing_key.serialize_pem());
    assert!(node_info(node, Some(trusting().identity(stranger))).is_err(), "a foreign certificate was served");

    let all = pids(&u.state);
    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(u.child.id() as i32, libc::SIGINT) };
    wait_gone(&all);
    let logs = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(logs.contains("router serving"), "the children's logs were not captured");
    assert!(!logs.contains(KEY), "the API key appeared in a log");
}
