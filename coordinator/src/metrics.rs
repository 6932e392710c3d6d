//! Coordinator metrics (names are the dashboards' interface).

use crate::decide::Trigger;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

pub struct CoordMetrics {
    pub registry: Registry,
    pub nodes: IntGaugeVec,
    pub placement_version: IntGauge,
    pub uncovered: IntGauge,
    pub rebalances: IntCounterVec,
    pub rebalance_seconds: Histogram,
    pub moved: IntCounter,
    pub is_leader: IntGauge,
    pub invalid_placements: IntCounter,
}

impl CoordMetrics {
    pub fn new() -> prometheus::Result<Self> {
        let m = CoordMetrics {
            registry: expertmesh_plumbing::metrics::registry("coordinator")?,
            nodes: IntGaugeVec::new(
                Opts::new("expertmesh_cluster_nodes", "Expert nodes registered, by state"),
                &["state"],
            )?,
            placement_version: IntGauge::new("expertmesh_placement_version", "Version of the placement in force")?,
            uncovered: IntGauge::new(
                "expertmesh_placement_uncovered_experts",
                "Logical experts (layer, expert) without a live replica",
            )?,
            rebalances: IntCounterVec::new(
                Opts::new("expertmesh_rebalances_total", "Placement changes applied, by trigger"),
                &["reason"],
            )?,
            rebalance_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "expertmesh_rebalance_duration_seconds",
                    "Plan, load, flip and unload of one change",
                )
                .buckets(vec![0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]),
            )?,
            moved: IntCounter::new("expertmesh_experts_moved_total", "Expert replicas loaded onto a node by a change")?,
            is_leader: IntGauge::new("expertmesh_coordinator_is_leader", "1 while this coordinator leads")?,
            invalid_placements: IntCounter::new(
                "expertmesh_invalid_placements_total",
                "Placements read from etcd that did not parse or fit the model (the last good one stayed)",
            )?,
        };
        // Known label values start at 0, so rates and panels have data at once.
        for t in Trigger::ALL {
            m.rebalances.with_label_values(&[t.as_str()]);
        }
        m.registry.register(Box::new(m.nodes.clone()))?;
        m.registry.register(Box::new(m.placement_version.clone()))?;
        m.registry.register(Box::new(m.uncovered.clone()))?;
        m.registry.register(Box::new(m.rebalances.clone()))?;
        m.registry.register(Box::new(m.rebalance_seconds.clone()))?;
        m.registry.register(Box::new(m.moved.clone()))?;
        m.registry.register(Box::new(m.is_leader.clone()))?;
        m.registry.register(Box::new(m.invalid_placements.clone()))?;
        Ok(m)
    }
}
