//! ExpertMesh data plane: what moves token rows between a router and the
//! expert nodes.
//!
//! - [`codec`]: packing rows as f32, bf16 or fp8-e4m3 with per-128 scales.
//! - [`placement`]: which nodes hold which experts (the placement file).
//! - [`transport`]: the collective seam (`Transport::exchange`), with an
//!   in-process implementation; [`grpc`] implements it over persistent
//!   bidirectional `Dispatch` streams. An NCCL transport fits the same seam.
//! - [`tcp`]: the same dispatch over hand-framed TCP, without gRPC's copies.
//! - [`trace`]: request and step trace ids, carried to the expert nodes.
//! - [`tls`]: mutual TLS between the cluster's processes, and public TLS.
//! - [`executor`]: `RemoteExecutor`, the model's `ExpertExecutor` for a
//!   cluster: plans one batch per node per MoE layer, picks replicas by
//!   outstanding work, re-dispatches around failed nodes.

pub mod codec;
pub mod error;
pub mod executor;
pub mod grpc;
pub mod metrics;
pub mod placement;
pub mod tcp;
pub mod tls;
pub mod trace;
pub mod transport;

pub use error::{DataPlaneError, Result};
