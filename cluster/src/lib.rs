//! ExpertMesh shared cluster code used by every service binary.
//!
//! [`process`]: logging, the compute thread pool, the async runtime and the
//! SIGINT/SIGTERM → drain wiring, so each service's `main` stays a few lines.
//!
//! Linking this crate also makes mimalloc the process allocator. Dispatch
//! batches are megabyte buffers allocated and freed at every MoE layer;
//! glibc serves those with fresh `mmap`s, so every batch paid page faults
//! and zeroing. mimalloc reuses them: a 4 MiB round trip went from 12–14 ms
//! to 6–7 ms (`docs/benchmarks.md`).

pub mod etcd_server;
pub mod keys;
pub mod membership;
pub mod planner;
pub mod process;
pub mod store;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
