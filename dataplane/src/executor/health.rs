//! What the executor knows about each node: recent round trips (from which
//! a deadline of its own is learned), failures (backoff), and suspicion
//! (a node that missed its deadline gets no real traffic until it answers
//! a probe).

use crate::metrics::DispatchMetrics;
use crate::placement::NodeId;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// When a node's share of a layer is hedged to other replicas.
#[derive(Debug, Clone, Copy)]
pub struct HedgePolicy {
    /// The deadline is this multiple of the node's recent p99 round trip;
    /// 0 turns hedging off (only the hard limit applies).
    pub multiple: f64,
    /// Never less than this.
    pub floor: Duration,
    /// `--dispatch-timeout`: the limit for experts with no other replica.
    pub hard: Duration,
}

impl HedgePolicy {
    pub fn off(hard: Duration) -> Self {
        HedgePolicy { multiple: 0.0, floor: hard, hard }
    }

    pub fn enabled(&self) -> bool {
        self.multiple > 0.0
    }
}

/// Round trips kept per node, and how many make a p99.
const SAMPLES: usize = 128;
const MIN_SAMPLES: usize = 16;
/// Before a node has history, its deadline is at most this (a cold start:
/// first touches of weights, connections being set up).
const COLD_DEADLINE: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct NodeHealth {
    failures: u32,
    retry_at: Option<Instant>,
    suspected: bool,
    rtt: VecDeque<f64>,
}

impl NodeHealth {
    /// The p99 of the recent round trips, once there are enough.
    fn p99(&self) -> Option<Duration> {
        if self.rtt.len() < MIN_SAMPLES {
            return None;
        }
        let mut v: Vec<f64> = self.rtt.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        let i = ((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1;
        Some(Duration::from_secs_f64(v[i]))
    }
}

/// Backoff after the n-th consecutive failure: 100 ms · 2ⁿ⁻¹, at most 5 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.saturating_sub(1).min(6))).min(Duration::from_secs(5))
}

pub struct Health {
    nodes: Mutex<HashMap<NodeId, NodeHealth>>,
    pub policy: HedgePolicy,
    metrics: Option<Arc<DispatchMetrics>>,
}

impl Health {
    pub fn new(policy: HedgePolicy, metrics: Option<Arc<DispatchMetrics>>) -> Self {
        Health { nodes: Mutex::new(HashMap::new()), policy, metrics }
    }

    fn with<R>(&self, node: &str, f: impl FnOnce(&mut NodeHealth) -> R) -> R {
        // Nothing panics while holding it; recover the map if something did.
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        // Called per replica candidate on every layer call: no key allocation
        // once the node is known.
        match nodes.get_mut(node) {
            Some(h) => f(h),
            None => f(nodes.entry(node.to_string()).or_default()),
        }
    }

    /// Whether real traffic should go elsewhere while another replica can
    /// take it: the node failed recently or is suspected.
    pub fn avoid(&self, node: &str, now: Instant) -> bool {
        self.with(node, |h| h.suspected || h.retry_at.is_some_and(|t| t > now))
    }

    /// How long a batch to `node` may take before it is hedged.
    pub fn deadline(&self, node: &str) -> Duration {
        let p = &self.policy;
        if !p.enabled() {
            return p.hard;
        }
        let learned = self.with(node, |h| h.p99()).map_or(COLD_DEADLINE, |p99| p99.mul_f64(p.multiple));
        learned.max(p.floor).min(p.hard)
    }

    /// An answer: the node is well, and its round trip is history.
    pub fn answered(&self, node: &str, rtt: Duration) {
        self.with(node, |h| {
            h.failures = 0;
            h.retry_at = None;
            if h.rtt.len() == SAMPLES {
                h.rtt.pop_front();
            }
            h.rtt.push_back(rtt.as_secs_f64());
        });
    }

    /// An error or a hard timeout: back off.
    pub fn failed(&self, node: &str) {
        self.with(node, |h| {
            h.failures += 1;
            h.retry_at = Some(Instant::now() + backoff(h.failures));
        });
    }

    /// A missed deadline; true when the node was not suspected before (the
    /// caller then starts probing it).
    pub fn suspect(&self, node: &str) -> bool {
        let fresh = self.with(node, |h| !std::mem::replace(&mut h.suspected, true));
        if fresh {
            tracing::warn!(node, "expert node missed its dispatch deadline; hedging and probing it");
            self.publish();
        }
        fresh
    }

    /// A probe came back: the node takes real traffic again.
    pub fn cleared(&self, node: &str) {
        self.with(node, |h| h.suspected = false);
        tracing::info!(node, "expert node answers again");
        self.publish();
    }

    pub fn is_suspected(&self, node: &str) -> bool {
        self.with(node, |h| h.suspected)
    }

    fn publish(&self) {
        if let Some(m) = &self.metrics {
            let n = self.nodes.lock().unwrap_or_else(|e| e.into_inner()).values().filter(|h| h.suspected).count();
            m.suspected_nodes.set(n as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> HedgePolicy {
        HedgePolicy { multiple: 3.0, floor: Duration::from_millis(50), hard: Duration::from_secs(10) }
    }

    #[test]
    fn the_deadline_is_learned_from_recent_round_trips_within_floor_and_hard_limit() {
        let h = Health::new(policy(), None);
        assert_eq!(h.deadline("a"), COLD_DEADLINE, "no history yet");
        for _ in 0..SAMPLES {
            h.answered("a", Duration::from_millis(40));
        }
        assert_eq!(h.deadline("a"), Duration::from_millis(120), "3 x p99");
        for _ in 0..SAMPLES {
            h.answered("b", Duration::from_millis(1));
        }
        assert_eq!(h.deadline("b"), Duration::from_millis(50), "the floor");
        for _ in 0..SAMPLES {
            h.answered("c", Duration::from_secs(5));
        }
        assert_eq!(h.deadline("c"), Duration::from_secs(10), "never past the hard limit");
        let off = Health::new(HedgePolicy::off(Duration::from_secs(2)), None);
        assert_eq!(off.deadline("a"), Duration::from_secs(2));
    }

    #[test]
    fn p99_follows_the_tail_not_the_mean() {
        let h = Health::new(policy(), None);
        for i in 0..100 {
            h.answered("a", Duration::from_millis(if i % 50 == 0 { 30 } else { 10 }));
        }
        // Two slow answers in 100: the p99 is the slow one.
        assert_eq!(h.deadline("a"), Duration::from_millis(90));
    }

    #[test]
    fn suspicion_is_reported_once_and_lifted_by_a_probe() {
        let h = Health::new(policy(), None);
        let now = Instant::now();
        assert!(!h.avoid("a", now));
        assert!(h.suspect("a"));
        assert!(!h.suspect("a"), "already suspected: no second prober");
        assert!(h.avoid("a", now));
        h.cleared("a");
        assert!(!h.avoid("a", now));
        h.failed("a");
        assert!(h.avoid("a", Instant::now()), "in backoff");
        assert!(!h.avoid("a", Instant::now() + Duration::from_secs(1)), "backoff over");
    }
}
