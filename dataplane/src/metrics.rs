//! Router-side data-plane metrics (Prometheus; the names are the dashboards'
//! interface).
//!
//! Cardinality: `expertmesh_expert_tokens_total` has one series per MoE layer
//! × routed expert (58 × 256 = 14,848 for DeepSeek-V3).

use prometheus::{GaugeVec, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};
use std::collections::HashMap;
use std::sync::Mutex;

/// The `expert` label of a per-expert series: the expert, or `all` when
/// `--per-expert-metrics false` folds each layer's experts into one series
/// (layers × experts series are 58 × 256 = 14,848 for DeepSeek-V3, per
/// router and across the nodes).
pub fn expert_label(per_expert: bool, expert: u32) -> String {
    if per_expert { expert.to_string() } else { "all".to_string() }
}

pub struct DispatchMetrics {
    pub expert_tokens: IntCounterVec,
    pub node_tokens: IntCounterVec,
    pub bytes: IntCounterVec,
    pub seconds: Histogram,
    pub balancedness: GaugeVec,
    /// Shares of a layer re-sent to other replicas because their node
    /// missed its deadline, by the slow node.
    pub hedged: IntCounterVec,
    /// Nodes that missed a deadline and have not answered a probe since.
    pub suspected_nodes: IntGauge,
    /// `--transport nccl`: layers by the way their rows went (`nccl`, or
    /// `tcp` while no communicator was usable, for hedges, and after a
    /// fault), and communicators aborted after a failed exchange.
    pub nccl_layers: IntCounterVec,
    pub nccl_aborts: prometheus::IntCounter,
    /// One `expert_tokens` series per expert, or one per layer (`expert="all"`).
    pub per_expert: bool,
    /// Decayed per-layer, per-node token load behind `balancedness`.
    window: Mutex<HashMap<usize, HashMap<String, f64>>>,
}

/// Weight of the newest step in the decayed load window (≈ the last 50 steps).
const DECAY: f64 = 0.02;

impl DispatchMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry, per_expert: bool) -> prometheus::Result<Self> {
        let m = DispatchMetrics {
            expert_tokens: IntCounterVec::new(
                Opts::new("expertmesh_expert_tokens_total", "Routed token-expert pairs"),
                &["layer", "expert"],
            )?,
            node_tokens: IntCounterVec::new(
                Opts::new("expertmesh_node_tokens_total", "Token-expert pairs computed by each node"),
                &["node"],
            )?,
            bytes: IntCounterVec::new(
                Opts::new("expertmesh_dispatch_bytes_total", "Activation bytes on the wire"),
                &["node", "direction"],
            )?,
            seconds: Histogram::with_opts(
                HistogramOpts::new("expertmesh_dispatch_seconds", "One MoE layer's dispatch round trip")
                    .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]),
            )?,
            balancedness: GaugeVec::new(
                Opts::new("expertmesh_balancedness_ratio", "Mean over max node load per layer (1 = perfectly even)"),
                &["layer"],
            )?,
            hedged: IntCounterVec::new(
                Opts::new(
                    "expertmesh_dispatch_hedged_total",
                    "Node shares hedged to other replicas after a missed deadline",
                ),
                &["node"],
            )?,
            suspected_nodes: IntGauge::new(
                "expertmesh_dispatch_suspected_nodes",
                "Expert nodes that missed a dispatch deadline and have not answered a probe since",
            )?,
            nccl_layers: IntCounterVec::new(
                Opts::new("expertmesh_dispatch_nccl_layers_total", "Layers under --transport nccl, by route"),
                &["route"],
            )?,
            nccl_aborts: prometheus::IntCounter::new(
                "expertmesh_dispatch_nccl_aborts_total",
                "NCCL communicators aborted after an exchange failed or ran past its deadline",
            )?,
            per_expert,
            window: Mutex::new(HashMap::new()),
        };
        for route in ["nccl", "tcp"] {
            m.nccl_layers.with_label_values(&[route]);
        }
        registry.register(Box::new(m.expert_tokens.clone()))?;
        registry.register(Box::new(m.node_tokens.clone()))?;
        registry.register(Box::new(m.bytes.clone()))?;
        registry.register(Box::new(m.seconds.clone()))?;
        registry.register(Box::new(m.balancedness.clone()))?;
        registry.register(Box::new(m.hedged.clone()))?;
        registry.register(Box::new(m.suspected_nodes.clone()))?;
        registry.register(Box::new(m.nccl_layers.clone()))?;
        registry.register(Box::new(m.nccl_aborts.clone()))?;
        Ok(m)
    }

    /// Activation bytes sent to (`tx`) or received from (`rx`) a node.
    pub fn count_bytes(&self, node: &str, direction: &str, n: usize) {
        self.bytes.with_label_values(&[node, direction]).inc_by(n as u64);
    }

    /// Records one layer's completed per-node loads; nodes of the layer that
    /// got nothing this step count as zero.
    pub fn observe_layer(&self, layer: usize, nodes: &[String], load: &HashMap<String, u64>) {
        // A window a panic poisoned is still a valid (if stale) window.
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let lw = w.entry(layer).or_default();
        for n in nodes {
            let x = load.get(n).copied().unwrap_or(0) as f64;
            let e = lw.entry(n.clone()).or_insert(x);
            *e = (1.0 - DECAY) * *e + DECAY * x;
        }
        let max = lw.values().copied().fold(0.0, f64::max);
        if max > 0.0 {
            let mean = lw.values().sum::<f64>() / lw.len() as f64;
            self.balancedness.with_label_values(&[&layer.to_string()]).set(mean / max);
        }
    }
}
