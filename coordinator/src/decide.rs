//! What the leader decides, as pure functions of a [`View`] of the cluster:
//! which nodes may hold experts, whether a change is due and why, and the
//! next placement. No I/O here, so every rule is unit-tested directly.

use expertmesh_cluster::view::node_indices;
pub use expertmesh_cluster::view::{ModelShape, View};
use expertmesh_planner::{self as planner, PlanError, PlanRequest};
use expertmesh_spec::placement::Placement;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Policy {
    pub min_replicas: usize,
    pub redundant: Option<usize>,
    /// Rebalance when balancedness stays below this…
    pub threshold: f64,
    /// …for this long.
    pub sustain: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// No placement yet.
    Initial,
    Join,
    /// A node in the placement died or left.
    Leave,
    Drain,
    Operator,
    Load,
}

impl Trigger {
    pub const ALL: [Trigger; 6] =
        [Trigger::Initial, Trigger::Join, Trigger::Leave, Trigger::Drain, Trigger::Operator, Trigger::Load];

    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Initial => "initial",
            Trigger::Join => "join",
            Trigger::Leave => "leave",
            Trigger::Drain => "drain",
            Trigger::Operator => "operator",
            Trigger::Load => "load",
        }
    }
}

/// What the leader remembers between ticks.
#[derive(Debug, Default)]
pub struct LeaderState {
    pub rebalance_seen: Option<Vec<u8>>,
    pub below_since: Option<Instant>,
}

/// Whether the placement must change now, and why.
pub fn decide(v: &View, shape: &ModelShape, policy: &Policy, st: &mut LeaderState, now: Instant) -> Option<Trigger> {
    let ok = v.eligible();
    let Some(p) = &v.placement else {
        // A dense model has nothing to place: its (empty) placement is due
        // at once, so its routers serve without any expert node.
        let enough = shape.moe_layers.is_empty() || ok.len() >= policy.min_replicas;
        return enough.then_some(Trigger::Initial);
    };
    let in_plan: BTreeSet<&String> = p.nodes.keys().collect();
    if in_plan.iter().any(|n| v.drains.contains_key(*n) && v.nodes.contains_key(*n)) {
        return Some(Trigger::Drain);
    }
    // A node that left, or came back at another address, holds nothing.
    if p.nodes.iter().any(|(n, addr)| ok.get(n).is_none_or(|r| &r.addr != addr)) {
        return Some(Trigger::Leave);
    }
    if ok.keys().any(|n| !in_plan.contains(n)) {
        return Some(Trigger::Join);
    }
    if v.rebalance.is_some() && v.rebalance != st.rebalance_seen {
        st.rebalance_seen = v.rebalance.clone();
        return Some(Trigger::Operator);
    }
    match v.balancedness(shape, p) {
        Some(b) if b < policy.threshold => {
            let since = *st.below_since.get_or_insert(now);
            if now.duration_since(since) >= policy.sustain {
                st.below_since = None;
                return Some(Trigger::Load);
            }
        }
        _ => st.below_since = None,
    }
    None
}

/// The next placement (version = current + 1) over the eligible nodes,
/// moving as few replicas as the planner can, and how many it moves.
pub fn plan_next(v: &View, shape: &ModelShape, policy: &Policy) -> Result<(Placement, usize), PlanError> {
    let ok = v.eligible();
    let order: Vec<String> = ok.keys().cloned().collect();
    let version = v.placement.as_ref().map_or(0, |p| p.version) + 1;
    let nodes = order.iter().map(|n| (n.clone(), ok[n].addr.clone())).collect();
    if shape.moe_layers.is_empty() {
        return Ok((Placement { version, nodes, layers: Default::default() }, 0));
    }
    let slots: Vec<usize> =
        order.iter().map(|n| ok[n].slots_per_layer(shape.moe_layers.len(), shape.experts)).collect();
    let loads = v.total_load(shape);
    let previous = v.placement.as_ref().map(|p| node_indices(p, shape, &order));
    let plan = planner::plan(&PlanRequest {
        loads: &loads,
        slots: &slots,
        min_replicas: policy.min_replicas,
        redundant: policy.redundant,
        groups: shape.groups,
        previous: previous.as_deref(),
    })?;
    let layers = shape
        .moe_layers
        .iter()
        .zip(&plan.layers)
        .map(|(l, experts)| (*l, experts.iter().map(|ns| ns.iter().map(|&i| order[i].clone()).collect()).collect()))
        .collect();
    let next = Placement { version, nodes, layers };
    Ok((next, plan.moved))
}

#[cfg(test)]
mod tests;
