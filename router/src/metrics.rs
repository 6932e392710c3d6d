//! The router's Prometheus metrics (names are the dashboards' interface).
//! Label values known in advance (error and finish reasons, routes and
//! methods with their success status) start at 0, so every panel has data
//! on a fresh cluster.

use crate::generation::GenerationError;
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
    pub invalid_placements: IntCounter,
}

/// The HTTP routes the router serves (`expertmesh_http_requests_total`'s
/// `route` label is the matched route).
pub const HTTP_ROUTES: [&str; 10] = [
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/v2/models/{model}/generate",
    "/v2/models/{model}/generate_stream",
    "/v2/health/live",
    "/v2/health/ready",
    "/health",
    "/ready",
    "/metrics",
];

/// The public gRPC methods that generate.
pub const GRPC_METHODS: [&str; 3] = ["Generate", "ModelInfer", "ModelStreamInfer"];

fn latency(name: &str, help: &str, buckets: Vec<f64>) -> prometheus::Result<Histogram> {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
}

impl Metrics {
    /// Builds and registers every metric.
    pub fn new() -> prometheus::Result<Self> {
        let registry = expertmesh_plumbing::metrics::registry("router")?;
        let buckets = vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
        let m = Metrics {
            requests_running: IntGauge::new("expertmesh_requests_running", "Requests in the running batch")?,
            requests_waiting: IntGauge::new("expertmesh_requests_waiting", "Requests queued for admission")?,
            prompt_tokens: IntCounter::new("expertmesh_prompt_tokens_total", "Prompt tokens prefilled")?,
            generation_tokens: IntCounter::new("expertmesh_generation_tokens_total", "Tokens generated")?,
            ttft: latency(
                "expertmesh_time_to_first_token_seconds",
                "Time from arrival to the first token",
                buckets.clone(),
            )?,
            itl: latency("expertmesh_inter_token_latency_seconds", "Time between consecutive tokens", buckets.clone())?,
            e2e: latency("expertmesh_e2e_request_latency_seconds", "Time from arrival to the last token", buckets)?,
            success: IntCounterVec::new(
                Opts::new("expertmesh_request_success_total", "Finished requests"),
                &["finish_reason"],
            )?,
            errors: IntCounterVec::new(Opts::new("expertmesh_request_errors_total", "Failed requests"), &["reason"])?,
            http_requests: IntCounterVec::new(
                Opts::new("expertmesh_http_requests_total", "HTTP requests by matched route and status"),
                &["route", "status"],
            )?,
            grpc_requests: IntCounterVec::new(
                Opts::new("expertmesh_grpc_requests_total", "Public gRPC calls by method and status code"),
                &["method", "code"],
            )?,
            kv_usage: Gauge::new("expertmesh_kv_cache_usage_ratio", "Reserved share of the KV-cache budget")?,
            invalid_placements: IntCounter::new(
                "expertmesh_invalid_placements_total",
                "Placements read from etcd that did not parse or fit the model (the last good one stayed)",
            )?,
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
            Box::new(m.invalid_placements.clone()),
        ];
        for c in collectors {
            m.registry.register(c)?;
        }
        m.start_at_zero();
        Ok(m)
    }

    fn start_at_zero(&self) {
        for r in GenerationError::REASONS {
            self.errors.with_label_values(&[r]);
        }
        for r in ["stop", "length"] {
            self.success.with_label_values(&[r]);
        }
        for route in HTTP_ROUTES {
            self.http_requests.with_label_values(&[route, "200"]);
        }
        for method in GRPC_METHODS {
            self.grpc_requests.with_label_values(&[method, "Ok"]);
        }
    }
}
