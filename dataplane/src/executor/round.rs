//! One MoE layer's dispatch: batches in flight, each node with a deadline
//! of its own, hedged shares and re-dispatch around failures.
//!
//! A *share* is a set of expert groups that must be answered exactly once.
//! It starts as one node's batch; it gains an *alternative* (the same
//! groups planned onto other replicas) when its node misses its deadline
//! (a hedge) or when every alternative so far has failed (re-dispatch). The
//! first alternative whose batches all answer wins and is added into the
//! output; answers for a share already won are discarded, so a late answer
//! is never mixed in.

use super::RemoteExecutor;
use crate::error::{DataPlaneError, Result};
use crate::placement::{NodeId, Placement};
use crate::transport::NodeBatch;
use expertmesh_model::ModelError;
use expertmesh_model::moe::ExpertGroup;
use std::collections::{BTreeSet, HashMap};
use std::sync::mpsc;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    InFlight,
    Answered,
    Failed,
}

/// One batch on the wire (the batch itself is the transport's).
struct Flight {
    node: NodeId,
    /// Token-expert pairs it carries (metrics).
    pairs: u64,
    /// The batch's rows, as token indices of the layer's batch.
    tokens: Vec<usize>,
    share: usize,
    sent: Instant,
    /// Past this the share is hedged (once).
    soft: Instant,
    /// Past this the batch has failed.
    hard: Instant,
    hedged: bool,
    state: State,
    result: Option<Vec<f32>>,
}

struct Share {
    /// Its groups with the layer batch's token indices.
    groups: Vec<ExpertGroup>,
    /// Each a set of flights that together answer every group.
    alternatives: Vec<Vec<usize>>,
    won: bool,
}

/// The state of one `execute` call.
pub(super) struct Round<'a> {
    ex: &'a RemoteExecutor,
    placement: &'a Placement,
    step: u64,
    layer: usize,
    hidden: &'a [f32],
    h: usize,
    flights: Vec<Flight>,
    shares: Vec<Share>,
    /// Nodes that failed in this call: never planned onto again.
    failed: BTreeSet<NodeId>,
    errors: Vec<String>,
    tx: mpsc::Sender<(usize, Result<Vec<f32>>)>,
    rx: mpsc::Receiver<(usize, Result<Vec<f32>>)>,
    /// Token-expert pairs answered, per node (metrics).
    pub served: HashMap<NodeId, u64>,
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
    (NodeBatch { node, rows: std::sync::Arc::new(rows), groups }, tokens)
}

impl<'a> Round<'a> {
    pub(super) fn new(
        ex: &'a RemoteExecutor,
        placement: &'a Placement,
        step: u64,
        layer: usize,
        hidden: &'a [f32],
        h: usize,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        Round {
            ex,
            placement,
            step,
            layer,
            hidden,
            h,
            flights: Vec::new(),
            shares: Vec::new(),
            failed: BTreeSet::new(),
            errors: Vec::new(),
            tx,
            rx,
            served: HashMap::new(),
        }
    }

    fn unavailable(&self, experts: &[u32]) -> ModelError {
        let list = experts.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
        let why = if self.errors.is_empty() { String::new() } else { format!(" ({})", self.errors.join("; ")) };
        ModelError::Unavailable(format!("layer {} experts [{list}] have no live replica{why}", self.layer))
    }

    /// Plans `groups` onto replicas outside `exclude` and sends them: each
    /// node's batch a new share, or (with `share`) together one new
    /// alternative of that share.
    fn launch(
        &mut self,
        groups: Vec<ExpertGroup>,
        exclude: &BTreeSet<NodeId>,
        share: Option<usize>,
    ) -> std::result::Result<(), Vec<u32>> {
        let plan = self.ex.assign(self.placement, self.layer, groups, exclude)?;
        let now = Instant::now();
        let first = self.flights.len();
        let mut batches = Vec::with_capacity(plan.len());
        let mut alternative = Vec::new();
        for (node, node_groups) in plan {
            let id = self.flights.len();
            let share = match share {
                Some(s) => {
                    alternative.push(id);
                    s
                }
                None => {
                    self.shares.push(Share { groups: node_groups.clone(), alternatives: vec![vec![id]], won: false });
                    self.shares.len() - 1
                }
            };
            let (batch, tokens) = node_batch(node.clone(), node_groups, self.hidden, self.h);
            let soft = now + self.ex.health.deadline(&node);
            let hard = now + self.ex.health.policy.hard;
            let pairs = batch.groups.iter().map(|g| g.rows.len() as u64).sum();
            batches.push(batch);
            let f = Flight {
                node,
                pairs,
                tokens,
                share,
                sent: now,
                soft,
                hard,
                hedged: false,
                state: State::InFlight,
                result: None,
            };
            self.flights.push(f);
        }
        if let Some(s) = share {
            self.shares[s].alternatives.push(alternative);
        }
        self.ex.track(self.flights[first..].iter().map(|f| (&f.node, f.tokens.len())), true);
        self.ex.transport.send(self.step, self.layer, self.h, &batches, first, &self.tx);
        Ok(())
    }

    /// Sends the layer's groups and waits until every share is answered,
    /// hedging slow nodes and re-dispatching around failed ones.
    pub(super) fn run(&mut self, groups: Vec<ExpertGroup>, out: &mut [f32]) -> std::result::Result<(), ModelError> {
        self.launch(groups, &BTreeSet::new(), None).map_err(|e| self.unavailable(&e))?;
        let result = self.settle(out);
        self.ex.track(self.flights.iter().map(|f| (&f.node, f.tokens.len())), false);
        result
    }

    fn settle(&mut self, out: &mut [f32]) -> std::result::Result<(), ModelError> {
        while self.shares.iter().any(|s| !s.won) {
            let now = Instant::now();
            let wake = self.next_deadline().unwrap_or(now);
            match self.rx.recv_timeout(wake.saturating_duration_since(now)) {
                Ok((id, r)) => self.on_answer(id, r, out)?,
                Err(mpsc::RecvTimeoutError::Timeout) => self.on_deadlines()?,
                // Unreachable: `self.tx` is alive.
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(ModelError::Executor("dispatch reply channel closed".into()));
                }
            }
        }
        Ok(())
    }

    /// The earliest moment something is due: a soft deadline of an
    /// unhedged flight or a hard one, among flights that still matter.
    fn next_deadline(&self) -> Option<Instant> {
        self.flights
            .iter()
            .filter(|f| f.state == State::InFlight && !self.shares[f.share].won)
            .map(|f| if f.hedged { f.hard } else { f.soft.min(f.hard) })
            .min()
    }

    fn on_answer(&mut self, id: usize, r: Result<Vec<f32>>, out: &mut [f32]) -> std::result::Result<(), ModelError> {
        let Some(f) = self.flights.get(id) else { return Ok(()) };
        if f.state != State::InFlight {
            return Ok(()); // already given up on (hard deadline)
        }
        let want = f.tokens.len() * self.h;
        let r = r.and_then(|c| match c.len() == want {
            true => Ok(c),
            false => Err(DataPlaneError::Invalid(format!(
                "{} returned {} values for {} rows",
                f.node,
                c.len(),
                f.tokens.len()
            ))),
        });
        match r {
            Ok(c) => {
                let f = &mut self.flights[id];
                f.state = State::Answered;
                f.result = Some(c);
                self.ex.health.answered(&f.node, f.sent.elapsed());
                let share = f.share;
                self.try_win(share, out);
                Ok(())
            }
            Err(e) => self.on_failure(id, e),
        }
    }

    /// A failed flight: its node is out for this call; if the share has no
    /// alternative left that can still answer, it is planned again.
    fn on_failure(&mut self, id: usize, e: DataPlaneError) -> std::result::Result<(), ModelError> {
        let f = &mut self.flights[id];
        f.state = State::Failed;
        let (node, share) = (f.node.clone(), f.share);
        tracing::warn!(node = %node, layer = self.layer, error = %e, "dispatch failed; re-dispatching to other replicas");
        self.ex.health.failed(&node);
        self.failed.insert(node);
        self.errors.push(e.to_string());
        if self.shares[share].won || self.can_still_answer(share) {
            return Ok(());
        }
        let groups = self.shares[share].groups.clone();
        let exclude = self.failed.clone();
        self.launch(groups, &exclude, Some(share)).map_err(|e| self.unavailable(&e))
    }

    fn can_still_answer(&self, share: usize) -> bool {
        self.shares[share]
            .alternatives
            .iter()
            .any(|a| !a.is_empty() && a.iter().all(|&i| self.flights[i].state != State::Failed))
    }

    /// Adds the share into `out` if one of its alternatives is complete.
    fn try_win(&mut self, share: usize, out: &mut [f32]) {
        let s = &self.shares[share];
        if s.won {
            return; // a late answer of a share already added: discarded
        }
        let Some(winner) = s
            .alternatives
            .iter()
            .find(|a| !a.is_empty() && a.iter().all(|&i| self.flights[i].state == State::Answered))
            .cloned()
        else {
            return;
        };
        self.shares[share].won = true;
        let h = self.h;
        for i in winner {
            let f = &mut self.flights[i];
            let combined = f.result.take().unwrap_or_default();
            *self.served.entry(f.node.clone()).or_default() += f.pairs;
            for (k, &t) in f.tokens.iter().enumerate() {
                let dst = &mut out[t * h..(t + 1) * h];
                dst.iter_mut().zip(&combined[k * h..(k + 1) * h]).for_each(|(o, v)| *o += v);
            }
        }
    }

    /// Flights past their hard deadline fail; flights past their soft one
    /// get their share hedged (once) and their node probed.
    fn on_deadlines(&mut self) -> std::result::Result<(), ModelError> {
        let now = Instant::now();
        let due: Vec<usize> = (0..self.flights.len())
            .filter(|&i| {
                let f = &self.flights[i];
                f.state == State::InFlight
                    && !self.shares[f.share].won
                    && (now >= f.hard || (!f.hedged && now >= f.soft))
            })
            .collect();
        for i in due {
            let f = &self.flights[i];
            if now >= f.hard {
                let e =
                    DataPlaneError::Timeout { node: f.node.clone(), seconds: self.ex.health.policy.hard.as_secs_f64() };
                self.on_failure(i, e)?;
            } else {
                self.hedge(i);
            }
        }
        Ok(())
    }

    fn hedge(&mut self, id: usize) {
        let f = &mut self.flights[id];
        f.hedged = true;
        let (node, share) = (f.node.clone(), f.share);
        if self.ex.health.suspect(&node) {
            self.ex.probe(&node, self.layer, self.h);
        }
        let mut exclude = self.failed.clone();
        exclude.insert(node.clone());
        let groups = self.shares[share].groups.clone();
        // All or nothing: the node's answer is one sum over its groups, so
        // a share is hedged only if every group has another replica.
        match self.launch(groups, &exclude, Some(share)) {
            Ok(()) => {
                if let Some(m) = &self.ex.metrics {
                    m.hedged.with_label_values(&[&node]).inc();
                }
                tracing::info!(node = %node, layer = self.layer, "hedged a slow node's share to other replicas");
            }
            Err(_) => tracing::debug!(node = %node, "no other replica to hedge to; waiting for the hard limit"),
        }
    }
}
