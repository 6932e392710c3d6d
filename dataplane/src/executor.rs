//! `RemoteExecutor`: the model's expert executor for a cluster.
//!
//! Per MoE layer it groups the routed tokens by expert, picks one replica
//! per expert (power of two choices on outstanding work), sends one batch per
//! node through the [`Transport`], and scatter-adds the combined rows. A node
//! that fails or times out has its share re-sent to other replicas in the
//! same call and is retried later with exponential backoff; experts with no
//! reachable replica fail the step with `Unavailable`, naming them.

use crate::error::DataPlaneError;
use crate::metrics::DispatchMetrics;
use crate::placement::{NodeId, Placement};
use crate::transport::{NodeBatch, Transport};
use expertmesh_model::ModelError;
use expertmesh_model::moe::{ExpertExecutor, ExpertGroup, RoutedBatch, group_by_expert};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
struct Health {
    failures: u32,
    retry_at: Instant,
}

pub struct RemoteExecutor {
    placement: RwLock<Arc<Placement>>,
    /// The next placement, applied at the next step boundary.
    staged: Mutex<Option<Arc<Placement>>>,
    /// Routed tokens per MoE layer and expert since the last `take_loads`.
    loads: Mutex<BTreeMap<usize, Vec<u64>>>,
    transport: Arc<dyn Transport>,
    step: AtomicU64,
    /// Tokens this executor has in flight per node.
    outstanding: Mutex<HashMap<NodeId, u64>>,
    health: Mutex<HashMap<NodeId, Health>>,
    rng: AtomicU64,
    metrics: Option<Arc<DispatchMetrics>>,
}

/// Backoff after the n-th consecutive failure: 100 ms · 2ⁿ⁻¹, at most 5 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.saturating_sub(1).min(6))).min(Duration::from_secs(5))
}

impl RemoteExecutor {
    pub fn new(placement: Arc<Placement>, transport: Arc<dyn Transport>) -> Self {
        RemoteExecutor {
            placement: RwLock::new(placement),
            staged: Mutex::new(None),
            loads: Mutex::new(BTreeMap::new()),
            transport,
            step: AtomicU64::new(0),
            outstanding: Mutex::new(HashMap::new()),
            health: Mutex::new(HashMap::new()),
            rng: AtomicU64::new(0x9e37_79b9_7f4a_7c15),
            metrics: None,
        }
    }

    /// Records routed tokens, per-node tokens, round trips and balance.
    pub fn with_metrics(mut self, m: Arc<DispatchMetrics>) -> Self {
        self.metrics = Some(m);
        self
    }

    /// Switches to a new placement now; calls in progress finish on the old
    /// one. Between steps of a running model use [`Self::stage_placement`].
    pub fn set_placement(&self, p: Arc<Placement>) {
        if let Ok(mut g) = self.placement.write() {
            *g = p;
        }
    }

    /// Makes `p` the placement from the next step on (see
    /// [`ExpertExecutor::begin_step`]): a step never mixes two plans.
    pub fn stage_placement(&self, p: Arc<Placement>) {
        if let Ok(mut s) = self.staged.lock() {
            *s = Some(p);
        }
    }

    /// Routed tokens per MoE layer and expert since the previous call.
    pub fn take_loads(&self) -> BTreeMap<usize, Vec<u64>> {
        self.loads.lock().map(|mut l| std::mem::take(&mut *l)).unwrap_or_default()
    }

    pub fn placement(&self) -> Arc<Placement> {
        self.placement.read().map(|p| p.clone()).unwrap_or_else(|e| e.into_inner().clone())
    }

    fn next_random(&self) -> u64 {
        // xorshift64*: cheap, and good enough to break ties between replicas.
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.store(x, Ordering::Relaxed);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn in_backoff(&self, node: &str, now: Instant) -> bool {
        self.health.lock().ok().and_then(|h| h.get(node).map(|s| s.retry_at > now)).unwrap_or(false)
    }

    fn record(&self, node: &str, ok: bool) {
        if let Ok(mut h) = self.health.lock() {
            if ok {
                h.remove(node);
            } else {
                let failures = h.get(node).map_or(1, |s| s.failures + 1);
                h.insert(node.to_string(), Health { failures, retry_at: Instant::now() + backoff(failures) });
            }
        }
    }

    /// Picks a replica for each group, avoiding `failed` nodes and, while any
    /// other replica is available, nodes in backoff. Returns per node its
    /// groups (with batch-level row indices), or the uncovered experts.
    fn assign(
        &self,
        placement: &Placement,
        layer: usize,
        groups: Vec<ExpertGroup>,
        failed: &BTreeSet<NodeId>,
    ) -> Result<BTreeMap<NodeId, Vec<ExpertGroup>>, Vec<u32>> {
        let now = Instant::now();
        let outstanding = self.outstanding.lock().map(|o| o.clone()).unwrap_or_default();
        let mut load: HashMap<NodeId, u64> = HashMap::new();
        let mut plan: BTreeMap<NodeId, Vec<ExpertGroup>> = BTreeMap::new();
        let mut uncovered = Vec::new();
        for g in groups {
            let live: Vec<&NodeId> =
                placement.replicas(layer, g.expert as usize).iter().filter(|n| !failed.contains(*n)).collect();
            let healthy: Vec<&NodeId> = live.iter().copied().filter(|n| !self.in_backoff(n, now)).collect();
            let cands = if healthy.is_empty() { live } else { healthy };
            let work = |n: &NodeId| outstanding.get(n).copied().unwrap_or(0) + load.get(n).copied().unwrap_or(0);
            let pick = match cands.len() {
                0 => {
                    uncovered.push(g.expert);
                    continue;
                }
                1 => cands[0].clone(),
                k => {
                    // Power of two choices: two distinct random replicas, the less loaded wins.
                    let a = (self.next_random() % k as u64) as usize;
                    let b = (a + 1 + (self.next_random() % (k as u64 - 1)) as usize) % k;
                    if work(cands[b]) < work(cands[a]) { cands[b].clone() } else { cands[a].clone() }
                }
            };
            *load.entry(pick.clone()).or_default() += g.rows.len() as u64;
            plan.entry(pick).or_default().push(g);
        }
        if uncovered.is_empty() { Ok(plan) } else { Err(uncovered) }
    }

    fn track(&self, batches: &[NodeBatch], hidden: usize, add: bool) {
        if let Ok(mut o) = self.outstanding.lock() {
            for b in batches {
                let n = (b.rows.len() / hidden.max(1)) as u64;
                let e = o.entry(b.node.clone()).or_default();
                *e = if add { *e + n } else { e.saturating_sub(n) };
            }
        }
    }
}

/// Compacts a node's groups to the distinct rows they use.
fn node_batch(node: NodeId, groups: Vec<ExpertGroup>, hidden: &[f32], h: usize) -> (NodeBatch, Vec<usize>) {
    let tokens: Vec<usize> =
        groups.iter().flat_map(|g| g.rows.iter().copied()).collect::<BTreeSet<_>>().into_iter().collect();
    let local: HashMap<usize, usize> = tokens.iter().enumerate().map(|(i, &t)| (t, i)).collect();
    let mut rows = Vec::with_capacity(tokens.len() * h);
    for &t in &tokens {
        rows.extend_from_slice(&hidden[t * h..(t + 1) * h]);
    }
    let groups =
        groups.into_iter().map(|g| ExpertGroup { rows: g.rows.iter().map(|t| local[t]).collect(), ..g }).collect();
    (NodeBatch { node, rows: Arc::new(rows), groups }, tokens)
}

impl ExpertExecutor for RemoteExecutor {
    fn begin_step(&self) {
        if let Some(p) = self.staged.lock().ok().and_then(|mut s| s.take()) {
            self.set_placement(p);
        }
    }

    fn execute(&self, batch: RoutedBatch<'_>) -> expertmesh_model::Result<Vec<f32>> {
        let h = batch.hidden_size;
        let placement = self.placement();
        let step = self.step.fetch_add(1, Ordering::Relaxed);
        let mut out = vec![0f32; batch.hidden.len()];
        let t0 = Instant::now();
        let mut pending = group_by_expert(batch.routing);
        if let Ok(mut loads) = self.loads.lock() {
            let counts = loads.entry(batch.layer).or_default();
            for g in &pending {
                let e = g.expert as usize;
                if counts.len() <= e {
                    counts.resize(e + 1, 0);
                }
                counts[e] += g.rows.len() as u64;
            }
        }
        if let Some(m) = &self.metrics {
            let layer = batch.layer.to_string();
            for g in &pending {
                let e = crate::metrics::expert_label(m.per_expert, g.expert);
                m.expert_tokens.with_label_values(&[&layer, &e]).inc_by(g.rows.len() as u64);
            }
        }
        let mut served: HashMap<NodeId, u64> = HashMap::new();
        let mut failed: BTreeSet<NodeId> = BTreeSet::new();
        let mut errors: Vec<String> = Vec::new();
        while !pending.is_empty() {
            let plan =
                self.assign(&placement, batch.layer, std::mem::take(&mut pending), &failed).map_err(|experts| {
                    let list = experts.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
                    let why = if errors.is_empty() { String::new() } else { format!(" ({})", errors.join("; ")) };
                    ModelError::Unavailable(format!("layer {} experts [{list}] have no live replica{why}", batch.layer))
                })?;
            let mut batches = Vec::with_capacity(plan.len());
            let mut tokens = Vec::with_capacity(plan.len());
            for (node, groups) in plan {
                let (b, t) = node_batch(node, groups, batch.hidden, h);
                batches.push(b);
                tokens.push(t);
            }
            self.track(&batches, h, true);
            let results = self.transport.exchange(step, batch.layer, h, &batches);
            self.track(&batches, h, false);
            for ((b, toks), res) in batches.iter().zip(&tokens).zip(results) {
                match res {
                    Ok(combined) if combined.len() == toks.len() * h => {
                        self.record(&b.node, true);
                        *served.entry(b.node.clone()).or_default() +=
                            b.groups.iter().map(|g| g.rows.len() as u64).sum::<u64>();
                        for (i, &t) in toks.iter().enumerate() {
                            let dst = &mut out[t * h..(t + 1) * h];
                            dst.iter_mut().zip(&combined[i * h..(i + 1) * h]).for_each(|(o, v)| *o += v);
                        }
                    }
                    other => {
                        let e = match other {
                            Err(e) => e,
                            Ok(c) => DataPlaneError::Invalid(format!(
                                "{} returned {} values for {} rows",
                                b.node,
                                c.len(),
                                toks.len()
                            )),
                        };
                        tracing::warn!(node = %b.node, layer = batch.layer, error = %e, "dispatch failed; re-dispatching to other replicas");
                        self.record(&b.node, false);
                        failed.insert(b.node.clone());
                        errors.push(e.to_string());
                        // Back to batch-level rows for the next replica.
                        pending.extend(
                            b.groups
                                .iter()
                                .map(|g| ExpertGroup { rows: g.rows.iter().map(|&r| toks[r]).collect(), ..g.clone() }),
                        );
                    }
                }
            }
        }
        if let Some(m) = &self.metrics {
            m.seconds.observe(t0.elapsed().as_secs_f64());
            for (node, n) in &served {
                m.node_tokens.with_label_values(&[node]).inc_by(*n);
            }
            let holders: BTreeSet<NodeId> =
                placement.layers.get(&batch.layer).map(|e| e.iter().flatten().cloned().collect()).unwrap_or_default();
            m.observe_layer(batch.layer, &holders.into_iter().collect::<Vec<_>>(), &served);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::InProcess;
    use expertmesh_model::moe::{LocalExperts, Mlp, Routing};
    use expertmesh_model::tensor::Matrix;

    const H: usize = 4;

    fn experts(n: usize) -> LocalExperts {
        let mut l = LocalExperts::new(Vec::new());
        for e in 0..n {
            let s = e as f32 + 1.0;
            let m = |r: usize, c: usize, k: f32| {
                Matrix::from_f32(r, c, (0..r * c).map(|i| ((i as f32 * k).sin()) * 0.5).collect())
            };
            l.insert(0, e, Mlp::new(m(3, H, s), m(3, H, s + 0.5), m(H, 3, s + 0.25), None));
        }
        l
    }

    fn setup(replicas: usize) -> (Arc<InProcess>, RemoteExecutor, LocalExperts) {
        let nodes: Vec<(NodeId, String)> = (0..3).map(|i| (format!("n{i}"), String::new())).collect();
        let mut layers = BTreeMap::new();
        layers.insert(0, (0..6).map(|e| (0..replicas).map(|r| format!("n{}", (e + r) % 3)).collect()).collect());
        let p = Placement { version: 1, nodes: nodes.into_iter().collect(), layers };
        let t = Arc::new(InProcess::default());
        for i in 0..3 {
            t.add(&format!("n{i}"), Arc::new(experts(6)));
        }
        let ex = RemoteExecutor::new(Arc::new(p), t.clone());
        (t, ex, experts(6))
    }

    fn batch() -> (Vec<f32>, Routing) {
        let hidden: Vec<f32> = (0..5 * H).map(|i| (i as f32 * 0.37).cos()).collect();
        let routing = Routing {
            top_k: 2,
            ids: vec![0, 3, 1, 2, 5, 4, 0, 1, 2, 3],
            weights: vec![0.6, 0.4, 0.5, 0.5, 0.9, 0.1, 0.3, 0.7, 0.2, 0.8],
        };
        (hidden, routing)
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    }

    #[test]
    fn matches_local_and_survives_a_dead_node() {
        let (t, ex, local) = setup(2);
        let (hidden, routing) = batch();
        let rb = RoutedBatch { layer: 0, hidden: &hidden, hidden_size: H, routing: &routing };
        let want = local.execute(rb).unwrap();
        assert!(close(&ex.execute(rb).unwrap(), &want));
        t.set_down("n1", true);
        assert!(close(&ex.execute(rb).unwrap(), &want), "re-dispatched to the other replicas");
        // n1 is now in backoff: the next call avoids it without a failure.
        assert!(close(&ex.execute(rb).unwrap(), &want));
    }

    #[test]
    fn a_staged_placement_applies_at_the_next_step_and_loads_are_counted() {
        let (t, ex, local) = setup(1);
        let (hidden, routing) = batch();
        let rb = RoutedBatch { layer: 0, hidden: &hidden, hidden_size: H, routing: &routing };
        // Version 2 moves everything onto n2; n0 and n1 go down only after the switch.
        let mut next = (*ex.placement()).clone();
        next.version = 2;
        for reps in next.layers.values_mut().flatten() {
            *reps = vec!["n2".into()];
        }
        ex.stage_placement(Arc::new(next));
        assert_eq!(ex.placement().version, 1, "staged, not applied mid-step");
        assert!(close(&ex.execute(rb).unwrap(), &local.execute(rb).unwrap()));
        ex.begin_step();
        assert_eq!(ex.placement().version, 2);
        t.set_down("n0", true);
        t.set_down("n1", true);
        assert!(close(&ex.execute(rb).unwrap(), &local.execute(rb).unwrap()), "served by n2 alone");
        // Two calls, ten token-expert pairs each.
        let loads = ex.take_loads();
        assert_eq!(loads[&0].iter().sum::<u64>(), 20);
        assert_eq!(loads[&0][0], 4);
        assert!(ex.take_loads().is_empty(), "taking resets the window");
    }

    #[test]
    fn uncovered_experts_are_named() {
        let (t, ex, _) = setup(1);
        let (hidden, routing) = batch();
        t.set_down("n0", true);
        let e = ex.execute(RoutedBatch { layer: 0, hidden: &hidden, hidden_size: H, routing: &routing }).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ModelError::Unavailable(_)), "{msg}");
        // Experts 0 and 3 live only on n0.
        assert!(msg.contains("[0, 3]"), "{msg}");
    }

    #[test]
    fn replicas_share_the_load() {
        let (t, ex, _) = setup(3);
        let (hidden, routing) = batch();
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        struct Spy(Arc<InProcess>, Arc<Mutex<BTreeSet<String>>>);
        impl Transport for Spy {
            fn exchange(&self, s: u64, l: usize, h: usize, b: &[NodeBatch]) -> Vec<crate::Result<Vec<f32>>> {
                if let Ok(mut seen) = self.1.lock() {
                    seen.extend(b.iter().map(|x| x.node.clone()));
                }
                self.0.exchange(s, l, h, b)
            }
        }
        let ex = RemoteExecutor::new(ex.placement(), Arc::new(Spy(t, seen.clone())));
        for _ in 0..20 {
            ex.execute(RoutedBatch { layer: 0, hidden: &hidden, hidden_size: H, routing: &routing }).unwrap();
        }
        assert_eq!(seen.lock().unwrap().len(), 3, "every replica node gets traffic");
    }
}
