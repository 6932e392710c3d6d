//! The key schema under `/expertmesh/<cluster>/` and the records stored
//! there (JSON). `ARCHITECTURE.md` documents the same table.

use serde::{Deserialize, Serialize};

/// Keys of one cluster.
#[derive(Debug, Clone)]
pub struct Keys {
    root: String,
}

impl Keys {
    pub fn new(cluster: &str) -> Self {
        Keys { root: format!("/expertmesh/{cluster}/") }
    }

    pub fn root(&self) -> &str {
        &self.root
    }
    /// `nodes/<id>`: [`NodeRecord`], under the node's lease.
    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.root)
    }
    pub fn node(&self, id: &str) -> String {
        format!("{}nodes/{id}", self.root)
    }
    /// `routers/<id>`: [`RouterRecord`], under the router's lease.
    pub fn routers(&self) -> String {
        format!("{}routers/", self.root)
    }
    pub fn router(&self, id: &str) -> String {
        format!("{}routers/{id}", self.root)
    }
    /// `coordinators/<id>`: [`CoordinatorRecord`], under its lease.
    pub fn coordinators(&self) -> String {
        format!("{}coordinators/", self.root)
    }
    pub fn coordinator(&self, id: &str) -> String {
        format!("{}coordinators/{id}", self.root)
    }
    /// `leader`: the leading coordinator's id, under its lease.
    pub fn leader(&self) -> String {
        format!("{}leader", self.root)
    }
    /// `placement`: the placement in force (the data plane's placement JSON,
    /// with its version). Written only by the leader, fenced on `leader`.
    pub fn placement(&self) -> String {
        format!("{}placement", self.root)
    }
    /// `load/<router id>`: [`LoadReport`], under the router's lease.
    pub fn loads(&self) -> String {
        format!("{}load/", self.root)
    }
    pub fn load(&self, router: &str) -> String {
        format!("{}load/{router}", self.root)
    }
    /// `drain/<node id>`: [`DrainRecord`], an operator's request.
    pub fn drains(&self) -> String {
        format!("{}drain/", self.root)
    }
    pub fn drain(&self, node: &str) -> String {
        format!("{}drain/{node}", self.root)
    }
    /// A local supervisor's (`expertmesh up`) report of its children.
    pub fn supervisor(&self) -> String {
        format!("{}supervisor", self.root)
    }

    /// `rebalance`: an operator's request (any new value asks again).
    pub fn rebalance(&self) -> String {
        format!("{}rebalance", self.root)
    }

    /// The `<id>` of a key under `prefix`.
    pub fn id_of<'a>(key: &'a str, prefix: &str) -> Option<&'a str> {
        key.strip_prefix(prefix).filter(|id| !id.is_empty() && !id.contains('/'))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Registered, not yet serving.
    Joining,
    /// Serving its gRPC endpoint.
    Ready,
    /// Shutting down: finishing in-flight batches, taking no new experts.
    Draining,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Joining => "joining",
            NodeState::Ready => "ready",
            NodeState::Draining => "draining",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    /// Data-plane gRPC address routers and the coordinator dial.
    pub addr: String,
    #[serde(default)]
    pub metrics: String,
    /// "cpu", or "cuda:N".
    pub device: String,
    /// Memory for routed experts; 0 means unbounded.
    pub capacity_bytes: u64,
    /// Bytes one routed expert takes on this node (its precision).
    pub expert_bytes: u64,
    pub state: NodeState,
    /// Distinguishes restarts of the same node id (a restarted node holds
    /// nothing until the coordinator loads its experts again).
    #[serde(default)]
    pub incarnation: u64,
}

impl NodeRecord {
    /// Expert slots per MoE layer: capacity spread evenly over the layers,
    /// never more than the layer has experts.
    pub fn slots_per_layer(&self, moe_layers: usize, experts: usize) -> usize {
        if self.capacity_bytes == 0 || self.expert_bytes == 0 {
            return experts;
        }
        let per_layer = self.capacity_bytes / self.expert_bytes / moe_layers.max(1) as u64;
        (per_layer as usize).min(experts)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterRecord {
    pub id: String,
    pub grpc: String,
    pub http: String,
    /// The placement version this router's steps now use (0: none yet).
    pub placement_version: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoordinatorRecord {
    pub id: String,
    #[serde(default)]
    pub addr: String,
}

/// A router's recent routed-token counts, exponentially decayed over
/// windows: `layers[i]` is MoE layer `moe_layers[i]`, one count per expert.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub moe_layers: Vec<usize>,
    pub layers: Vec<Vec<f64>>,
}

/// One supervised child process, as `expertmesh up` reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChildRecord {
    pub pid: u32,
    /// Restarts since `up` started it first.
    pub restarts: u32,
    /// How its last run ended (`"exit status 1"`, `"signal 9"`), if it did.
    #[serde(default)]
    pub last_exit: Option<String>,
    /// Its log file.
    #[serde(default)]
    pub log: String,
}

/// The `supervisor` key: every child `up` runs, by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SupervisorRecord {
    pub pid: u32,
    pub children: std::collections::BTreeMap<String, ChildRecord>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DrainState {
    /// Asked for: the leader is moving the node's experts away.
    Requested,
    /// The node holds nothing any router uses.
    Drained,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainRecord {
    pub state: DrainState,
}

/// JSON bytes of a record.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// A record from its JSON bytes, or an error naming the key.
pub fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> crate::store::Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| crate::store::StoreError::Corrupt { key: key.to_string(), message: e.to_string() })
}
