//! `RemoteExecutor`: the model's expert executor for a cluster.
//!
//! Per MoE layer it groups the routed tokens by expert, picks one replica
//! per expert (power of two choices on outstanding work), sends one batch
//! per node through the [`Transport`], and scatter-adds the combined rows.
//! Each node has a deadline of its own, learned from its recent round trips
//! ([`health`]): a node that misses it has its share hedged to other
//! replicas (the first complete answer wins) and is probed, taking no real
//! traffic until it answers. A node that fails is re-dispatched around in
//! the same call and backs off; `--dispatch-timeout` is the hard limit for
//! experts with no other replica, which then fail the step with
//! `Unavailable`, naming them.

pub mod health;
mod round;
#[cfg(test)]
mod tests;

use crate::metrics::DispatchMetrics;
use crate::placement::{NodeId, Placement};
use crate::transport::{NodeBatch, Transport};
use expertmesh_model::moe::{ExpertExecutor, ExpertGroup, RoutedBatch, group_by_expert};
use health::{Health, HedgePolicy};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// How often a suspected node is probed, and for how long at most before it
/// is handed back to ordinary backoff.
const PROBE_EVERY: Duration = Duration::from_millis(100);
const PROBE_FOR: Duration = Duration::from_secs(120);

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
    health: Arc<Health>,
    rng: AtomicU64,
    metrics: Option<Arc<DispatchMetrics>>,
}

/// Recovers a lock a panic elsewhere poisoned: every value behind these is
/// replaced whole, so it is consistent.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RemoteExecutor {
    /// An executor with hedging off: every batch waits up to `hard`.
    pub fn new(placement: Arc<Placement>, transport: Arc<dyn Transport>) -> Self {
        RemoteExecutor {
            placement: RwLock::new(placement),
            staged: Mutex::new(None),
            loads: Mutex::new(BTreeMap::new()),
            transport,
            step: AtomicU64::new(0),
            outstanding: Mutex::new(HashMap::new()),
            health: Arc::new(Health::new(HedgePolicy::off(Duration::from_secs(3600)), None)),
            rng: AtomicU64::new(0x9e37_79b9_7f4a_7c15),
            metrics: None,
        }
    }

    /// When slow nodes are hedged (see [`HedgePolicy`]).
    pub fn with_hedging(mut self, p: HedgePolicy) -> Self {
        self.health = Arc::new(Health::new(p, self.metrics.clone()));
        self
    }

    /// Records routed tokens, per-node tokens, round trips, balance, hedges
    /// and suspected nodes.
    pub fn with_metrics(mut self, m: Arc<DispatchMetrics>) -> Self {
        self.health = Arc::new(Health::new(self.health.policy, Some(m.clone())));
        self.metrics = Some(m);
        let p = self.placement();
        self.set_placement(p);
        self
    }

    /// Switches to a new placement now; calls in progress finish on the old
    /// one. Between steps of a running model use [`Self::stage_placement`].
    pub fn set_placement(&self, p: Arc<Placement>) {
        if let Some(m) = &self.metrics {
            // Every node's hedge counter starts at 0, so rates have data.
            for node in p.nodes.keys() {
                m.hedged.with_label_values(&[node]);
            }
        }
        *self.placement.write().unwrap_or_else(|e| e.into_inner()) = p;
    }

    /// Makes `p` the placement from the next step on (see
    /// [`ExpertExecutor::begin_step`]): a step never mixes two plans.
    pub fn stage_placement(&self, p: Arc<Placement>) {
        *lock(&self.staged) = Some(p);
    }

    /// Routed tokens per MoE layer and expert since the previous call.
    pub fn take_loads(&self) -> BTreeMap<usize, Vec<u64>> {
        std::mem::take(&mut *lock(&self.loads))
    }

    pub fn placement(&self) -> Arc<Placement> {
        self.placement.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether `node` is suspected (missed its deadline, not yet answering).
    pub fn is_suspected(&self, node: &str) -> bool {
        self.health.is_suspected(node)
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

    /// Picks a replica for each group outside `exclude`, avoiding nodes in
    /// backoff or under suspicion while any other replica is available.
    /// Returns per node its groups (with batch-level row indices), or the
    /// uncovered experts.
    fn assign(
        &self,
        placement: &Placement,
        layer: usize,
        groups: Vec<ExpertGroup>,
        exclude: &BTreeSet<NodeId>,
    ) -> Result<BTreeMap<NodeId, Vec<ExpertGroup>>, Vec<u32>> {
        let now = Instant::now();
        let outstanding = lock(&self.outstanding).clone();
        let mut load: HashMap<NodeId, u64> = HashMap::new();
        let mut plan: BTreeMap<NodeId, Vec<ExpertGroup>> = BTreeMap::new();
        let mut uncovered = Vec::new();
        for g in groups {
            let live: Vec<&NodeId> =
                placement.replicas(layer, g.expert as usize).iter().filter(|n| !exclude.contains(*n)).collect();
            let healthy: Vec<&NodeId> = live.iter().copied().filter(|n| !self.health.avoid(n, now)).collect();
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

    /// Adds (or, done, removes) rows in flight per node.
    fn track<'n>(&self, rows: impl IntoIterator<Item = (&'n NodeId, usize)>, add: bool) {
        let mut o = lock(&self.outstanding);
        for (node, n) in rows {
            let e = o.entry(node.clone()).or_default();
            *e = if add { *e + n as u64 } else { e.saturating_sub(n as u64) };
        }
    }

    /// Probes a suspected node with an empty batch until it answers (then
    /// it takes real traffic again) or [`PROBE_FOR`] has passed (then it is
    /// left to ordinary backoff). Runs on its own thread.
    fn probe(&self, node: &str, layer: usize, hidden: usize) {
        let (transport, health, node) = (self.transport.clone(), self.health.clone(), node.to_string());
        let spawned = std::thread::Builder::new().name(format!("probe-{node}")).spawn(move || {
            let until = Instant::now() + PROBE_FOR;
            let empty = NodeBatch { node: node.clone(), rows: Arc::new(Vec::new()), groups: Vec::new() };
            while Instant::now() < until {
                // The transport answers within its own timeout.
                match transport.exchange(0, layer, hidden, std::slice::from_ref(&empty)).pop() {
                    Some(Ok(_)) => return health.cleared(&node),
                    _ => std::thread::sleep(PROBE_EVERY),
                }
            }
            health.failed(&node);
            health.cleared(&node);
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "probe thread; the node stays suspected");
        }
    }

    fn count_loads(&self, layer: usize, groups: &[ExpertGroup]) {
        let mut loads = lock(&self.loads);
        let counts = loads.entry(layer).or_default();
        for g in groups {
            let e = g.expert as usize;
            if counts.len() <= e {
                counts.resize(e + 1, 0);
            }
            counts[e] += g.rows.len() as u64;
        }
        if let Some(m) = &self.metrics {
            let layer = layer.to_string();
            for g in groups {
                let e = crate::metrics::expert_label(m.per_expert, g.expert);
                m.expert_tokens.with_label_values(&[&layer, &e]).inc_by(g.rows.len() as u64);
            }
        }
    }
}

impl ExpertExecutor for RemoteExecutor {
    fn begin_step(&self) {
        if let Some(p) = lock(&self.staged).take() {
            self.set_placement(p);
        }
    }

    fn execute(&self, batch: RoutedBatch<'_>) -> expertmesh_model::Result<Vec<f32>> {
        let h = batch.hidden_size;
        let placement = self.placement();
        let step = self.step.fetch_add(1, Ordering::Relaxed);
        let mut out = vec![0f32; batch.hidden.len()];
        let t0 = Instant::now();
        let groups = group_by_expert(batch.routing);
        self.count_loads(batch.layer, &groups);
        let mut round = round::Round::new(self, &placement, step, batch.layer, batch.hidden, h);
        round.run(groups, &mut out)?;
        if let Some(m) = &self.metrics {
            m.seconds.observe(t0.elapsed().as_secs_f64());
            for (node, n) in &round.served {
                m.node_tokens.with_label_values(&[node]).inc_by(*n);
            }
            let holders: BTreeSet<NodeId> =
                placement.layers.get(&batch.layer).map(|e| e.iter().flatten().cloned().collect()).unwrap_or_default();
            m.observe_layer(batch.layer, &holders.into_iter().collect::<Vec<_>>(), &round.served);
        }
        Ok(out)
    }
}
