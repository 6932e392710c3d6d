//! Observability end to end: a real Prometheus (Debian's `prometheus`)
//! scrapes a local `expertmesh up` cluster through the shipped
//! `deploy/prometheus/prometheus.yml` and rules while traffic flows, and
//! every query of every shipped Grafana dashboard returns data; the
//! routers' and the nodes' per-expert counters agree in Prometheus.

mod common;
use common::{fixture, up_with};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const MODEL: &str = "deepseek_v3_yarn_bf16";

fn repo(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
}

struct Prometheus {
    child: Child,
    dir: PathBuf,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Prometheus on the shipped config, pointed at `targets` and scraping every
/// second (the shipped 5 s would make the test slow, nothing else).
fn prometheus(targets: &Path) -> Prometheus {
    let dir = std::env::temp_dir().join(format!("em-prom-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = std::fs::read_to_string(repo("deploy/prometheus/prometheus.yml")).unwrap();
    assert!(cfg.contains("/tmp/expertmesh-targets.json") && cfg.contains("- expertmesh-rules.yml"));
    let rules = repo("deploy/prometheus/expertmesh-rules.yml");
    let cfg = cfg
        .replace("/tmp/expertmesh-targets.json", targets.to_str().unwrap())
        .replace("- expertmesh-rules.yml", &format!("- {}", rules.to_str().unwrap()))
        .replace("scrape_interval: 5s", "scrape_interval: 1s")
        .replace("evaluation_interval: 5s", "evaluation_interval: 1s");
    std::fs::write(dir.join("prometheus.yml"), cfg).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("starting prometheus ({e}): install Debian's prometheus package"));
    Prometheus { child, dir, url: format!("http://127.0.0.1:{port}") }
}

fn get(rt: &tokio::runtime::Runtime, url: &str, query: &[(&str, &str)]) -> Option<Value> {
    rt.block_on(async {
        let url = reqwest::Url::parse_with_params(url, query).ok()?;
        let r = reqwest::Client::new().get(url).timeout(Duration::from_secs(5)).send().await.ok()?;
        r.json::<Value>().await.ok()
    })
}

/// An instant query's result vector (empty on error).
fn query(rt: &tokio::runtime::Runtime, prom: &Prometheus, q: &str) -> Vec<Value> {
    get(rt, &format!("{}/api/v1/query", prom.url), &[("query", q)])
        .and_then(|v| v["data"]["result"].as_array().cloned())
        .unwrap_or_default()
}

/// Whether a result has at least one real (not NaN) value.
fn has_data(result: &[Value]) -> bool {
    result.iter().any(|s| s["value"][1].as_str().is_some_and(|v| v != "NaN"))
}

/// Every `expr` of every panel, and every template variable's query.
fn dashboard_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for name in ["cluster-overview", "expert-utilization", "data-plane"] {
        let d: Value =
            serde_json::from_str(&std::fs::read_to_string(repo(&format!("deploy/grafana/{name}.json"))).unwrap())
                .unwrap();
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                out.push((format!("{name}: {}", p["title"]), t["expr"].as_str().unwrap().to_string()));
            }
        }
        for v in d["templating"]["list"].as_array().unwrap() {
            if let Some(q) = v["query"]["query"].as_str() {
                // label_values(METRIC_SELECTOR, label): the selector must match series.
                let inner = q.strip_prefix("label_values(").and_then(|r| r.rsplit_once(',')).unwrap().0;
                out.push((format!("{name}: variable {}", v["name"]), inner.to_string()));
            }
        }
    }
    out
}

#[test]
fn prometheus_scrapes_the_cluster_and_every_dashboard_query_has_data() {
    // reqwest is built without a TLS provider of its own (as in the CLI).
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let targets = std::env::temp_dir().join(format!("em-targets-{}.json", std::process::id()));
    let model = fixture(MODEL);
    let extra = ["--prometheus-targets", targets.to_str().unwrap()];
    let u = up_with(&model, "obs", &extra, &[], Stdio::null());
    let t: Value = serde_json::from_str(&std::fs::read_to_string(&targets).unwrap()).unwrap();
    assert_eq!(t.as_array().unwrap().len(), 5, "router, 3 nodes, coordinator: {t}");
    let prom = prometheus(&targets);
    let rt = common::runtime();
    let (grpc, http) = (u.state["router"]["grpc"].as_str().unwrap(), u.state["router"]["http"].as_str().unwrap());

    // Light traffic until the queries are done: OpenAI over HTTP and the
    // gRPC API, nothing refused (error series start at 0 on their own).
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (stop, grpc, url) = (stop.clone(), grpc.to_string(), format!("http://{http}"));
        std::thread::spawn(move || {
            let load = ["--concurrency", "4", "--requests", "8", "--prompt-tokens", "8", "--max-tokens", "8", "--json"];
            while !stop.load(Ordering::Relaxed) {
                for api in [vec!["--url", url.as_str(), "--api", "openai"], vec!["--router", grpc.as_str()]] {
                    let out = common::command("expertmesh").arg("bench").args(&api).args(load).output();
                    assert!(out.is_ok_and(|o| o.status.success()), "bench {api:?} failed");
                }
            }
        })
    };
    assert!(get(&rt, &format!("http://{http}/v1/models"), &[]).is_some());

    // Every target up, then every dashboard query answers with data.
    let t0 = Instant::now();
    while query(&rt, &prom, "up == 1").len() != 5 {
        assert!(t0.elapsed() < Duration::from_secs(60), "targets not scraped: {:?}", query(&rt, &prom, "up"));
        std::thread::sleep(Duration::from_millis(500));
    }
    let name = MODEL;
    let mut missing: Vec<(String, String)> = dashboard_queries();
    assert!(missing.len() >= 40, "the dashboards lost their queries: {}", missing.len());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !missing.is_empty() && Instant::now() < deadline {
        missing.retain(|(_, expr)| {
            let q = expr
                .replace("$cluster", "local")
                .replace("$model", name)
                .replace("$layer", ".*")
                .replace("$__rate_interval", "10s");
            !has_data(&query(&rt, &prom, &q))
        });
        std::thread::sleep(Duration::from_secs(1));
    }
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    assert!(missing.is_empty(), "dashboard queries without data: {missing:#?}");

    // The shipped rules load and evaluate without errors.
    let rules = get(&rt, &format!("{}/api/v1/rules", prom.url), &[]).unwrap();
    let all: Vec<&Value> =
        rules["data"]["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap()).collect();
    assert_eq!(all.len(), 12, "{rules}");
    assert!(all.iter().all(|r| r["health"] != "err"), "{rules}");

    // With traffic stopped, routed (router) and computed (node) token-expert
    // pairs agree for every (layer, expert), once both are scraped: exactly,
    // unless a slow node's share was hedged, which the nodes computed twice
    // (the router counts each routed pair once, whoever answered).
    let by = |m: &str| -> std::collections::BTreeMap<(String, String), String> {
        query(&rt, &prom, &format!("sum by (layer, expert) ({m}{{cluster=\"local\"}})"))
            .iter()
            .map(|s| {
                let k = (s["metric"]["layer"].as_str().unwrap().into(), s["metric"]["expert"].as_str().unwrap().into());
                (k, s["value"][1].as_str().unwrap().to_string())
            })
            .collect()
    };
    let hedged = || -> f64 {
        query(&rt, &prom, "sum(expertmesh_dispatch_hedged_total{cluster=\"local\"})")
            .first()
            .and_then(|s| s["value"][1].as_str()?.parse().ok())
            .unwrap_or(0.0)
    };
    let t0 = Instant::now();
    loop {
        let (routed, computed) = (by("expertmesh_expert_tokens_total"), by("expertmesh_node_expert_tokens_total"));
        let n = |v: &String| v.parse::<f64>().unwrap_or(f64::NAN);
        let agree = if hedged() == 0.0 {
            routed == computed
        } else {
            routed.keys().eq(computed.keys()) && routed.iter().all(|(k, v)| n(v) <= n(&computed[k]))
        };
        if !routed.is_empty() && agree {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "hedged {}: router {routed:?}\nnodes {computed:?}", hedged());
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = std::fs::remove_file(&targets);
}

#[test]
fn json_logs_carry_a_request_trace_id_from_the_router_to_the_expert_nodes() {
    use expertmesh_proto::v1::generate_request::Prompt;
    use expertmesh_proto::v1::generate_service_client::GenerateServiceClient;
    use expertmesh_proto::v1::{GenerateRequest, TokenIds};
    let log = std::env::temp_dir().join(format!("em-trace-{}.log", std::process::id()));
    let env =
        [("EXPERTMESH_LOG_FORMAT", "json"), ("RUST_LOG", "info,expertmesh_router=debug,expertmesh_expert_node=debug")];
    let mut u = up_with(&fixture(MODEL), "trace", &[], &env, std::fs::File::create(&log).unwrap().into());
    let grpc = u.state["router"]["grpc"].as_str().unwrap().to_string();
    let id = "0af7651916cd43dd8448eb211c80319c";
    common::runtime().block_on(async {
        let mut c = GenerateServiceClient::connect(format!("http://{grpc}")).await.unwrap();
        let mut r = tonic::Request::new(GenerateRequest {
            prompt: Some(Prompt::TokenIds(TokenIds { ids: vec![5, 6, 7, 8] })),
            max_tokens: 4,
            ignore_eos: true,
            ..Default::default()
        });
        r.metadata_mut().insert("traceparent", format!("00-{id}-b7ad6b7169203331-01").parse().unwrap());
        let mut s = c.generate(r).await.unwrap().into_inner();
        while s.message().await.unwrap().is_some() {}
    });
    // SAFETY: signalling the child we spawned; it drains and exits.
    unsafe { libc::kill(u.child.id() as i32, libc::SIGINT) };
    let _ = u.child.wait();
    let lines: Vec<Value> =
        std::fs::read_to_string(&log).unwrap().lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let _ = std::fs::remove_file(&log);
    assert!(lines.len() > 10, "no JSON log lines");
    let msg = |l: &Value, m: &str| l["message"] == m;
    let done = lines.iter().find(|l| msg(l, "request finished") && l["trace_id"] == id);
    assert!(done.is_some_and(|l| l["completion_tokens"] == 4), "the router did not log the request under its trace id");
    // The steps that ran the request, and the node batches of those steps.
    let steps: Vec<&str> = lines
        .iter()
        .filter(|l| msg(l, "engine step") && l["requests"].as_str().is_some_and(|r| r.contains(id)))
        .filter_map(|l| l["trace_id"].as_str())
        .collect();
    assert!(steps.len() >= 4, "prefill and decode steps: {steps:?}");
    let batches = lines
        .iter()
        .filter(|l| msg(l, "dispatch batch computed") && l["trace_id"].as_str().is_some_and(|t| steps.contains(&t)))
        .count();
    // 2 MoE layers per step, each on at least one node.
    assert!(batches >= 2 * steps.len(), "{batches} node batches for {} steps", steps.len());
    assert!(!lines.iter().any(|l| msg(l, "prompt")), "prompts were logged without --log-prompts");
}
