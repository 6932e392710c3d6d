//! Expert-node metrics. Per-expert series are labelled `{layer,expert}`:
//! one per expert this node holds.

use prometheus::{CounterVec, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};

pub struct NodeMetrics {
    pub registry: Registry,
    pub expert_tokens: IntCounterVec,
    pub compute_seconds: CounterVec,
    pub experts_loaded: IntGauge,
    pub batch_tokens: Histogram,
    /// Dispatch batches being validated or computed right now.
    pub batches_in_flight: IntGauge,
    /// Per-expert series, or one per layer (`expert="all"`).
    pub per_expert: bool,
}

impl NodeMetrics {
    pub fn new(per_expert: bool) -> prometheus::Result<Self> {
        let m = NodeMetrics {
            registry: expertmesh_plumbing::metrics::registry("expert-node")?,
            expert_tokens: IntCounterVec::new(
                Opts::new("expertmesh_node_expert_tokens_total", "Token-expert pairs computed"),
                &["layer", "expert"],
            )?,
            compute_seconds: CounterVec::new(
                Opts::new("expertmesh_node_expert_compute_seconds_total", "Time spent computing each expert"),
                &["layer", "expert"],
            )?,
            experts_loaded: IntGauge::new("expertmesh_node_experts_loaded", "Routed experts held")?,
            batch_tokens: Histogram::with_opts(
                HistogramOpts::new("expertmesh_node_batch_tokens", "Distinct token rows per dispatch batch")
                    .buckets(prometheus::exponential_buckets(1.0, 2.0, 14)?),
            )?,
            batches_in_flight: IntGauge::new(
                "expertmesh_node_batches_in_flight",
                "Dispatch batches being validated or computed now",
            )?,
            per_expert,
        };
        m.registry.register(Box::new(m.expert_tokens.clone()))?;
        m.registry.register(Box::new(m.compute_seconds.clone()))?;
        m.registry.register(Box::new(m.experts_loaded.clone()))?;
        m.registry.register(Box::new(m.batch_tokens.clone()))?;
        m.registry.register(Box::new(m.batches_in_flight.clone()))?;
        Ok(m)
    }
}
