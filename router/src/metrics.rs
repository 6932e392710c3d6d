//! The router's Prometheus metrics (names are the dashboards' interface).

use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

pub struct Metrics {
    pub registry: Registry,
    pub requests_running: IntGauge,
    pub requests_waiting: IntGauge,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub success: IntCounterVec,
    pub errors: IntCounterVec,
    pub http_requests: IntCounterVec,
    pub grpc_requests: IntCounterVec,
    pub kv_usage: Gauge,
}

fn latency(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("static metric definition")
}

impl Metrics {
    /// Builds and registers every metric. Names and label sets are fixed at
    /// compile time, so construction cannot fail at run time.
    pub fn new() -> Self {
        let registry = expertmesh_cluster::metrics::registry("router");
        let buckets = vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
        let m = Metrics {
            requests_running: IntGauge::new("expertmesh_requests_running", "Requests in the running batch")
                .expect("static metric definition"),
            requests_waiting: IntGauge::new("expertmesh_requests_waiting", "Requests queued for admission")
                .expect("static metric definition"),
            prompt_tokens: IntCounter::new("expertmesh_prompt_tokens_total", "Prompt tokens prefilled")
                .expect("static metric definition"),
            generation_tokens: IntCounter::new("expertmesh_generation_tokens_total", "Tokens generated")
                .expect("static metric definition"),
            ttft: latency(
                "expertmesh_time_to_first_token_seconds",
                "Time from arrival to the first token",
                buckets.clone(),
            ),
            itl: latency("expertmesh_inter_token_latency_seconds", "Time between consecutive tokens", buckets.clone()),
            e2e: latency("expertmesh_e2e_request_latency_seconds", "Time from arrival to the last token", buckets),
            success: IntCounterVec::new(
                Opts::new("expertmesh_request_success_total", "Finished requests"),
                &["finish_reason"],
            )
            .expect("static metric definition"),
            errors: IntCounterVec::new(Opts::new("expertmesh_request_errors_total", "Failed requests"), &["reason"])
                .expect("static metric definition"),
            http_requests: IntCounterVec::new(
                Opts::new("expertmesh_http_requests_total", "HTTP requests by matched route and status"),
                &["route", "status"],
            )
            .expect("static metric definition"),
            grpc_requests: IntCounterVec::new(
                Opts::new("expertmesh_grpc_requests_total", "Public gRPC calls by method and status code"),
                &["method", "code"],
            )
            .expect("static metric definition"),
            kv_usage: Gauge::new("expertmesh_kv_cache_usage_ratio", "Reserved share of the KV-cache budget")
                .expect("static metric definition"),
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.requests_running.clone()),
            Box::new(m.requests_waiting.clone()),
            Box::new(m.prompt_tokens.clone()),
            Box::new(m.generation_tokens.clone()),
            Box::new(m.ttft.clone()),
            Box::new(m.itl.clone()),
            Box::new(m.e2e.clone()),
            Box::new(m.success.clone()),
            Box::new(m.errors.clone()),
            Box::new(m.http_requests.clone()),
            Box::new(m.grpc_requests.clone()),
            Box::new(m.kv_usage.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        m
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
