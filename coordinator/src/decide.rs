//! What the leader decides, as pure functions of a [`View`] of the cluster:
//! which nodes may hold experts, whether a change is due and why, and the
//! next placement. No I/O here, so every rule is unit-tested directly.

use expertmesh_cluster::keys::{DrainState, LoadReport, NodeRecord, NodeState, RouterRecord};
use expertmesh_cluster::planner::{self, PlanError, PlanRequest};
use expertmesh_dataplane::placement::Placement;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// The cluster as the leader last saw it in etcd.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub nodes: BTreeMap<String, NodeRecord>,
    pub routers: BTreeMap<String, RouterRecord>,
    pub loads: Vec<LoadReport>,
    pub drains: BTreeMap<String, DrainState>,
    /// The operator's last rebalance request (any change asks again).
    pub rebalance: Option<Vec<u8>>,
    pub placement: Option<Placement>,
}

/// What the planner needs to know about the model.
#[derive(Debug, Clone)]
pub struct ModelShape {
    pub moe_layers: Vec<usize>,
    pub experts: usize,
    /// Expert groups of group-limited routing; 1 when routing is not grouped.
    pub groups: usize,
}

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

/// Nodes that may hold experts: ready, and not drained or being drained.
pub fn eligible(v: &View) -> BTreeMap<String, &NodeRecord> {
    v.nodes
        .iter()
        .filter(|(id, n)| n.state == NodeState::Ready && !v.drains.contains_key(*id))
        .map(|(id, n)| (id.clone(), n))
        .collect()
}

/// Routed-token load per MoE layer (in `shape.moe_layers` order) and expert,
/// summed over the routers' reports.
pub fn total_load(v: &View, shape: &ModelShape) -> Vec<Vec<f64>> {
    let mut out = vec![vec![0.0; shape.experts]; shape.moe_layers.len()];
    for r in &v.loads {
        for (l, counts) in r.moe_layers.iter().zip(&r.layers) {
            if let Some(i) = shape.moe_layers.iter().position(|m| m == l) {
                for (o, c) in out[i].iter_mut().zip(counts) {
                    *o += c.max(0.0);
                }
            }
        }
    }
    out
}

/// `[layer][expert] -> node indices` of a placement, against `order`; nodes
/// not in `order` get indices past its end (the planner treats them as gone).
fn indices(p: &Placement, shape: &ModelShape, order: &[String]) -> Vec<Vec<Vec<usize>>> {
    let gone: BTreeMap<&String, usize> =
        p.nodes.keys().filter(|n| !order.contains(n)).enumerate().map(|(i, n)| (n, order.len() + i)).collect();
    let index = |n: &String| order.iter().position(|o| o == n).or_else(|| gone.get(n).copied());
    shape
        .moe_layers
        .iter()
        .map(|l| (0..shape.experts).map(|e| p.replicas(*l, e).iter().filter_map(index).collect()).collect())
        .collect()
}

/// Mean over layers of mean/max node load of `p` under the current loads;
/// `None` without any load yet.
pub fn balancedness(v: &View, shape: &ModelShape, p: &Placement) -> Option<f64> {
    let load = total_load(v, shape);
    if load.iter().flatten().sum::<f64>() <= 0.0 {
        return None;
    }
    let order: Vec<String> = p.nodes.keys().cloned().collect();
    let layers = indices(p, shape, &order);
    let sum: f64 = load.iter().zip(&layers).map(|(l, pl)| planner::balancedness(l, pl, order.len())).sum();
    Some(sum / load.len().max(1) as f64)
}

/// Whether the placement must change now, and why.
pub fn decide(v: &View, shape: &ModelShape, policy: &Policy, st: &mut LeaderState, now: Instant) -> Option<Trigger> {
    let ok = eligible(v);
    let Some(p) = &v.placement else {
        return (ok.len() >= policy.min_replicas).then_some(Trigger::Initial);
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
    match balancedness(v, shape, p) {
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
    let ok = eligible(v);
    let order: Vec<String> = ok.keys().cloned().collect();
    let slots: Vec<usize> =
        order.iter().map(|n| ok[n].slots_per_layer(shape.moe_layers.len(), shape.experts)).collect();
    let loads = total_load(v, shape);
    let previous = v.placement.as_ref().map(|p| indices(p, shape, &order));
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
    let next = Placement {
        version: v.placement.as_ref().map_or(0, |p| p.version) + 1,
        nodes: order.iter().map(|n| (n.clone(), ok[n].addr.clone())).collect(),
        layers,
    };
    Ok((next, plan.moved))
}

/// Logical experts of the placement in force without a live replica.
pub fn uncovered(v: &View) -> usize {
    let Some(p) = &v.placement else { return 0 };
    let live = |n: &String| {
        let at = p.nodes.get(n);
        v.nodes.get(n).is_some_and(|r| Some(&r.addr) == at && r.state != NodeState::Joining)
    };
    p.layers.values().flatten().filter(|reps| !reps.iter().any(live)).count()
}

#[cfg(test)]
mod tests;
