//! ExpertMesh's control plane, shared by every service and the CLI.
//!
//! - [`store`]: the cluster-store seam (`ClusterStore`) and its etcd
//!   implementation; [`keys`]: the key schema and records.
//! - [`membership`]: leases kept alive from their own thread, and
//!   list-then-watch; [`election`]: the coordinators' leader election.
//! - [`view`]: the cluster as read from etcd, its coverage and balance.
//! - [`args`]: the cluster flags every member flattens.
//! - [`etcd_server`]: a private etcd child (for `expertmesh up` and tests).

pub mod args;
pub mod election;
pub mod etcd_server;
pub mod keys;
pub mod membership;
pub mod store;
pub mod view;
