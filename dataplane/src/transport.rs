//! The transport seam between the dispatch planner and the expert nodes.
//!
//! For one MoE layer of one step every destination node gets exactly one
//! batch (its distinct token rows and, per expert, which rows with which
//! gate weights) and answers with one combined row per token. The planner
//! fixes the per-node row counts before any payload moves, which is what an
//! all-to-all over NCCL needs (counts first, then device buffers of known
//! size).
//!
//! [`Transport::send`] does not wait: each answer arrives on a channel as
//! it comes, so the executor can give a slow node a deadline of its own and
//! hedge its share to another replica while the rest of the layer is still
//! arriving (see `executor`). [`Transport::exchange`] is the blocking
//! collective over it.

use crate::codec;
use crate::error::{DataPlaneError, Result};
use crate::placement::NodeId;
use expertmesh_model::moe::{ExpertGroup, LocalExperts};
use expertmesh_proto::v1::{DispatchRequest, DispatchResponse, Dtype, ExpertTokens, NcclMarker, PackedRows};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::time::Duration;

/// One node's share of a layer: `rows` is `[n, hidden]`; groups index into it.
/// The rows are shared so a transport can put them on the wire without a copy.
#[derive(Debug, Clone)]
pub struct NodeBatch {
    pub node: NodeId,
    pub rows: Arc<Vec<f32>>,
    pub groups: Vec<ExpertGroup>,
}

/// Where answers go: `(tag, the node's combined rows or its error)`.
pub type Replies = mpsc::Sender<(usize, Result<Vec<f32>>)>;

/// Sends a reply. The receiver is gone once the executor has what it
/// needs (a late answer of a hedged node); dropping that reply is the point.
pub fn reply(to: &Replies, tag: usize, r: Result<Vec<f32>>) {
    if to.send((tag, r)).is_err() {
        tracing::trace!(tag, "a late dispatch answer was discarded");
    }
}

pub trait Transport: Send + Sync {
    /// Sends each batch to its node without waiting for answers. Batch `i`'s
    /// combined rows (`[n, hidden]`), or that node's error, are sent to
    /// `replies` tagged `first_tag + i`, exactly once: at the latest when
    /// the transport's own timeout (`--dispatch-timeout`) expires. One
    /// node's failure never fails the others.
    fn send(&self, step: u64, layer: usize, hidden: usize, batches: &[NodeBatch], first_tag: usize, replies: &Replies);

    /// Sends the batches and waits for every answer, aligned with `batches`.
    fn exchange(&self, step: u64, layer: usize, hidden: usize, batches: &[NodeBatch]) -> Vec<Result<Vec<f32>>> {
        let (tx, rx) = mpsc::channel();
        self.send(step, layer, hidden, batches, 0, &tx);
        drop(tx);
        let mut out: Vec<Option<Result<Vec<f32>>>> = (0..batches.len()).map(|_| None).collect();
        for (tag, r) in rx {
            if let Some(slot) = out.get_mut(tag) {
                *slot = Some(r);
            }
        }
        out.into_iter()
            .zip(batches)
            .map(|(r, b)| {
                r.unwrap_or_else(|| {
                    Err(DataPlaneError::Transport { node: b.node.clone(), message: "no answer".into() })
                })
            })
            .collect()
    }

    /// Replaces the node address book (a new placement); links to moved or
    /// removed nodes close. Transports that dial nobody ignore it.
    fn set_addresses(&self, _addrs: BTreeMap<NodeId, String>) {}
}

/// Replaces a dialling transport's address book; links to nodes whose
/// address changed or that left are dropped (they close).
pub fn replace_addresses<L>(
    addrs: &RwLock<BTreeMap<NodeId, String>>,
    links: &Mutex<HashMap<NodeId, L>>,
    new: BTreeMap<NodeId, String>,
) {
    // A panic elsewhere while holding these leaves consistent maps: recover.
    let mut a = addrs.write().unwrap_or_else(|e| e.into_inner());
    let mut l = links.lock().unwrap_or_else(|e| e.into_inner());
    l.retain(|n, _| a.get(n) == new.get(n));
    *a = new;
}

/// The wire request for one node's batch.
pub fn dispatch_request(step: u64, layer: usize, hidden: usize, b: &NodeBatch, dtype: Dtype) -> DispatchRequest {
    header_request(step, layer, codec::encode(Arc::clone(&b.rows), hidden, dtype), b, None)
}

/// A request whose rows travel over NCCL: only their count is in it.
pub fn nccl_request(step: u64, layer: usize, hidden: usize, b: &NodeBatch, marker: NcclMarker) -> DispatchRequest {
    let rows = PackedRows {
        dtype: Dtype::F32 as i32,
        num_rows: (b.rows.len() / hidden.max(1)) as u32,
        hidden_size: hidden as u32,
        data: Default::default(),
        scales: Default::default(),
    };
    header_request(step, layer, rows, b, Some(marker))
}

fn header_request(
    step: u64,
    layer: usize,
    rows: PackedRows,
    b: &NodeBatch,
    nccl: Option<NcclMarker>,
) -> DispatchRequest {
    DispatchRequest {
        step,
        layer: layer as u32,
        rows: Some(rows),
        experts: b
            .groups
            .iter()
            .map(|g| ExpertTokens {
                expert: g.expert,
                rows: g.rows.iter().map(|&r| r as u32).collect(),
                weights: g.weights.clone(),
            })
            .collect(),
        trace_id: crate::trace::step(),
        nccl,
    }
}

/// A node's answer to `b`, checked: the same step, one row per token.
pub fn check_response(resp: DispatchResponse, b: &NodeBatch, step: u64, hidden: usize) -> Result<PackedRows> {
    let n = b.rows.len() / hidden.max(1);
    let rows = resp.combined.ok_or_else(|| DataPlaneError::Invalid("response without rows".into()))?;
    if rows.num_rows as usize != n || resp.step != step {
        return Err(DataPlaneError::Invalid(format!(
            "{} answered step {} with {} rows; expected step {step} with {n}",
            b.node, resp.step, rows.num_rows
        )));
    }
    Ok(rows)
}

/// How an in-process "node" misbehaves, for failure tests.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Every batch fails at once (a dead node).
    Down,
    /// Every batch is answered after this long (a hung or slow node).
    Slow(Duration),
}

/// Expert "nodes" inside this process: the single-process baseline, and a
/// deterministic stand-in for failure tests of the planner.
#[derive(Default)]
pub struct InProcess {
    nodes: RwLock<BTreeMap<NodeId, Arc<LocalExperts>>>,
    faults: Mutex<HashMap<NodeId, Fault>>,
}

impl InProcess {
    pub fn add(&self, node: &str, experts: Arc<LocalExperts>) {
        self.nodes.write().unwrap_or_else(|e| e.into_inner()).insert(node.to_string(), experts);
    }

    fn set_fault(&self, node: &str, f: Option<Fault>) {
        let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        match f {
            Some(f) => faults.insert(node.to_string(), f),
            None => faults.remove(node),
        };
    }

    /// Makes a node fail every batch until `set_down(node, false)`.
    pub fn set_down(&self, node: &str, down: bool) {
        self.set_fault(node, down.then_some(Fault::Down));
    }

    /// Makes a node answer every batch only after `delay` (`None`: at once).
    pub fn set_delay(&self, node: &str, delay: Option<Duration>) {
        self.set_fault(node, delay.map(Fault::Slow));
    }
}

impl Transport for InProcess {
    fn send(
        &self,
        _step: u64,
        layer: usize,
        hidden: usize,
        batches: &[NodeBatch],
        first_tag: usize,
        replies: &Replies,
    ) {
        for (i, b) in batches.iter().enumerate() {
            let fault = self.faults.lock().unwrap_or_else(|e| e.into_inner()).get(&b.node).copied();
            let node = self.nodes.read().unwrap_or_else(|e| e.into_inner()).get(&b.node).cloned();
            let compute = {
                let b = b.clone();
                move || match node {
                    Some(experts) => experts
                        .compute(layer, &b.rows, hidden, &b.groups)
                        .map_err(|e| DataPlaneError::Compute(e.to_string())),
                    None => Err(DataPlaneError::Transport { node: b.node.clone(), message: "unknown node".into() }),
                }
            };
            match fault {
                None => reply(replies, first_tag + i, compute()),
                Some(Fault::Down) => {
                    let e = DataPlaneError::Transport { node: b.node.clone(), message: "node is down".into() };
                    reply(replies, first_tag + i, Err(e))
                }
                Some(Fault::Slow(d)) => {
                    let to = replies.clone();
                    std::thread::spawn(move || {
                        std::thread::sleep(d);
                        reply(&to, first_tag + i, compute());
                    });
                }
            }
        }
    }
}
