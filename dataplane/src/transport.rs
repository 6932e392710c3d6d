//! The transport seam between the dispatch planner and the expert nodes.
//!
//! One [`Transport::exchange`] call is a collective for one MoE layer of one
//! step: every destination node gets exactly one batch (its distinct token
//! rows and, per expert, which rows with which gate weights) and answers with
//! one combined row per token. The planner fixes the per-node row counts
//! before any payload moves, which is what an all-to-all over NCCL needs
//! (counts first, then device buffers of known size).

use crate::codec;
use crate::error::{DataPlaneError, Result};
use crate::placement::NodeId;
use expertmesh_model::moe::{ExpertGroup, LocalExperts};
use expertmesh_proto::v1::{DispatchRequest, DispatchResponse, Dtype, ExpertTokens, PackedRows};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, RwLock};

/// One node's share of a layer: `rows` is `[n, hidden]`; groups index into it.
/// The rows are shared so a transport can put them on the wire without a copy.
#[derive(Debug, Clone)]
pub struct NodeBatch {
    pub node: NodeId,
    pub rows: Arc<Vec<f32>>,
    pub groups: Vec<ExpertGroup>,
}

pub trait Transport: Send + Sync {
    /// Sends each batch to its node and returns, aligned with `batches`, each
    /// node's combined rows (`[n, hidden]`) or that node's error. One node's
    /// failure never fails the others.
    fn exchange(&self, step: u64, layer: usize, hidden: usize, batches: &[NodeBatch]) -> Vec<Result<Vec<f32>>>;

    /// Replaces the node address book (a new placement); links to moved or
    /// removed nodes close. Transports that dial nobody ignore it.
    fn set_addresses(&self, _addrs: BTreeMap<NodeId, String>) {}
}

/// Replaces a dialling transport's address book; links to nodes whose
/// address changed or that left are dropped (they close).
pub fn replace_addresses<L>(
    addrs: &RwLock<BTreeMap<NodeId, String>>,
    links: &Mutex<std::collections::HashMap<NodeId, L>>,
    new: BTreeMap<NodeId, String>,
) {
    if let (Ok(mut a), Ok(mut l)) = (addrs.write(), links.lock()) {
        l.retain(|n, _| a.get(n) == new.get(n));
        *a = new;
    }
}

/// The wire request for one node's batch.
pub fn dispatch_request(step: u64, layer: usize, hidden: usize, b: &NodeBatch, dtype: Dtype) -> DispatchRequest {
    DispatchRequest {
        step,
        layer: layer as u32,
        rows: Some(codec::encode(Arc::clone(&b.rows), hidden, dtype)),
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

/// Expert "nodes" inside this process: the single-process baseline, and a
/// deterministic stand-in for failure tests of the planner.
#[derive(Default)]
pub struct InProcess {
    nodes: RwLock<BTreeMap<NodeId, Arc<LocalExperts>>>,
    down: Mutex<BTreeSet<NodeId>>,
}

impl InProcess {
    pub fn add(&self, node: &str, experts: Arc<LocalExperts>) {
        if let Ok(mut n) = self.nodes.write() {
            n.insert(node.to_string(), experts);
        }
    }

    /// Makes a node fail every exchange until `set_down(node, false)`.
    pub fn set_down(&self, node: &str, down: bool) {
        if let Ok(mut d) = self.down.lock() {
            if down {
                d.insert(node.to_string())
            } else {
                d.remove(node)
            };
        }
    }
}

impl Transport for InProcess {
    fn exchange(&self, _step: u64, layer: usize, hidden: usize, batches: &[NodeBatch]) -> Vec<Result<Vec<f32>>> {
        batches
            .iter()
            .map(|b| {
                let down = self.down.lock().map(|d| d.contains(&b.node)).unwrap_or(true);
                let node = self.nodes.read().ok().and_then(|n| n.get(&b.node).cloned());
                match (down, node) {
                    (false, Some(experts)) => experts
                        .compute(layer, &b.rows, hidden, &b.groups)
                        .map_err(|e| DataPlaneError::Compute(e.to_string())),
                    _ => Err(DataPlaneError::Transport { node: b.node.clone(), message: "node is down".into() }),
                }
            })
            .collect()
    }
}
