//! ExpertMesh shared cluster code used by every service binary.
//!
//! [`process`]: logging, the compute thread pool, the async runtime and the
//! SIGINT/SIGTERM → drain wiring, so each service's `main` stays a few lines.

pub mod process;
