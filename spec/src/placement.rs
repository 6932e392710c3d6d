//! The placement: for every MoE layer and routed expert, the nodes holding
//! a replica, plus each node's address.
//!
//! File format (JSON):
//! ```json
//! {"version": 1,
//!  "nodes": {"en-0": "127.0.0.1:50051", "en-1": "127.0.0.1:50052"},
//!  "layers": {"1": [["en-0", "en-1"], ["en-1"], …one list per expert…], …}}
//! ```
//! Every MoE layer of the model must be listed, with one non-empty list of
//! distinct known node ids per routed expert.

use crate::error::{Result, SpecError};
use crate::model_config::ModelConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub type NodeId = String;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    #[serde(default)]
    pub version: u64,
    pub nodes: BTreeMap<NodeId, String>,
    /// Keyed by decoder layer index (as a string in JSON).
    pub layers: BTreeMap<usize, Vec<Vec<NodeId>>>,
}

impl Placement {
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| SpecError::Placement(format!("{}: {e}", path.display())))?;
        Self::from_json(&bytes).map_err(|e| SpecError::Placement(format!("{}: {e}", path.display())))
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| SpecError::Placement(e.to_string()))
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Expert `e` of every MoE layer on `replicas` consecutive nodes
    /// (round-robin), so each node holds about the same number of experts.
    pub fn round_robin(cfg: &ModelConfig, nodes: &[(NodeId, String)], replicas: usize) -> Result<Self> {
        if nodes.is_empty() || replicas == 0 || replicas > nodes.len() {
            return Err(SpecError::Placement(format!("{replicas} replicas need between 1 and {} nodes", nodes.len())));
        }
        let layers = cfg
            .moe_layers()
            .map(|l| {
                let experts = (0..cfg.moe.n_routed_experts)
                    .map(|e| (0..replicas).map(|r| nodes[(e + r) % nodes.len()].0.clone()).collect())
                    .collect();
                (l, experts)
            })
            .collect();
        Ok(Placement { version: 1, nodes: nodes.iter().cloned().collect(), layers })
    }

    /// Checks the placement covers `cfg`'s MoE layers and experts.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        for l in cfg.moe_layers() {
            let experts =
                self.layers.get(&l).ok_or_else(|| SpecError::Placement(format!("MoE layer {l} is missing")))?;
            if experts.len() != cfg.moe.n_routed_experts {
                return Err(SpecError::Placement(format!(
                    "layer {l} lists {} experts, the model has {}",
                    experts.len(),
                    cfg.moe.n_routed_experts
                )));
            }
            for (e, reps) in experts.iter().enumerate() {
                if reps.is_empty() {
                    return Err(SpecError::Placement(format!("layer {l} expert {e} has no replica")));
                }
                for (i, n) in reps.iter().enumerate() {
                    if !self.nodes.contains_key(n) {
                        return Err(SpecError::Placement(format!("layer {l} expert {e}: unknown node {n:?}")));
                    }
                    if reps[..i].contains(n) {
                        return Err(SpecError::Placement(format!("layer {l} expert {e}: node {n:?} listed twice")));
                    }
                }
            }
        }
        if let Some(l) = self.layers.keys().find(|l| !cfg.moe_layers().any(|m| m == **l)) {
            return Err(SpecError::Placement(format!("layer {l} is not a MoE layer of this model")));
        }
        Ok(())
    }

    /// The `(layer, expert)` pairs a node holds.
    pub fn experts_of(&self, node: &str) -> Vec<(usize, usize)> {
        let mut v = Vec::new();
        for (l, experts) in &self.layers {
            v.extend(experts.iter().enumerate().filter(|(_, r)| r.iter().any(|n| n == node)).map(|(e, _)| (*l, e)));
        }
        v
    }

    /// The nodes holding `(layer, expert)`.
    pub fn replicas(&self, layer: usize, expert: usize) -> &[NodeId] {
        self.layers.get(&layer).and_then(|e| e.get(expert)).map(Vec::as_slice).unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ModelConfig {
        ModelConfig::from_json_str(
            r#"{"model_type":"mixtral","vocab_size":10,"hidden_size":8,"num_hidden_layers":2,
            "num_attention_heads":2,"num_local_experts":5,"num_experts_per_tok":2,"intermediate_size":4}"#,
        )
        .unwrap()
    }

    #[test]
    fn round_robin_covers_everything_on_distinct_nodes() {
        let nodes: Vec<(NodeId, String)> = (0..3).map(|i| (format!("en-{i}"), format!("127.0.0.1:{i}"))).collect();
        let p = Placement::round_robin(&cfg(), &nodes, 2).unwrap();
        p.validate(&cfg()).unwrap();
        let held: usize = nodes.iter().map(|(n, _)| p.experts_of(n).len()).sum();
        assert_eq!(held, 2 * 5 * 2);
        let text = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Placement>(&text).unwrap(), p);
        assert!(Placement::round_robin(&cfg(), &nodes, 4).is_err());
    }

    #[test]
    fn validation_names_the_problem() {
        let nodes: Vec<(NodeId, String)> = vec![("a".into(), "x".into()), ("b".into(), "y".into())];
        let mut p = Placement::round_robin(&cfg(), &nodes, 1).unwrap();
        p.layers.get_mut(&1).unwrap()[3] = vec![];
        assert!(p.validate(&cfg()).unwrap_err().to_string().contains("expert 3 has no replica"));
        p.layers.get_mut(&1).unwrap()[3] = vec!["zz".into()];
        assert!(p.validate(&cfg()).unwrap_err().to_string().contains("unknown node"));
    }
}
