//! ExpertMesh coordinator: decides which expert node holds which experts.
//!
//! Several may run; one leads, elected through etcd
//! ([`expertmesh_cluster::election`]). The leader follows the cluster in
//! etcd (nodes, routers, their load reports, operators' drain and rebalance
//! requests), and when a change is due ([`decide`]) plans the next placement
//! with the migration-aware planner and applies it in two phases
//! ([`apply`]). Followers only keep their view current, so a successor
//! takes over within the lease TTL. [`run`] takes its configuration and a
//! cancellation token, so tests embed it.

pub mod apply;
pub mod decide;
pub mod leader;
pub mod metrics;

use clap::Parser;
use expertmesh_cluster::args::MemberArgs;
use expertmesh_plumbing::internal_tls::InternalTlsArgs;
use std::net::SocketAddr;
use std::path::PathBuf;
use thiserror::Error;

#[derive(Parser, Debug, Clone)]
#[command(name = "coordinator", version, about = "ExpertMesh coordinator")]
pub struct Config {
    /// Checkpoint directory (only its config is read).
    #[arg(long, env = "EXPERTMESH_MODEL")]
    pub model: PathBuf,
    /// etcd, the cluster's name and the lease TTL (leadership too: a dead
    /// leader is replaced within it).
    #[command(flatten)]
    pub member: MemberArgs,
    /// Mutual TLS to the expert nodes and on the health endpoint.
    #[command(flatten)]
    pub internal_tls: InternalTlsArgs,
    /// This coordinator's id (unique among coordinators).
    #[arg(long, env = "EXPERTMESH_ID", default_value = "coordinator-0")]
    pub id: String,
    /// gRPC health endpoint (for probes).
    #[arg(long, env = "EXPERTMESH_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Serve Prometheus `/metrics` on this address.
    #[arg(long, env = "EXPERTMESH_METRICS")]
    pub metrics: Option<SocketAddr>,
    /// Distinct nodes every expert is on (2 survives any single node loss).
    #[arg(long, env = "EXPERTMESH_MIN_REPLICAS", default_value_t = 1)]
    pub min_replicas: usize,
    /// Extra replicas per MoE layer for hot experts (default: an eighth of
    /// the experts, as DeepSeek-V3's 32 for 256).
    #[arg(long, env = "EXPERTMESH_REDUNDANT_EXPERTS")]
    pub redundant_experts: Option<usize>,
    /// Rebalance when balancedness (mean/max node load) stays below this…
    #[arg(long, env = "EXPERTMESH_REBALANCE_THRESHOLD", default_value_t = 0.8)]
    pub rebalance_threshold: f64,
    /// …for this many seconds.
    #[arg(long, env = "EXPERTMESH_REBALANCE_AFTER", default_value_t = 60.0)]
    pub rebalance_after: f64,
    /// Seconds to wait for every router to switch before unloading old copies.
    #[arg(long, env = "EXPERTMESH_ROUTER_ACK_TIMEOUT", default_value_t = 30.0)]
    pub router_ack_timeout: f64,
    #[command(flatten)]
    pub log: expertmesh_plumbing::process::LogArgs,
}

impl Config {
    pub fn validate(&self) -> Result<(), CoordError> {
        let bad = |flag, message: &str| Err(CoordError::Config { flag, message: message.to_string() });
        if !self.member.joins() {
            return bad("--etcd", "at least one endpoint is required");
        }
        if let Err((flag, message)) = self.member.validate() {
            return bad(flag, &message);
        }
        if self.id.is_empty() || self.id.contains('/') {
            return bad("--id", "must be a non-empty id without '/'");
        }
        if self.min_replicas == 0 {
            return bad("--min-replicas", "must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.rebalance_threshold) {
            return bad("--rebalance-threshold", "must be between 0 and 1");
        }
        if !(self.rebalance_after >= 0.0 && self.rebalance_after.is_finite()) {
            return bad("--rebalance-after", "must be a non-negative number of seconds");
        }
        if !(self.router_ack_timeout > 0.0 && self.router_ack_timeout.is_finite()) {
            return bad("--router-ack-timeout", "must be a positive number of seconds");
        }
        Ok(())
    }
}

#[derive(Debug, Error)]
pub enum CoordError {
    #[error("{flag}: {message}")]
    Config { flag: &'static str, message: String },
    #[error(transparent)]
    Spec(#[from] expertmesh_spec::SpecError),
    #[error(transparent)]
    Store(#[from] expertmesh_cluster::store::StoreError),
    #[error(transparent)]
    Plan(#[from] expertmesh_planner::PlanError),
    #[error("expert node {addr}: {message}")]
    Node { addr: String, message: String },
    #[error("no longer the leader")]
    NotLeader,
    #[error("listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Internal(String),
}

impl From<CoordError> for tonic::Status {
    fn from(e: CoordError) -> Self {
        match &e {
            CoordError::Config { .. } | CoordError::Plan(_) => tonic::Status::invalid_argument(e.to_string()),
            CoordError::NotLeader => tonic::Status::failed_precondition(e.to_string()),
            CoordError::Store(_) | CoordError::Node { .. } => tonic::Status::unavailable(e.to_string()),
            _ => tonic::Status::internal(e.to_string()),
        }
    }
}

/// Addresses the coordinator listens on.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bound {
    pub grpc: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
}

pub use leader::run;
