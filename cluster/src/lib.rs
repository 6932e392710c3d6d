//! ExpertMesh shared cluster code, used by every service and the CLI.
//!
//! - [`process`]: logging, the compute pool, the async runtime, signal →
//!   drain wiring, children tied to their parent.
//! - [`store`]: the cluster-store seam and its etcd implementation;
//!   [`keys`]: the key schema and records; [`membership`]: leases kept alive
//!   from their own thread, and list-then-watch; [`election`]: the
//!   coordinator's leader election; [`etcd_server`]: a private etcd child.
//! - [`planner`]: the expert placement algorithm; [`metrics`]: Prometheus
//!   exposition.
//!
//! Linking this crate also makes mimalloc the process allocator. Dispatch
//! batches are megabyte buffers allocated and freed at every MoE layer;
//! glibc serves those with fresh `mmap`s, so every batch paid page faults
//! and zeroing. mimalloc reuses them: a 4 MiB round trip went from 12–14 ms
//! to 5–7 ms (`docs/benchmarks.md`).

pub mod election;
pub mod etcd_server;
pub mod keys;
pub mod membership;
pub mod metrics;
pub mod planner;
pub mod process;
pub mod store;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
