//! The control plane end to end, against a real etcd: expert nodes, routers
//! and coordinators as processes on loopback. Membership comes and goes with
//! leases; with `--min-replicas 2` a request stream loses nothing while an
//! expert node and the leading coordinator are killed -9; a late node gets
//! experts and traffic; a drain moves experts away without a failed
//! request; the data plane rides out an etcd outage and the control plane
//! resumes after it.

use expertmesh_cluster::etcd_server::EtcdServer;
use expertmesh_cluster::keys::{self, Keys, NodeRecord};
use expertmesh_cluster::store::{ClusterStore, Etcd};
use expertmesh_dataplane::placement::Placement;
use expertmesh_proto::v1::InfoRequest;
use expertmesh_proto::v1::expert_service_client::ExpertServiceClient;
use std::time::{Duration, Instant};

mod common;
use common::{Procs, Traffic, field, fixture, http_get, spawn};

const CASE: &str = "deepseek_v3_qnull";
const TTL: &str = "2";

struct Cluster {
    procs: Procs,
    etcd: EtcdServer,
    dir: std::path::PathBuf,
    rt: tokio::runtime::Runtime,
    store: Etcd,
    keys: Keys,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.procs.kill_all(); // before etcd goes
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Cluster {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("em-ctl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let etcd = EtcdServer::start(&dir).unwrap();
        let rt = common::runtime();
        let store = rt.block_on(Etcd::connect(&etcd.options())).unwrap();
        Cluster { procs: Procs::default(), etcd, dir, rt, store, keys: Keys::new("test") }
    }

    fn common_args(&self) -> Vec<String> {
        let model = fixture(CASE).to_string_lossy().into_owned();
        ["--model", &model, "--etcd", &self.etcd.url(), "--cluster", "test", "--lease-ttl", TTL]
            .map(String::from)
            .to_vec()
    }

    fn node(&mut self, id: &str) -> String {
        let mut cmd = common::command("expert-node");
        cmd.args(self.common_args()).args([
            "--listen",
            "127.0.0.1:0",
            "--node-id",
            id,
            "--threads",
            "1",
            "--metrics",
            "127.0.0.1:0",
        ]);
        let (child, line) = spawn(cmd);
        self.procs.0.push((id.into(), field(&line, "metrics="), child));
        field(&line, "grpc=")
    }

    fn coordinator(&mut self, id: &str, min_replicas: usize) {
        let mut cmd = common::command("coordinator");
        cmd.args(self.common_args()).args(["--id", id, "--min-replicas", &min_replicas.to_string()]);
        cmd.args(["--metrics", "127.0.0.1:0"]);
        let (child, line) = spawn(cmd);
        self.procs.0.push((id.into(), field(&line, "metrics="), child));
    }

    /// A sample's value from a process's `/metrics` (exact series text).
    fn metric(&self, proc_name: &str, series: &str) -> Option<f64> {
        let addr = &self.procs.0.iter().find(|(n, _, _)| n == proc_name)?.1;
        let body = http_get(addr, "/metrics").1;
        body.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// Starts a router and waits until it serves with full coverage.
    fn router(&mut self) -> String {
        let (grpc, http) = self.router_started();
        assert!(wait(Duration::from_secs(30), || http_get(&http, "/ready").0 == 200), "router never became ready");
        grpc
    }

    /// Starts a router (its metrics under the name "router"); returns (grpc, http).
    fn router_started(&mut self) -> (String, String) {
        let mut cmd = common::command("router");
        cmd.args(self.common_args()).args(["--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0", "--threads", "1"]);
        let (child, line) = spawn(cmd);
        let (grpc, http) = (field(&line, "grpc="), field(&line, "http="));
        self.procs.0.push(("router".into(), http.clone(), child));
        (grpc, http)
    }

    fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.rt.block_on(self.store.get(key)).ok().flatten()
    }

    fn placement(&self) -> Option<Placement> {
        self.get(&self.keys.placement()).and_then(|b| Placement::from_json(&b).ok())
    }

    fn node_ids(&self) -> Vec<String> {
        match self.rt.block_on(self.store.list(&self.keys.nodes())) {
            Ok(l) => l.entries.iter().map(|(k, v)| keys::decode::<NodeRecord>(k, v).unwrap().id).collect(),
            Err(_) => Vec::new(),
        }
    }

    fn leader(&self) -> Option<String> {
        self.get(&self.keys.leader()).map(|b| String::from_utf8(b).unwrap())
    }

    fn held(&self, addr: &str) -> usize {
        self.rt.block_on(async {
            let mut c = ExpertServiceClient::connect(format!("http://{addr}")).await.unwrap();
            let info = c.info(InfoRequest {}).await.unwrap().into_inner();
            info.experts.iter().map(|l| l.experts.len()).sum()
        })
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        common::command("expertmesh")
            .args(args)
            .args(["--etcd", &self.etcd.url(), "--cluster", "test"])
            .output()
            .unwrap()
    }
}

fn wait(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn members_appear_and_vanish_within_the_ttl_after_kill_9() {
    let mut c = Cluster::new("members");
    c.node("en-0");
    c.node("en-1");
    assert!(wait(Duration::from_secs(10), || c.node_ids() == ["en-0", "en-1"]));
    let t0 = Instant::now();
    c.procs.kill("en-1");
    assert!(wait(Duration::from_secs(5), || c.node_ids() == ["en-0"]), "en-1 still listed");
    let gone = t0.elapsed();
    eprintln!("kill -9 to membership removal: {gone:?} (TTL {TTL} s)");
    assert!(gone <= Duration::from_secs(4), "removed after {gone:?}");
}

#[test]
fn killing_a_node_and_the_leader_loses_no_request() {
    let mut c = Cluster::new("failover");
    c.coordinator("co-a", 2);
    c.coordinator("co-b", 2);
    for i in 0..3 {
        c.node(&format!("en-{i}"));
    }
    let grpc = c.router();
    let first = c.placement().unwrap();
    assert!(first.nodes.len() == 3);
    let traffic = Traffic::start(&grpc, 2, CASE);
    traffic.wait_for(4, Duration::from_secs(60));
    let leader = c.leader().unwrap();
    let t0 = Instant::now();
    c.procs.kill("en-1");
    c.procs.kill(&leader);
    // A new leader, and a placement that covers everything without en-1.
    assert!(wait(Duration::from_secs(15), || c.leader().is_some_and(|l| l != leader)), "no new leader");
    let elected = t0.elapsed();
    assert!(
        wait(Duration::from_secs(20), || c.placement().is_some_and(|p| !p.nodes.contains_key("en-1"))),
        "no placement without en-1"
    );
    let replanned = t0.elapsed();
    // Traffic on the new placement, too.
    traffic.wait_for(traffic.done().0 + 4, Duration::from_secs(60));
    let (ok, failed) = traffic.finish();
    eprintln!("new leader after {elected:?}, full coverage after {replanned:?}; {ok} requests ok");
    assert!(failed.is_empty(), "{} failed requests: {:?}", failed.len(), &failed[..failed.len().min(3)]);
    assert!(ok >= 4, "only {ok} requests completed");
    let status = c.cli(&["status", "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(s["placement"]["uncovered"], 0, "{s}");
    assert_ne!(s["leader"], serde_json::json!(leader));
    assert_eq!(s["nodes"].as_array().unwrap().len(), 2, "{s}");
}

#[test]
fn a_late_node_gets_experts_and_traffic_and_a_drain_moves_them_away() {
    let mut c = Cluster::new("join");
    c.coordinator("co-a", 1);
    let a0 = c.node("en-0");
    c.node("en-1");
    let grpc = c.router();
    let late = c.node("en-2");
    assert!(
        wait(Duration::from_secs(20), || c.placement().is_some_and(|p| !p.experts_of("en-2").is_empty())),
        "the late node got no experts"
    );
    assert!(c.held(&late) > 0);
    let traffic = Traffic::start(&grpc, 2, CASE);
    traffic.wait_for(4, Duration::from_secs(60));
    let metrics = c.procs.0.iter().find(|(n, _, _)| n == "en-2").unwrap().1.clone();
    let served = || -> f64 {
        http_get(&metrics, "/metrics")
            .1
            .lines()
            .filter(|l| l.starts_with("expertmesh_node_expert_tokens_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(wait(Duration::from_secs(30), || served() > 0.0), "the late node computed nothing");
    assert_eq!(c.metric("co-a", "expertmesh_coordinator_is_leader"), Some(1.0));
    assert_eq!(c.metric("co-a", "expertmesh_rebalances_total{reason=\"initial\"}"), Some(1.0));
    // Counted once the change is fully applied (routers acked, old copies unloaded).
    let join = || c.metric("co-a", "expertmesh_rebalances_total{reason=\"join\"}");
    assert!(wait(Duration::from_secs(30), || join() == Some(1.0)), "join counted {:?}", join());
    assert_eq!(c.metric("co-a", "expertmesh_placement_version"), Some(2.0));
    assert_eq!(c.metric("co-a", "expertmesh_placement_uncovered_experts"), Some(0.0));
    assert_eq!(c.metric("co-a", "expertmesh_cluster_nodes{state=\"ready\"}"), Some(3.0));
    assert!(c.metric("co-a", "expertmesh_experts_moved_total").unwrap() > 0.0);

    // Drain en-0 under traffic.
    let out = c.cli(&["drain", "en-0", "--wait", "30"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(c.placement().unwrap().experts_of("en-0").is_empty());
    assert!(wait(Duration::from_secs(10), || c.held(&a0) == 0), "en-0 still holds experts");
    traffic.wait_for(traffic.done().0 + 2, Duration::from_secs(60));
    let (ok, failed) = traffic.finish();
    assert!(failed.is_empty(), "{} failed: {:?}", failed.len(), &failed[..failed.len().min(3)]);
    assert!(ok >= 4);
    let s: serde_json::Value = serde_json::from_slice(&c.cli(&["status", "--json"]).stdout).unwrap();
    let en0 = s["nodes"].as_array().unwrap().iter().find(|n| n["id"] == "en-0").unwrap().clone();
    assert_eq!(en0["state"], "drained");
    assert_eq!(en0["experts"], 0);
    assert_eq!(c.metric("co-a", "expertmesh_rebalances_total{reason=\"drain\"}"), Some(1.0));
    assert!(
        wait(Duration::from_secs(3), || c.metric("co-a", "expertmesh_cluster_nodes{state=\"drained\"}") == Some(1.0))
    );
}

#[test]
fn the_data_plane_rides_out_an_etcd_outage_and_the_control_plane_resumes() {
    let mut c = Cluster::new("outage");
    c.coordinator("co-a", 1);
    c.node("en-0");
    c.node("en-1");
    let grpc = c.router();
    let version = c.placement().unwrap().version;
    c.etcd.kill();
    let traffic = Traffic::start(&grpc, 2, CASE);
    traffic.wait_for(4, Duration::from_secs(60));
    let (ok, failed) = traffic.finish();
    assert!(failed.is_empty() && ok >= 2, "during the outage: {ok} ok, failures {failed:?}");
    c.etcd.restart().unwrap();
    // Members re-register; a node joining now is placed.
    assert!(wait(Duration::from_secs(20), || c.node_ids().len() == 2), "members did not come back");
    c.node("en-2");
    assert!(
        wait(Duration::from_secs(25), || c
            .placement()
            .is_some_and(|p| p.version > version && !p.experts_of("en-2").is_empty())),
        "the control plane did not resume"
    );
    let (ok, failed) = {
        let t = Traffic::start(&grpc, 1, CASE);
        t.wait_for(2, Duration::from_secs(60));
        t.finish()
    };
    assert!(failed.is_empty() && ok >= 1, "after the outage: {ok} ok, failures {failed:?}");
}

#[test]
fn requests_before_the_first_placement_wait_and_traffic_at_first_coverage_never_fails() {
    let mut c = Cluster::new("ready");
    c.coordinator("co-a", 2);
    c.coordinator("co-b", 2);
    // The router first: no node yet, so nothing can be placed.
    let (grpc, http) = c.router_started();
    assert_eq!(http_get(&http, "/ready").0, 503, "ready before any placement");
    let s = c.status();
    assert_eq!(s["placement"]["in_force"], false, "{s}");
    assert_ne!(s["placement"]["uncovered"], 0, "no placement is not full coverage: {s}");
    // A request now waits in the queue instead of failing.
    let early = Traffic::start(&grpc, 1, CASE);
    for i in 0..3 {
        c.node(&format!("en-{i}"));
    }
    // Poll status as a client would; send traffic the moment it reports coverage.
    let t0 = Instant::now();
    loop {
        let s = c.status();
        if s["placement"]["in_force"] == true && s["placement"]["uncovered"] == 0 {
            break;
        }
        assert!(s["placement"]["uncovered"] != 0 || s["placement"]["version"] != 0, "covered without a placement: {s}");
        assert!(t0.elapsed() < Duration::from_secs(30), "never covered: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let traffic = Traffic::start(&grpc, 6, CASE);
    traffic.wait_for(120, Duration::from_secs(120));
    traffic.finish_without_failures();
    early.wait_for(1, Duration::from_secs(30));
    let (ok, failed) = early.finish();
    assert!(failed.is_empty() && ok >= 1, "the early request: {failed:?}");
    assert_eq!(http_get(&http, "/ready").0, 200);
}

#[test]
fn garbage_in_the_placement_key_is_counted_and_the_last_good_placement_stays() {
    let mut c = Cluster::new("garbage");
    c.coordinator("co-a", 1);
    c.node("en-0");
    c.node("en-1");
    let grpc = c.router();
    let version = c.placement().unwrap().version;
    c.rt.block_on(c.store.put(&c.keys.placement(), b"{\"version\": 99, \"nodes\": [".to_vec(), None)).unwrap();
    let counted = |p: &str| c.metric(p, "expertmesh_invalid_placements_total") == Some(1.0);
    assert!(wait(Duration::from_secs(10), || counted("router") && counted("co-a")), "the bad value was not counted");
    let s = c.status();
    assert!(s["placement"]["invalid"].is_string(), "{s}");
    // Still serving on the last good placement.
    let traffic = Traffic::start(&grpc, 1, CASE);
    traffic.wait_for(2, Duration::from_secs(60));
    let (ok, failed) = traffic.finish();
    assert!(failed.is_empty() && ok >= 2, "{failed:?}");
    // The next change is planned from the last good placement and replaces the garbage.
    c.node("en-2");
    assert!(
        wait(Duration::from_secs(30), || c
            .placement()
            .is_some_and(|p| p.version == version + 1 && !p.experts_of("en-2").is_empty())),
        "no valid placement after the join"
    );
    let traffic = Traffic::start(&grpc, 1, CASE);
    traffic.wait_for(2, Duration::from_secs(60));
    assert!(traffic.finish().1.is_empty());
}
