//! The NCCL fault state machine: no wait is unbounded.
//!
//! The top complaint of expert-parallel NCCL deployments is that one dead
//! rank hangs every other one. Here each communicator lives through:
//!
//! ```text
//!  Building ──built──▶ Ready ──deadline / peer died──▶ Backoff ──due──▶ Building
//!     │                  │ (abort; the layer falls back    ▲
//!     └─build deadline / failed (abort)──────────────────────┘
//!                        └─peer joined: build the next one beside it, swap when built
//! ```
//!
//! While not `Ready`, [`FaultMachine::route`] says [`Route::Fallback`]: the
//! layer goes over TCP/gRPC to the remaining replicas. Rebuilds back off
//! (`base · 2ⁿ⁻¹`, capped) after consecutive failures. The machine only
//! decides; the caller performs its [`Action`]s. Time comes from a [`Clock`]
//! so that tests drive it without sleeping.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Where time comes from.
pub trait Clock {
    fn now(&self) -> Instant;
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// How a layer's rows travel now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Over the communicator of this epoch.
    Nccl { epoch: u64 },
    /// Over TCP/gRPC, while no communicator is usable.
    Fallback,
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Abort the communicator of `epoch` (`ncclCommAbort`): it may be stuck.
    Abort { epoch: u64, reason: String },
    /// Create a communicator of `epoch` over `members` (ranks in this order,
    /// the router first), reporting [`FaultMachine::built`] or
    /// [`FaultMachine::build_failed`].
    Build { epoch: u64, members: Vec<String> },
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Building { epoch: u64, deadline: Instant },
    Ready { epoch: u64, next: Option<(u64, Instant)> },
    Backoff { until: Instant },
}

/// Timings of the machine.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// How long a communicator may take to build.
    pub build: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            build: Duration::from_secs(30),
            backoff_base: Duration::from_millis(250),
            backoff_max: Duration::from_secs(8),
        }
    }
}

/// One router–pool communicator's lifecycle.
pub struct FaultMachine<C: Clock> {
    clock: C,
    t: Timings,
    phase: Phase,
    /// Nodes the next communicator spans.
    members: BTreeSet<String>,
    /// Nodes of the communicator now `Ready`.
    ready_members: BTreeSet<String>,
    epoch: u64,
    failures: u32,
}

impl<C: Clock> FaultMachine<C> {
    /// Starts building the first communicator over `members`.
    pub fn new(clock: C, t: Timings, members: impl IntoIterator<Item = String>) -> (Self, Action) {
        let now = clock.now();
        let members: BTreeSet<String> = members.into_iter().collect();
        let m = FaultMachine {
            phase: Phase::Building { epoch: 1, deadline: now + t.build },
            clock,
            t,
            members: members.clone(),
            ready_members: BTreeSet::new(),
            epoch: 1,
            failures: 0,
        };
        (m, Action::Build { epoch: 1, members: members.into_iter().collect() })
    }

    pub fn route(&self) -> Route {
        match self.phase {
            Phase::Ready { epoch, .. } => Route::Nccl { epoch },
            _ => Route::Fallback,
        }
    }

    /// Consecutive failed builds (0 once one succeeds).
    pub fn failures(&self) -> u32 {
        self.failures
    }

    fn build(&mut self) -> Action {
        self.epoch += 1;
        Action::Build { epoch: self.epoch, members: self.members.iter().cloned().collect() }
    }

    fn backoff(&mut self) {
        self.failures += 1;
        let d = self.t.backoff_base.saturating_mul(1 << (self.failures - 1).min(16)).min(self.t.backoff_max);
        self.phase = Phase::Backoff { until: self.clock.now() + d };
    }

    /// A build of `epoch` finished.
    pub fn built(&mut self, epoch: u64) -> Vec<Action> {
        let now_ready = match self.phase {
            Phase::Building { epoch: e, .. } => e == epoch,
            Phase::Ready { next: Some((e, _)), .. } => e == epoch,
            _ => false,
        };
        if !now_ready {
            // Superseded while it was building: it must not be used.
            return vec![Action::Abort { epoch, reason: "superseded while building".into() }];
        }
        let mut out = Vec::new();
        if let Phase::Ready { epoch: old, .. } = self.phase {
            out.push(Action::Abort { epoch: old, reason: format!("replaced by epoch {epoch}") });
        }
        self.failures = 0;
        self.ready_members = self.members.clone();
        self.phase = Phase::Ready { epoch, next: None };
        out
    }

    /// A build of `epoch` failed; retried after a backoff.
    pub fn build_failed(&mut self, epoch: u64) -> Vec<Action> {
        match self.phase {
            Phase::Building { epoch: e, .. } if e == epoch => self.backoff(),
            Phase::Ready { epoch: old, next: Some((e, _)) } if e == epoch => {
                self.failures += 1;
                self.phase = Phase::Ready { epoch: old, next: None };
            }
            _ => {}
        }
        Vec::new()
    }

    /// An exchange on `epoch` ran past its deadline or failed; `suspects`
    /// are nodes the caller knows to be gone (they leave the membership).
    pub fn exchange_failed(&mut self, epoch: u64, reason: &str, suspects: &[String]) -> Vec<Action> {
        for s in suspects {
            self.members.remove(s);
        }
        match self.phase {
            Phase::Ready { epoch: e, next } if e == epoch => {
                let mut out = vec![Action::Abort { epoch, reason: reason.to_string() }];
                if let Some((n, _)) = next {
                    out.push(Action::Abort { epoch: n, reason: "its predecessor failed".into() });
                }
                self.backoff();
                out
            }
            _ => Vec::new(),
        }
    }

    /// A member's lease ended: a communicator that spans it can hang on it.
    pub fn peer_died(&mut self, node: &str) -> Vec<Action> {
        let was_member = self.members.remove(node);
        match self.phase.clone() {
            Phase::Ready { epoch, .. } if self.ready_members.contains(node) => {
                self.exchange_failed(epoch, &format!("{node} died"), &[])
            }
            Phase::Building { epoch, .. } if was_member => {
                let a = Action::Abort { epoch, reason: format!("{node} died while building") };
                vec![a, self.restart_build()]
            }
            _ => Vec::new(),
        }
    }

    /// A node joined the pool: the next communicator includes it. A ready
    /// communicator keeps serving until its successor is built.
    pub fn peer_joined(&mut self, node: &str) -> Vec<Action> {
        if !self.members.insert(node.to_string()) {
            return Vec::new();
        }
        match self.phase.clone() {
            Phase::Ready { epoch, next } => {
                let mut out: Vec<Action> = next
                    .map(|(n, _)| Action::Abort { epoch: n, reason: "membership changed".into() })
                    .into_iter()
                    .collect();
                let b = self.build();
                self.phase = Phase::Ready { epoch, next: Some((self.epoch, self.clock.now() + self.t.build)) };
                out.push(b);
                out
            }
            Phase::Building { epoch, .. } => {
                vec![Action::Abort { epoch, reason: "membership changed".into() }, self.restart_build()]
            }
            Phase::Backoff { .. } => Vec::new(),
        }
    }

    fn restart_build(&mut self) -> Action {
        let b = self.build();
        self.phase = Phase::Building { epoch: self.epoch, deadline: self.clock.now() + self.t.build };
        b
    }

    /// Advances time: starts a due rebuild, aborts a build past its deadline.
    pub fn poll(&mut self) -> Vec<Action> {
        let now = self.clock.now();
        match self.phase.clone() {
            Phase::Backoff { until } if now >= until => vec![self.restart_build()],
            Phase::Building { epoch, deadline } if now >= deadline => {
                self.backoff();
                vec![Action::Abort { epoch, reason: "build deadline".into() }]
            }
            Phase::Ready { epoch, next: Some((n, deadline)) } if now >= deadline => {
                self.failures += 1;
                self.phase = Phase::Ready { epoch, next: None };
                vec![Action::Abort { epoch: n, reason: "build deadline".into() }]
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    #[derive(Clone)]
    struct FakeClock {
        start: Instant,
        offset: Rc<Cell<Duration>>,
    }

    impl FakeClock {
        fn new() -> Self {
            FakeClock { start: Instant::now(), offset: Rc::new(Cell::new(Duration::ZERO)) }
        }
        fn advance(&self, d: Duration) {
            self.offset.set(self.offset.get() + d);
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Instant {
            self.start + self.offset.get()
        }
    }

    fn machine() -> (FaultMachine<FakeClock>, FakeClock) {
        let clock = FakeClock::new();
        let (m, first) = FaultMachine::new(clock.clone(), Timings::default(), ["en-1".to_string(), "en-2".to_string()]);
        assert_eq!(first, Action::Build { epoch: 1, members: vec!["en-1".into(), "en-2".into()] });
        (m, clock)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn deadline_aborts_falls_back_and_rebuilds_without_the_dead_node() {
        let (mut m, clock) = machine();
        assert_eq!(m.route(), Route::Fallback);
        assert!(m.built(1).is_empty());
        assert_eq!(m.route(), Route::Nccl { epoch: 1 });
        // An exchange hangs: abort at once, fall back for this layer.
        let a = m.exchange_failed(1, "deadline", &["en-2".to_string()]);
        assert_eq!(a, vec![Action::Abort { epoch: 1, reason: "deadline".into() }]);
        assert_eq!(m.route(), Route::Fallback);
        // No rebuild before the backoff, then one without en-2.
        assert!(m.poll().is_empty());
        clock.advance(ms(250));
        assert_eq!(m.poll(), vec![Action::Build { epoch: 2, members: vec!["en-1".into()] }]);
        assert!(m.built(2).is_empty());
        assert_eq!(m.route(), Route::Nccl { epoch: 2 });
        // Stale reports about epoch 1 change nothing.
        assert!(m.exchange_failed(1, "late", &[]).is_empty());
        assert_eq!(m.route(), Route::Nccl { epoch: 2 });
    }

    #[test]
    fn builds_have_a_deadline_and_failures_back_off_exponentially() {
        let (mut m, clock) = machine();
        clock.advance(Duration::from_secs(30));
        assert_eq!(m.poll(), vec![Action::Abort { epoch: 1, reason: "build deadline".into() }]);
        let mut waits = Vec::new();
        for _ in 0..6 {
            let mut waited = Duration::ZERO;
            let epoch = loop {
                clock.advance(ms(50));
                waited += ms(50);
                if let [Action::Build { epoch, .. }] = m.poll().as_slice() {
                    break *epoch;
                }
                assert!(waited < Duration::from_secs(9), "no rebuild");
            };
            waits.push(waited.as_millis());
            m.build_failed(epoch);
        }
        assert_eq!(waits, vec![250, 500, 1000, 2000, 4000, 8000]);
        assert_eq!(m.failures(), 7);
        clock.advance(Duration::from_secs(8));
        let [Action::Build { epoch, .. }] = m.poll()[..] else { panic!("no rebuild") };
        m.built(epoch);
        assert_eq!((m.route(), m.failures()), (Route::Nccl { epoch }, 0));
    }

    #[test]
    fn a_join_builds_the_next_communicator_beside_the_ready_one() {
        let (mut m, clock) = machine();
        m.built(1);
        let a = m.peer_joined("en-3");
        assert_eq!(a, vec![Action::Build { epoch: 2, members: vec!["en-1".into(), "en-2".into(), "en-3".into()] }]);
        assert_eq!(m.route(), Route::Nccl { epoch: 1 }, "the old one serves meanwhile");
        assert_eq!(m.built(2), vec![Action::Abort { epoch: 1, reason: "replaced by epoch 2".into() }]);
        assert_eq!(m.route(), Route::Nccl { epoch: 2 });
        // A successor that never builds is abandoned at its deadline.
        m.peer_joined("en-4");
        clock.advance(Duration::from_secs(31));
        assert_eq!(m.poll(), vec![Action::Abort { epoch: 3, reason: "build deadline".into() }]);
        assert_eq!(m.route(), Route::Nccl { epoch: 2 });
        assert_eq!(m.built(3), vec![Action::Abort { epoch: 3, reason: "superseded while building".into() }]);
    }

    #[test]
    fn a_death_aborts_the_communicator_that_spans_it_only() {
        let (mut m, _clock) = machine();
        // Dying while the first build runs restarts it without the node.
        let a = m.peer_died("en-2");
        assert_eq!(a[1], Action::Build { epoch: 2, members: vec!["en-1".into()] });
        m.built(2);
        assert!(m.peer_died("en-9").is_empty(), "not a member");
        let a = m.peer_died("en-1");
        assert!(matches!(a[..], [Action::Abort { epoch: 2, .. }]));
        assert_eq!(m.route(), Route::Fallback);
    }
}
