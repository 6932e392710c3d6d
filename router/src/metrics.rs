//! The router's Prometheus metrics (names are the dashboards' interface).
//! Label values known in advance (error and finish reasons, routes and
//! methods with their success status) start at 0, so every panel has data
//! on a fresh cluster.

use crate::generation::GenerationError;
use expertmesh_model::cache::{KvPool, PoolStats};
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
    pub preemptions: IntCounter,
    pub prefix: PrefixMetrics,
    pub spec: SpecMetrics,
}

/// Speculative decoding (`--speculative mtp`): acceptance is
/// accepted / draft tokens, and tokens per verifying step is
/// 1 + accepted / drafts.
pub struct SpecMetrics {
    /// Verifying steps (one per sequence and step that carried drafts).
    pub drafts: IntCounter,
    pub draft_tokens: IntCounter,
    pub accepted_tokens: IntCounter,
    /// Sequences that went on without speculation after an MTP pass failed
    /// (its cache pool ran short, say).
    pub stopped: IntCounter,
}

/// The prefix cache's series, copied from the pool's own counters.
pub struct PrefixMetrics {
    queried: IntCounter,
    hits: IntCounter,
    hit_ratio: Gauge,
    blocks: IntGauge,
    evictions: IntCounter,
    /// The pool's counters when last copied (they only grow).
    seen: std::sync::Mutex<PoolStats>,
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
            kv_usage: Gauge::new(
                "expertmesh_kv_cache_usage_ratio",
                "Share of the KV blocks held by sequences (idle prefix-cache blocks count as free)",
            )?,
            preemptions: IntCounter::new(
                "expertmesh_kv_preemptions_total",
                "Sequences preempted for KV blocks (freed, then recomputed)",
            )?,
            prefix: PrefixMetrics {
                queried: IntCounter::new("expertmesh_prefix_cache_queried_tokens_total", "Prompt tokens looked up")?,
                hits: IntCounter::new(
                    "expertmesh_prefix_cache_hit_tokens_total",
                    "Prompt tokens found in the prefix cache (not computed)",
                )?,
                hit_ratio: Gauge::new(
                    "expertmesh_prefix_cache_hit_ratio",
                    "Prompt tokens reused over prompt tokens looked up, since start",
                )?,
                blocks: IntGauge::new("expertmesh_prefix_cache_blocks", "KV blocks in the prefix cache")?,
                evictions: IntCounter::new(
                    "expertmesh_prefix_cache_evictions_total",
                    "Prefix-cache blocks evicted to make room",
                )?,
                seen: Default::default(),
            },
            spec: SpecMetrics {
                drafts: IntCounter::new(
                    "expertmesh_spec_decode_drafts_total",
                    "Sequence steps that verified drafted tokens",
                )?,
                draft_tokens: IntCounter::new(
                    "expertmesh_spec_decode_draft_tokens_total",
                    "Tokens drafted by the MTP module and verified",
                )?,
                accepted_tokens: IntCounter::new(
                    "expertmesh_spec_decode_accepted_tokens_total",
                    "Drafted tokens the model accepted",
                )?,
                stopped: IntCounter::new(
                    "expertmesh_spec_decode_stopped_total",
                    "Sequences that went on without speculation after an MTP pass failed (e.g. its KV blocks ran out)",
                )?,
            },
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
            Box::new(m.preemptions.clone()),
            Box::new(m.prefix.queried.clone()),
            Box::new(m.prefix.hits.clone()),
            Box::new(m.prefix.hit_ratio.clone()),
            Box::new(m.prefix.blocks.clone()),
            Box::new(m.prefix.evictions.clone()),
            Box::new(m.spec.drafts.clone()),
            Box::new(m.spec.draft_tokens.clone()),
            Box::new(m.spec.accepted_tokens.clone()),
            Box::new(m.spec.stopped.clone()),
        ];
        for c in collectors {
            m.registry.register(c)?;
        }
        m.start_at_zero();
        Ok(m)
    }

    /// The pool's levels and counters, as of now.
    pub fn observe_kv_pool(&self, pool: &KvPool) {
        let (st, free) = (pool.stats(), pool.available());
        self.kv_usage.set(1.0 - free.min(st.capacity_blocks) as f64 / st.capacity_blocks.max(1) as f64);
        let p = &self.prefix;
        p.blocks.set(st.cached_blocks as i64);
        let mut seen = p.seen.lock().unwrap_or_else(|e| e.into_inner());
        p.queried.inc_by(st.queried_tokens.saturating_sub(seen.queried_tokens));
        p.hits.inc_by(st.hit_tokens.saturating_sub(seen.hit_tokens));
        p.evictions.inc_by(st.evictions.saturating_sub(seen.evictions));
        p.hit_ratio.set(st.hit_tokens as f64 / st.queried_tokens.max(1) as f64);
        *seen = st;
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
