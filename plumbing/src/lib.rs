//! Process plumbing shared by every ExpertMesh service binary and the CLI.
//!
//! - [`process`]: logging, the compute pool, the I/O runtime, SIGINT/SIGTERM
//!   → a cancellation token, children tied to their parent.
//! - [`listen`]: accepted sockets with Nagle off, and [`listen::Listeners`],
//!   which runs a process's servers and turns a failed one into an
//!   unready process and a log line instead of a silent exit.
//! - [`metrics`]: the registry every component starts from, Prometheus
//!   exposition and a `/metrics` server.
//! - [`internal_tls`]: mutual TLS between the cluster's processes.
//!
//! Nothing here knows about models or etcd. Each binary's `main.rs` calls
//! [`process::tune_allocator`] first: glibc's allocator with one arena and
//! high mmap/trim thresholds.

pub mod internal_tls;
pub mod listen;
pub mod metrics;
pub mod process;
