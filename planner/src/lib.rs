//! Expert placement: for every MoE layer, which nodes hold which experts.
//!
//! Per layer, independently (layers are planned in parallel):
//! 1. **Replica counts.** Every expert gets `min_replicas` (availability);
//!    the remaining slot budget goes one replica at a time to the expert with
//!    the highest load per replica (load), never beyond one per node.
//! 2. **Packing.** Replicas, each carrying `load / replicas`, are placed
//!    heaviest first on the least-loaded node with a free slot that does not
//!    hold that expert yet (longest-processing-time greedy under slot
//!    capacity and anti-affinity), then a local search moves or swaps
//!    replicas off the most loaded node while that lowers the maximum.
//! 3. **Stickiness and groups.** With a previous placement, or with expert
//!    groups, the plan is rebuilt under a cap: the from-scratch maximum node
//!    load plus [`TOLERANCE`]. Replicas of the previous placement stay where
//!    they are (up to the new replica counts); the others join, within the
//!    cap, the node holding the most experts of their group (fewer nodes per
//!    token under group-limited routing), else the least-loaded node; then
//!    the local search moves replicas off nodes above the cap. DeepSeek's EPLB
//!    re-plans from scratch and moves almost every replica; this keeps the
//!    maximum load within about the tolerance of the from-scratch plan and
//!    moves few.

use rayon::prelude::*;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// How much above the from-scratch maximum node load a plan may be to keep
/// replicas where they are (or group members together).
pub const TOLERANCE: f64 = 0.01;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// The nodes cannot hold what was asked (names the shortfall).
    #[error("insufficient capacity: {0}")]
    Capacity(String),
    /// Malformed loads, groups or previous placement.
    #[error("invalid placement input: {0}")]
    Input(String),
}

/// `[layer][expert] -> node indices` (distinct).
pub type Layers = Vec<Vec<Vec<usize>>>;

/// What the planner is asked.
#[derive(Debug, Clone)]
pub struct PlanRequest<'a> {
    /// `[layer][expert]` measured load (routed tokens; any non-negative scale).
    pub loads: &'a [Vec<f64>],
    /// Expert slots per layer on each node; the index is the node.
    pub slots: &'a [usize],
    /// Distinct nodes every expert is on.
    pub min_replicas: usize,
    /// At most this many replicas per layer beyond `min_replicas` per expert;
    /// `None` uses every slot.
    pub redundant: Option<usize>,
    /// Expert groups of group-limited routing (`n_group`, contiguous experts);
    /// 1 when routing is not grouped.
    pub groups: usize,
    /// The placement in force (node indices as in `slots`; indices past the
    /// end are nodes that left). Replicas stay put where balance allows.
    pub previous: Option<&'a [Vec<Vec<usize>>]>,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub layers: Layers,
    /// Replicas on a node that did not hold that expert in `previous` (all of
    /// them without one).
    pub moved: usize,
    /// Mean over layers of mean/max node load, load split evenly over replicas.
    pub balancedness: f64,
}

pub fn plan(req: &PlanRequest<'_>) -> Result<Plan, PlanError> {
    validate(req)?;
    let layers: Vec<Vec<Vec<usize>>> = req
        .loads
        .par_iter()
        .enumerate()
        .map(|(l, load)| {
            plan_layer(load, req, req.previous.map(|p| p[l].as_slice())).map_err(|e| match e {
                PlanError::Capacity(m) => PlanError::Capacity(format!("layer {l}: {m}")),
                other => other,
            })
        })
        .collect::<Result<_, _>>()?;
    let moved = match req.previous {
        Some(prev) => moves(prev, &layers),
        None => layers.iter().flatten().map(Vec::len).sum(),
    };
    let balancedness = if layers.is_empty() {
        1.0
    } else {
        layers.iter().zip(req.loads).map(|(p, l)| balancedness(l, p, req.slots.len())).sum::<f64>()
            / layers.len() as f64
    };
    Ok(Plan { layers, moved, balancedness })
}

fn validate(req: &PlanRequest<'_>) -> Result<(), PlanError> {
    let n = req.slots.len();
    if n == 0 {
        return Err(PlanError::Capacity("no nodes".into()));
    }
    if req.min_replicas == 0 {
        return Err(PlanError::Input("min_replicas must be at least 1".into()));
    }
    if req.min_replicas > n {
        return Err(PlanError::Capacity(format!(
            "{} replicas per expert need {} distinct nodes; {n} available",
            req.min_replicas, req.min_replicas
        )));
    }
    for (l, load) in req.loads.iter().enumerate() {
        // A node holds an expert at most once; with every expert needing the
        // same replica count, this total is also sufficient (Gale–Ryser).
        let total: usize = req.slots.iter().map(|&s| s.min(load.len())).sum();
        if let Some(v) = load.iter().find(|v| !v.is_finite() || **v < 0.0) {
            return Err(PlanError::Input(format!("layer {l}: load {v} is not a finite non-negative number")));
        }
        if load.len() * req.min_replicas > total {
            return Err(PlanError::Capacity(format!(
                "layer {l}: {} experts × {} replicas need {} slots; the nodes have {total} usable",
                load.len(),
                req.min_replicas,
                load.len() * req.min_replicas
            )));
        }
        if req.groups == 0 || !load.len().is_multiple_of(req.groups) {
            return Err(PlanError::Input(format!("{} groups do not divide {} experts", req.groups, load.len())));
        }
    }
    if let Some(prev) = req.previous {
        if prev.len() != req.loads.len() {
            return Err(PlanError::Input(format!(
                "previous placement has {} layers; loads have {}",
                prev.len(),
                req.loads.len()
            )));
        }
        for (l, (p, load)) in prev.iter().zip(req.loads).enumerate() {
            if p.len() != load.len() {
                return Err(PlanError::Input(format!(
                    "layer {l}: previous placement has {} experts; loads have {}",
                    p.len(),
                    load.len()
                )));
            }
        }
    }
    Ok(())
}

/// Replicas that are new relative to `prev`.
pub fn moves(prev: &[Vec<Vec<usize>>], next: &[Vec<Vec<usize>>]) -> usize {
    next.iter()
        .zip(prev)
        .flat_map(|(n, p)| n.iter().zip(p))
        .map(|(now, before)| now.iter().filter(|x| !before.contains(x)).count())
        .sum()
}

/// Mean/max node load of one layer, each expert's load split evenly over its
/// replicas. 1.0 is perfect.
pub fn balancedness(load: &[f64], placement: &[Vec<usize>], nodes: usize) -> f64 {
    let mut per_node = vec![0f64; nodes];
    for (l, holders) in load.iter().zip(placement) {
        for &n in holders.iter().filter(|&&n| n < nodes) {
            per_node[n] += l / holders.len() as f64;
        }
    }
    let max = per_node.iter().copied().fold(0f64, f64::max);
    if max <= 0.0 { 1.0 } else { per_node.iter().sum::<f64>() / nodes as f64 / max }
}

/// Loads as packing weights: all-zero (no statistics yet) becomes uniform, and
/// a small floor lets idle experts spread by count.
fn weights(load: &[f64]) -> Vec<f64> {
    let mean = load.iter().sum::<f64>() / load.len().max(1) as f64;
    if mean <= 0.0 {
        return vec![1.0; load.len()];
    }
    load.iter().map(|v| v + mean * 1e-3).collect()
}

/// Max-heap entry: load per replica of one expert.
#[derive(PartialEq)]
struct PerReplica(f64, usize);

impl Eq for PerReplica {}

impl PartialOrd for PerReplica {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

impl Ord for PerReplica {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0).then(o.1.cmp(&self.1))
    }
}

/// Replicas per expert: `min` each, then the budget to the hottest per replica.
pub fn replica_counts(w: &[f64], min: usize, budget: usize, nodes: usize) -> Vec<usize> {
    let mut counts = vec![min; w.len()];
    let mut heap: BinaryHeap<PerReplica> =
        w.iter().enumerate().filter(|_| min < nodes).map(|(e, &x)| PerReplica(x / min as f64, e)).collect();
    for _ in 0..budget {
        let Some(PerReplica(_, e)) = heap.pop() else { break };
        counts[e] += 1;
        if counts[e] < nodes {
            heap.push(PerReplica(w[e] / counts[e] as f64, e));
        }
    }
    counts
}

fn plan_layer(load: &[f64], req: &PlanRequest<'_>, prev: Option<&[Vec<usize>]>) -> Result<Vec<Vec<usize>>, PlanError> {
    let w = weights(load);
    let nodes = req.slots.len();
    let total: usize = req.slots.iter().sum();
    // A node holds each expert at most once, so slots beyond the expert
    // count are of no use to it.
    let usable: usize = req.slots.iter().map(|&s| s.min(w.len())).sum();
    let spare = usable.min(total) - w.len() * req.min_replicas;
    let counts = replica_counts(&w, req.min_replicas, req.redundant.map_or(spare, |k| k.min(spare)), nodes);
    let mut items: Vec<(usize, f64)> =
        counts.iter().enumerate().flat_map(|(e, &c)| std::iter::repeat_n((e, w[e] / c as f64), c)).collect();
    items.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let group_size = w.len() / req.groups;
    let mut scratch = Layout::new(req.slots, w.len(), req.groups, group_size);
    scratch.pack(&items, f64::INFINITY, req.min_replicas)?;
    scratch.refine(0.0);
    if prev.is_none() && req.groups <= 1 {
        return Ok(scratch.holders);
    }
    let cap = scratch.max_load() * (1.0 + TOLERANCE);
    let mut next = Layout::new(req.slots, w.len(), req.groups, group_size);
    // Keep what the previous placement has (up to the new replica counts,
    // heaviest experts first), place the rest, then repair the balance.
    let mut rest = Vec::with_capacity(items.len());
    let mut kept = vec![0usize; w.len()];
    for &(e, x) in &items {
        let keep =
            prev.and_then(|p| p[e].iter().copied().find(|&n| n < nodes && next.free[n] > 0 && !next.holds(n, e)));
        match keep {
            Some(n) if kept[e] < counts[e] => {
                kept[e] += 1;
                next.put(n, e, x);
            }
            _ => rest.push((e, x)),
        }
    }
    next.pack(&rest, cap, req.min_replicas)?;
    next.refine(cap);
    // The repair is a local search; should it stall well above the cap, the
    // from-scratch plan's balance is worth its moves.
    Ok(if next.max_load() <= cap * (1.0 + TOLERANCE) { next.holders } else { scratch.holders })
}

/// One layer's assignment in progress.
struct Layout {
    load: Vec<f64>,
    free: Vec<usize>,
    /// Per node: (expert, weight) of each replica it holds.
    items: Vec<Vec<(usize, f64)>>,
    /// Per expert: the nodes holding it.
    holders: Vec<Vec<usize>>,
    /// Per node, per group: replicas held.
    group_count: Vec<Vec<u32>>,
    group_size: usize,
}

impl Layout {
    fn new(slots: &[usize], experts: usize, groups: usize, group_size: usize) -> Self {
        Layout {
            load: vec![0.0; slots.len()],
            free: slots.to_vec(),
            items: vec![Vec::new(); slots.len()],
            holders: vec![Vec::new(); experts],
            group_count: vec![vec![0; groups]; slots.len()],
            group_size,
        }
    }

    fn max_load(&self) -> f64 {
        self.load.iter().copied().fold(0.0, f64::max)
    }

    fn holds(&self, n: usize, e: usize) -> bool {
        self.holders[e].contains(&n)
    }

    fn put(&mut self, n: usize, e: usize, w: f64) {
        self.load[n] += w;
        self.free[n] -= 1;
        self.items[n].push((e, w));
        self.holders[e].push(n);
        self.group_count[n][e / self.group_size] += 1;
    }

    fn take(&mut self, n: usize, idx: usize) -> (usize, f64) {
        let (e, w) = self.items[n].swap_remove(idx);
        self.load[n] -= w;
        self.free[n] += 1;
        self.holders[e].retain(|&x| x != n);
        self.group_count[n][e / self.group_size] -= 1;
        (e, w)
    }

    /// Places `items` (heaviest first) on the least-loaded open node; under a
    /// finite `cap`, on the open node within the cap holding the most of the
    /// expert's group. A replica beyond `min` that no node can take on
    /// distinct nodes is dropped (the slot counts allowed it, the mix of
    /// replica counts and slots did not).
    fn pack(&mut self, items: &[(usize, f64)], cap: f64, min: usize) -> Result<(), PlanError> {
        for &(e, w) in items {
            let mut open = self.open(e);
            if open.is_empty() {
                match self.make_room(e) {
                    Ok(()) => open = self.open(e),
                    Err(_) if self.holders[e].len() >= min => continue,
                    Err(err) => return Err(err),
                }
            }
            let fits = |n: &usize| self.load[*n] + w <= cap;
            let g = e / self.group_size;
            let n = open
                .iter()
                .copied()
                .filter(fits)
                .filter(|&n| self.group_count[n][g] > 0)
                .max_by(|&a, &b| {
                    self.group_count[a][g].cmp(&self.group_count[b][g]).then(self.load[b].total_cmp(&self.load[a]))
                })
                .filter(|_| cap.is_finite())
                .or_else(|| open.iter().copied().min_by(|&a, &b| self.load[a].total_cmp(&self.load[b])));
            match n {
                Some(n) => self.put(n, e, w),
                None => return Err(PlanError::Capacity(format!("no node can take expert {e}"))),
            }
        }
        Ok(())
    }

    /// Nodes with a free slot that do not hold `e`.
    fn open(&self, e: usize) -> Vec<usize> {
        (0..self.load.len()).filter(|&n| self.free[n] > 0 && !self.holds(n, e)).collect()
    }

    /// Every node with a free slot already holds `e`: move some replica from
    /// a full node that lacks `e` to a node with a free slot that lacks it,
    /// freeing a slot for `e`.
    fn make_room(&mut self, e: usize) -> Result<(), PlanError> {
        let nodes = self.load.len();
        for x in (0..nodes).filter(|&x| self.free[x] == 0 && !self.holds(x, e)) {
            for i in 0..self.items[x].len() {
                let f = self.items[x][i].0;
                if let Some(y) = (0..nodes).find(|&y| self.free[y] > 0 && !self.holds(y, f)) {
                    let (f, wf) = self.take(x, i);
                    self.put(y, f, wf);
                    return Ok(());
                }
            }
        }
        Err(PlanError::Capacity(format!("expert {e} cannot be placed on distinct nodes")))
    }

    /// Moves or swaps replicas off the most loaded node while that lowers
    /// the maximum; stops at `target` or when nothing helps.
    fn refine(&mut self, target: f64) {
        let nodes = self.load.len();
        for _ in 0..64 * nodes {
            let m = (0..nodes).max_by(|&a, &b| self.load[a].total_cmp(&self.load[b])).unwrap_or(0);
            if self.load[m] <= target {
                return;
            }
            // Best (new max of the pair, node, item on m, item on n or None).
            let mut best: Option<(f64, usize, usize, Option<usize>)> = None;
            for (i, &(e, wa)) in self.items[m].iter().enumerate() {
                for n in (0..nodes).filter(|&n| n != m && !self.holds(n, e)) {
                    let mut consider = |peak: f64, j: Option<usize>| {
                        if peak < self.load[m] - 1e-12 && best.is_none_or(|b| peak < b.0) {
                            best = Some((peak, n, i, j));
                        }
                    };
                    if self.free[n] > 0 {
                        consider((self.load[m] - wa).max(self.load[n] + wa), None);
                    }
                    for (j, &(f, wb)) in self.items[n].iter().enumerate() {
                        if wb < wa && !self.holders[f].contains(&m) {
                            consider((self.load[m] - wa + wb).max(self.load[n] - wb + wa), Some(j));
                        }
                    }
                }
            }
            let Some((_, n, i, j)) = best else { return };
            let (e, wa) = self.take(m, i);
            if let Some(j) = j {
                let (f, wb) = self.take(n, j);
                self.put(m, f, wb);
            }
            self.put(n, e, wa);
        }
    }
}

#[cfg(test)]
mod tests;
