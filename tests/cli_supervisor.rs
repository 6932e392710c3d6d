//! `expertmesh up` as a supervisor, and the data plane around a hung node,
//! on real processes: a killed expert node or coordinator is restarted
//! (visible in the state file and `status`) while traffic loses nothing;
//! a node stopped with SIGSTOP (hung, not dead) costs no request and no
//! inter-token gap near the dispatch timeout, and serves again once
//! continued.

mod common;
#[path = "common/reflection.rs"]
mod reflection;
use common::{Traffic, Up, fixture, http_get, up_with};
use serde_json::Value;
use std::process::Stdio;
use std::time::{Duration, Instant};

const CASE: &str = "deepseek_v3_qnull";

fn wait(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The state file as `up` last wrote it (whole: it is renamed into place).
fn state(u: &Up) -> Value {
    serde_json::from_str(&std::fs::read_to_string(&u.state_file).unwrap()).unwrap()
}

fn node<'a>(s: &'a Value, id: &str) -> &'a Value {
    s["expert_nodes"].as_array().unwrap().iter().find(|n| n["id"] == id).unwrap()
}

fn status(u: &Up) -> Value {
    let out = common::command("expertmesh")
        .args(["status", "--json", "--etcd", u.state["etcd"]["url"].as_str().unwrap(), "--cluster", "local"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn signal(pid: u64, sig: i32) {
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0, "kill({pid}, {sig})");
}

/// A sample from the router's /metrics (exact series text).
fn metric(http: &str, series: &str) -> f64 {
    http_get(http, "/metrics")
        .1
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn up_restarts_a_killed_node_and_coordinator_and_no_request_fails() {
    let u = up_with(&fixture(CASE), "restart", &["--lease-ttl", "2"], &[], Stdio::null());
    let traffic = Traffic::start(u.state["router"]["grpc"].as_str().unwrap(), 2, CASE);
    traffic.wait_for(4, Duration::from_secs(60));

    let old = node(&u.state, "en-1")["pid"].as_u64().unwrap();
    signal(old, libc::SIGKILL);
    wait(Duration::from_secs(30), "en-1 restarted in the state file", || {
        let s = state(&u);
        let n = node(&s, "en-1");
        n["pid"].as_u64().is_some_and(|p| p != old)
            && n["restarts"] == 1
            && n["addr"].as_str().is_some_and(|a| !a.is_empty())
    });
    wait(Duration::from_secs(30), "en-1 back in status with experts", || {
        let s = status(&u);
        s["nodes"].as_array().unwrap().iter().any(|n| {
            n["id"] == "en-1" && n["state"] == "ready" && n["experts"].as_u64().unwrap_or(0) > 0 && n["restarts"] == 1
        }) && s["placement"]["uncovered"] == 0
    });
    traffic.wait_for(traffic.done().0 + 4, Duration::from_secs(60));

    let co = u.state["coordinators"][0]["pid"].as_u64().unwrap();
    signal(co, libc::SIGKILL);
    wait(Duration::from_secs(30), "the coordinator restarted", || {
        state(&u)["coordinators"][0]["pid"].as_u64().is_some_and(|p| p != co)
    });
    wait(Duration::from_secs(30), "leadership back", || status(&u)["leader"] == "coordinator-0");
    assert_eq!(status(&u)["supervisor"]["children"]["coordinator-0"]["restarts"], 1);
    traffic.wait_for(traffic.done().0 + 4, Duration::from_secs(60));
    traffic.finish_without_failures();
}

#[test]
fn a_stopped_node_costs_no_request_and_serves_again_once_continued() {
    // The dispatch timeout is the router's default, 10 s: without hedging,
    // every step touching the stopped node would stall for all of it.
    let u = up_with(&fixture(CASE), "sigstop", &[], &[], Stdio::null());
    let (grpc, http) = (
        u.state["router"]["grpc"].as_str().unwrap().to_string(),
        u.state["router"]["http"].as_str().unwrap().to_string(),
    );
    let bench = std::thread::spawn(move || {
        let args = ["bench", "--router", &grpc, "--concurrency", "8", "--duration", "10", "--prompt-tokens", "16"];
        common::command("expertmesh").args(args).args(["--max-tokens", "16", "--json"]).output().unwrap()
    });
    wait(Duration::from_secs(30), "traffic flowing", || metric(&http, "expertmesh_generation_tokens_total") > 50.0);
    let pid = node(&u.state, "en-1")["pid"].as_u64().unwrap();
    signal(pid, libc::SIGSTOP);
    // The scenario: the node stays hung this long.
    std::thread::sleep(Duration::from_secs(4));
    let during = metric(&http, "expertmesh_node_tokens_total{node=\"en-1\"}");
    assert_eq!(metric(&http, "expertmesh_dispatch_suspected_nodes"), 1.0, "the hung node is suspected");
    signal(pid, libc::SIGCONT);
    let t0 = Instant::now();
    wait(Duration::from_secs(5), "en-1 serving again", || {
        metric(&http, "expertmesh_dispatch_suspected_nodes") == 0.0
            && metric(&http, "expertmesh_node_tokens_total{node=\"en-1\"}") > during
    });
    eprintln!("en-1 served again {:?} after SIGCONT", t0.elapsed());
    let out = bench.join().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{r}");
    assert_eq!(r["errors"], 0, "{r}");
    assert!(r["requests"].as_u64().unwrap() > 8, "{r}");
    let gap = r["itl_max_s"].as_f64().unwrap();
    assert!(gap < 5.0, "largest inter-token gap {gap} s: a stall near the 10 s dispatch timeout: {r}");
    assert!(metric(&http, "expertmesh_dispatch_hedged_total{node=\"en-1\"}") >= 1.0);
}

#[test]
fn router_nodes_and_coordinator_answer_both_reflection_versions() {
    let u = up_with(&fixture(CASE), "reflect", &[], &[], Stdio::null());
    let router = u.state["router"]["grpc"].as_str().unwrap().to_string();
    let node = u.state["expert_nodes"][0]["addr"].as_str().unwrap().to_string();
    let coordinator = u.state["coordinators"][0]["grpc"].as_str().unwrap().to_string();
    for (who, addr, service) in [
        ("router", router, "expertmesh.v1.GenerateService"),
        ("router", u.state["router"]["grpc"].as_str().unwrap().to_string(), "inference.GRPCInferenceService"),
        ("expert node", node, "expertmesh.v1.ExpertService"),
        ("coordinator", coordinator, "grpc.health.v1.Health"),
    ] {
        let (v1, v1alpha) = reflection::reflected_services(&addr);
        assert!(v1.iter().any(|s| s == service), "{who} v1 lists {v1:?}");
        // Each version also lists itself; the rest is the same.
        let others =
            |v: &[String]| v.iter().filter(|s| !s.starts_with("grpc.reflection.")).cloned().collect::<Vec<_>>();
        assert_eq!(others(&v1), others(&v1alpha), "{who}: both versions list the same services");
        assert!(v1alpha.iter().any(|s| s == "grpc.reflection.v1alpha.ServerReflection"), "{who}: {v1alpha:?}");
    }
}
