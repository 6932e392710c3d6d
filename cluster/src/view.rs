//! The cluster as read from etcd, and what follows from it alone: which
//! nodes may hold experts, the load the routers report, how balanced a
//! placement is under that load, and whether every expert has a live
//! replica. The leading coordinator decides from a [`View`]; `expertmesh
//! status` reports one. No I/O here.

use crate::keys::{DrainState, LoadReport, NodeRecord, NodeState, RouterRecord};
use expertmesh_spec::model_config::ModelConfig;
use expertmesh_spec::placement::Placement;
use std::collections::BTreeMap;

/// The cluster as last seen in etcd.
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

/// What placement needs to know about the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    pub moe_layers: Vec<usize>,
    pub experts: usize,
    /// Expert groups of group-limited routing; 1 when routing is not grouped.
    pub groups: usize,
}

impl ModelShape {
    pub fn of(model: &ModelConfig) -> Self {
        let m = &model.moe;
        let grouped = m.n_group > 1 && m.topk_group < m.n_group && m.n_routed_experts.is_multiple_of(m.n_group);
        ModelShape {
            moe_layers: model.moe_layers().collect(),
            experts: m.n_routed_experts,
            groups: if grouped { m.n_group } else { 1 },
        }
    }

    /// Routed experts over all MoE layers.
    pub fn total_experts(&self) -> usize {
        self.moe_layers.len() * self.experts
    }
}

/// Whether every expert has a live replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coverage {
    /// No placement exists yet: nothing is served. `experts` is every
    /// routed expert of the model, when the view knows the model's shape.
    NoPlacement { experts: Option<usize> },
    /// A placement exists; this many experts have no live replica in it.
    Placed { uncovered: usize },
}

impl Coverage {
    /// Experts without a live replica (all of them without a placement);
    /// `None` when that count is unknown.
    pub fn uncovered(self) -> Option<usize> {
        match self {
            Coverage::NoPlacement { experts } => experts,
            Coverage::Placed { uncovered } => Some(uncovered),
        }
    }

    /// A placement exists and covers every expert.
    pub fn complete(self) -> bool {
        self == Coverage::Placed { uncovered: 0 }
    }
}

impl View {
    /// Nodes that may hold experts: ready, and not drained or being drained.
    pub fn eligible(&self) -> BTreeMap<String, &NodeRecord> {
        self.nodes
            .iter()
            .filter(|(id, n)| n.state == NodeState::Ready && !self.drains.contains_key(*id))
            .map(|(id, n)| (id.clone(), n))
            .collect()
    }

    /// The model's shape as the cluster reports it: from the placement, else
    /// from a router's load report.
    pub fn shape(&self) -> Option<ModelShape> {
        if let Some(p) = &self.placement {
            let experts = p.layers.values().next().map_or(0, Vec::len);
            return Some(ModelShape { moe_layers: p.layers.keys().copied().collect(), experts, groups: 1 });
        }
        self.loads.iter().find(|r| !r.moe_layers.is_empty()).map(|r| ModelShape {
            moe_layers: r.moe_layers.clone(),
            experts: r.layers.first().map_or(0, Vec::len),
            groups: 1,
        })
    }

    /// Routed-token load per MoE layer (in `shape.moe_layers` order) and
    /// expert, summed over the routers' reports.
    pub fn total_load(&self, shape: &ModelShape) -> Vec<Vec<f64>> {
        let mut out = vec![vec![0.0; shape.experts]; shape.moe_layers.len()];
        for r in &self.loads {
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

    /// Mean over layers of mean/max node load of `p` under the current
    /// loads; `None` without any load yet.
    pub fn balancedness(&self, shape: &ModelShape, p: &Placement) -> Option<f64> {
        let load = self.total_load(shape);
        if load.iter().flatten().sum::<f64>() <= 0.0 {
            return None;
        }
        let order: Vec<String> = p.nodes.keys().cloned().collect();
        let layers = node_indices(p, shape, &order);
        let sum: f64 =
            load.iter().zip(&layers).map(|(l, pl)| expertmesh_planner::balancedness(l, pl, order.len())).sum();
        Some(sum / load.len().max(1) as f64)
    }

    /// Coverage of the placement in force by live, serving nodes.
    pub fn coverage(&self) -> Coverage {
        let Some(p) = &self.placement else {
            return Coverage::NoPlacement { experts: self.shape().map(|s| s.total_experts()) };
        };
        let live = |n: &String| {
            let at = p.nodes.get(n);
            self.nodes.get(n).is_some_and(|r| Some(&r.addr) == at && r.state != NodeState::Joining)
        };
        Coverage::Placed { uncovered: p.layers.values().flatten().filter(|reps| !reps.iter().any(live)).count() }
    }
}

/// `[layer][expert] -> node indices` of a placement, against `order`; nodes
/// not in `order` get indices past its end (the planner treats them as gone).
pub fn node_indices(p: &Placement, shape: &ModelShape, order: &[String]) -> Vec<Vec<Vec<usize>>> {
    let gone: BTreeMap<&String, usize> =
        p.nodes.keys().filter(|n| !order.contains(n)).enumerate().map(|(i, n)| (n, order.len() + i)).collect();
    let index = |n: &String| order.iter().position(|o| o == n).or_else(|| gone.get(n).copied());
    shape
        .moe_layers
        .iter()
        .map(|l| (0..shape.experts).map(|e| p.replicas(*l, e).iter().filter_map(index).collect()).collect())
        .collect()
}

/// Reads the `placement` key. A value that does not parse or does not fit
/// the model is an error, reported once per distinct value, and the last
/// good placement stays in force: garbage in etcd never reads as "no
/// placement" (which would make a leader plan from scratch) or as a plan
/// routers would follow.
#[derive(Debug, Default)]
pub struct PlacementReader {
    good: Option<Placement>,
    bad: Option<Vec<u8>>,
}

impl PlacementReader {
    /// The placement in force given the key's current value, and the error
    /// if `value` is a bad value not reported before.
    pub fn read(&mut self, value: Option<&[u8]>, model: &ModelConfig) -> (Option<&Placement>, Option<String>) {
        let Some(bytes) = value else {
            self.bad = None;
            return (self.good.as_ref(), None);
        };
        match Placement::from_json(bytes).and_then(|p| p.validate(model).map(|()| p)) {
            Ok(p) => {
                self.bad = None;
                if self.good.as_ref().is_none_or(|g| g.version <= p.version) {
                    self.good = Some(p);
                }
                (self.good.as_ref(), None)
            }
            Err(e) if self.bad.as_deref() != Some(bytes) => {
                self.bad = Some(bytes.to_vec());
                (self.good.as_ref(), Some(e.to_string()))
            }
            Err(_) => (self.good.as_ref(), None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, state: NodeState) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            addr: format!("{id}:1"),
            metrics: String::new(),
            device: "cpu".into(),
            capacity_bytes: 0,
            expert_bytes: 1,
            state,
            incarnation: 0,
        }
    }

    fn placement() -> Placement {
        let nodes = [("a", "a:1"), ("b", "b:1")].map(|(n, a)| (n.to_string(), a.to_string())).into();
        let layers = [(1, vec![vec!["a".to_string()], vec!["b".to_string()], vec!["a".into(), "b".into()]])].into();
        Placement { version: 1, nodes, layers }
    }

    #[test]
    fn nothing_is_covered_before_a_placement_exists() {
        let mut v = View::default();
        v.nodes.insert("a".into(), node("a", NodeState::Ready));
        assert_eq!(v.coverage(), Coverage::NoPlacement { experts: None });
        assert!(!v.coverage().complete());
        v.loads.push(LoadReport { moe_layers: vec![1, 2], layers: vec![vec![0.0; 3]; 2] });
        assert_eq!(v.coverage().uncovered(), Some(6), "every expert of the reported shape");
        v.placement = Some(placement());
        assert_eq!(v.coverage(), Coverage::Placed { uncovered: 1 }, "b's only expert is not live");
        v.nodes.insert("b".into(), node("b", NodeState::Joining));
        assert_eq!(v.coverage().uncovered(), Some(1), "a joining node serves nothing yet");
        v.nodes.insert("b".into(), node("b", NodeState::Ready));
        assert!(v.coverage().complete());
    }

    #[test]
    fn a_bad_placement_is_reported_once_and_the_last_good_one_stays() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/deepseek_v3_qnull");
        let model = ModelConfig::from_dir(&dir).unwrap();
        let nodes = [("a".to_string(), "a:1".to_string())];
        let good = Placement::round_robin(&model, &nodes, 1).unwrap().to_json();
        let mut r = PlacementReader::default();
        assert_eq!(r.read(None, &model), (None, None));
        let (p, e) = r.read(Some(b"{not json"), &model);
        assert!(p.is_none() && e.is_some(), "garbage is an error, not 'no placement'");
        assert_eq!(r.read(Some(b"{not json"), &model).1, None, "reported once");
        assert_eq!(r.read(Some(&good), &model).0.map(|p| p.version), Some(1));
        let (p, e) = r.read(Some(br#"{"version": 9, "nodes": {}, "layers": {}}"#), &model);
        assert_eq!(p.map(|p| p.version), Some(1), "a placement that does not fit the model keeps the last good one");
        assert!(e.unwrap().contains("layer"), "names what is missing");
    }
}
